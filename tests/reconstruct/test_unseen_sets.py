"""The site builds on shared sets it was not developed on: a stereo pair the dense stage cannot
use is skipped, and with none usable the site keeps its sparse model (it used to end in a
traceback after a good SfM on every set but the fountain), and stands upright where the cameras
alone would tilt it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reconstruct.geometry import views
from reconstruct.reference import ScaleReference
from reconstruct.site import reconstruct


@pytest.mark.slow
def test_berlin_without_a_usable_stereo_pair(data: Path, tmp_path: Path) -> None:
    # The segment between ground control points 0 and 3, as the set's own GCP file gives them.
    ref = ScaleReference.model_validate(
        {"segments": [{"image": "02.jpg", "a": [1580.8, 1019.9], "b": [1830.7, 1200.2], "length_m": 4.62}]}
    )
    site = reconstruct(data / "sfm" / "opensfm-berlin" / "images", ref, tmp_path / "run")
    info = site.info
    assert len(info["registered_images"]) == 3
    assert info["dense"]["triangles"] == 0 and "no stereo pair" in info["dense"]["note"]
    assert not (tmp_path / "run" / "surface.ply").exists()
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "site.json").is_file()
    # Gravity from the building's edges: the photographer pitched the phone up by about 18
    # degrees, so the cameras' mean up would lean the facade by as much. The facade RANSAC finds
    # in the points (an independent witness) must be plumb, and the cameras at standing height.
    assert "vertical edges" in info["up_source"]
    assert info["ground_plane"]["tilt_from_camera_up_deg"] > 10
    assert info["facades"], "the cathedral's front is a plane"
    for f in info["facades"]:  # 0.2-1.0 deg measured over runs (3 photos: +-0.3 deg, and the plane fit)
        assert abs(f["plane"][2]) < math.sin(math.radians(2.0)), f
    z = [v.centre[2] for v in views(site.reconstruction).values()]
    assert 1.0 < sorted(z)[1] < 2.0
