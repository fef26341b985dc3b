"""The main job carries the placement's clicks, like the reference's, to the upright photo."""

from __future__ import annotations

import numpy as np
import pytest

from reconstruct.errors import ScaleReferenceError
from workers.stages import map_placement


def test_placement_points_follow_the_photos_orientation() -> None:
    # Stored 3072 x 2048 (landscape) with orientation 6: upright it is 2048 x 3072 (portrait).
    entry = {
        "input": "0000.heic",
        "output": "0000.jpg",
        "intrinsics": {"original_width": 3072, "original_height": 2048, "orientation": 6},
    }
    p = map_placement({"image": "0000.heic", "ground_points": [[100.0, 200.0], [3000.0, 1900.0]]}, [entry])
    # Orientation 6 turns the stored image 90 degrees clockwise: (u, v) -> (h - v, u).
    assert p == {"image": "0000.jpg", "ground_points": [[1848.0, 100.0], [148.0, 3000.0]]}
    assert map_placement({"image": "0000.heic", "ground_point": [0.0, 0.0]}, [entry])["ground_point"] == [2048.0, 0.0]
    assert map_placement({"anchor": [0, 0, 0]}, [entry]) == {"anchor": [0, 0, 0]}  # no photo named
    with pytest.raises(ScaleReferenceError):
        map_placement({"image": "missing.jpg", "ground_point": [1.0, 1.0]}, [entry])


def test_an_unexpected_failure_is_named_without_its_text() -> None:
    import cv2

    from workers.stages import unexpected

    try:
        cv2.resize(np.zeros((0, 0), np.uint8), (0, 0))
    except cv2.error as exc:
        msg = unexpected(exc)
    assert "cv2.error" in msg and "resize" not in msg  # OpenCV's text names its source files
    assert "(KeyError)" in unexpected(KeyError("/home/someone/photo.jpg"))
    assert "someone" not in unexpected(KeyError("/home/someone/photo.jpg"))
