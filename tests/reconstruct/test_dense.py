"""The dense surface on a synthetic textured site whose surfaces are known exactly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from reconstruct.dense import DenseConfig, dense_surface, load_surface
from tests.reconstruct.synthetic import make_scene, render_textured, truth_frame


@pytest.mark.slow
def test_dense_surface_lies_on_the_true_planes(tmp_path: Path) -> None:
    sc = make_scene(n_cams=5)
    for k in range(5):
        cv2.imwrite(str(tmp_path / f"{k:04d}.jpg"), render_textured(sc, k), [cv2.IMWRITE_JPEG_QUALITY, 95])
    rec = truth_frame(sc)
    info = dense_surface(rec, tmp_path, tmp_path / "surface.ply", DenseConfig(voxel_m=0.03))
    assert info["pairs"] >= 2
    surf = load_surface(tmp_path / "surface.ply")
    assert surf is not None
    v = surf[0]
    # Distance of every vertex to the nearer of the two true planes.
    dist = np.minimum(np.abs(v[:, 2]), np.abs(v[:, 1] - 5.0))
    assert np.median(dist) < 0.02
    assert np.percentile(dist, 90) < 0.06
    # It covers the wall in front of the cameras, not a few patches.
    on_wall = v[(np.abs(v[:, 1] - 5.0) < 0.05) & (np.abs(v[:, 0]) < 2.5) & (v[:, 2] > 0.3) & (v[:, 2] < 2.5)]
    cells = {(int(x / 0.25), int(z / 0.25)) for x, _, z in on_wall}
    assert len(cells) >= 0.6 * (5.0 / 0.25) * (2.2 / 0.25)
