"""Labelled EU plates cut out with their cars, for pasting small into full-size site photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from privacy.boxes import Box

GLYPH_OF_PLATE = 75 / 110  # an EU plate's glyphs are 75 of its 110 mm


def plate_crops(plates_dir: Path) -> list[tuple[np.ndarray, Box]]:
    """Each labelled plate as (crop with the car around it, plate box inside the crop)."""
    out = []
    for txt in sorted(plates_dir.glob("*.txt")):
        name, *box = txt.read_text().split()[:5]
        x, y, w, h = map(float, box)
        rgb = np.asarray(Image.open(txt.parent / name).convert("RGB"))
        x0, y0 = max(0, int(x - 0.75 * w)), max(0, int(y - 1.5 * h))
        x1, y1 = min(rgb.shape[1], int(x + 1.75 * w)), min(rgb.shape[0], int(y + 2.5 * h))
        out.append((rgb[y0:y1, x0:x1], Box(x - x0, y - y0, w, h)))
    return out


def paste_plate(site: np.ndarray, crop: np.ndarray, plate: Box, glyph_px: float, x: int, y: int) -> Box:
    """Scale ``crop`` so the plate's glyphs are ``glyph_px`` high, paste it at (x, y) into
    ``site`` (in place) and return where the plate now is."""
    s = glyph_px / GLYPH_OF_PLATE / plate.h
    size = (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s)))
    site[y : y + size[1], x : x + size[0]] = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    return Box(x + plate.x * s, y + plate.y * s, plate.w * s, plate.h * s)


def plate_split(plates_dir: Path) -> dict[str, list[Path]]:
    """The labelled photos of a plate set (their ``.txt`` files) in two fixed halves: ``tune``
    (what the detector may be tuned on) and ``held_out`` (what its recall is claimed on). A
    file goes to ``held_out`` when the first byte of the SHA-256 of its name is odd: the split
    does not depend on the order or the number of files (docs/privacy.md names both halves)."""
    import hashlib

    out: dict[str, list[Path]] = {"tune": [], "held_out": []}
    for txt in sorted(plates_dir.glob("*.txt")):
        odd = hashlib.sha256(txt.name.encode()).digest()[0] & 1
        out["held_out" if odd else "tune"].append(txt)
    return out
