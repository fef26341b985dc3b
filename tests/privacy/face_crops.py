"""Labelled faces cut from dlib-pascal with some context, for pasting into site photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def face_crops(faces_dir: Path) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Each labelled face as (crop, face box x, y, w, h inside the crop)."""
    ann = json.loads((faces_dir / "annotations_xywh.json").read_text())
    crops = []
    for name, a in ann.items():
        img = np.asarray(Image.open(faces_dir / name).convert("RGB"))
        for x, y, w, h in a["boxes_xywh"]:
            # Take the head with some context, as a face appears in a photo.
            m = int(0.35 * w)
            c = img[max(0, y - m) : y + h + m, max(0, x - m) : x + w + m]
            if c.shape[0] > 10 and c.shape[1] > 10:
                crops.append((c, (x - max(0, x - m), y - max(0, y - m), w, h)))
    return crops
