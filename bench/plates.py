#!/usr/bin/env python3
"""Plate recall by size in full-size photos: where the classical plate detector stops finding plates.

Each of the 54 labelled plates of ``shared/data/plates/eu`` (close-ups), cropped with the car
around it, is scaled so that its glyphs are G px high and pasted, nine to a photo, into site
photos resized to 4000 px on the long side (12 MP); the photos are re-encoded as JPEG (q 92)
and run through the detector. Prints, per glyph height, the plates found (the covering rule of
the recall test) and the detector's seconds per photo. A 520 mm EU plate's glyphs are 75 mm
high: with a phone's main camera (26 mm equivalent) at 4000 px they are ~15 px at 15 m.

Run: .venv/bin/python bench/plates.py [--side 4000] [--glyphs 8 10 13 17 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from privacy.plates import ClassicalPlateDetector  # noqa: E402
from tests.privacy.plate_crops import paste_plate, plate_crops  # noqa: E402
from tests.privacy.test_faces_plates import covered  # noqa: E402


def site_photo(k: int, side: int) -> np.ndarray:
    sites = sorted((DATA / "sfm").rglob("*.jpg"))
    im = Image.open(sites[k * 7 % len(sites)]).convert("RGB")
    s = side / max(im.size)
    return np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.LANCZOS)).copy()


def recall_at(glyph_px: float, side: int, per_photo: int = 9) -> tuple[int, int, float]:
    crops = plate_crops(DATA / "plates" / "eu")
    det = ClassicalPlateDetector()
    found, seconds, photos = 0, 0.0, 0
    for start in range(0, len(crops), per_photo):
        img = site_photo(start // per_photo, side)
        H, W = img.shape[:2]
        placed = [
            paste_plate(img, crop, plate, glyph_px, 100 + (i % 3) * (W // 3), 200 + (i // 3) * (H // 3))
            for i, (crop, plate) in enumerate(crops[start : start + per_photo])
        ]
        enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
        img = np.ascontiguousarray(cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1])
        t0 = time.perf_counter()
        boxes = det.detect(img)
        seconds += time.perf_counter() - t0
        photos += 1
        found += sum(covered(b, boxes, grow=1.1) for b in placed)
    return found, len(crops), seconds / photos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=4000, help="long side of the site photos (px)")
    ap.add_argument("--glyphs", type=float, nargs="+", default=[8, 10, 13, 17, 24], help="glyph heights (px)")
    a = ap.parse_args()
    print(f"plates pasted into {a.side} px site photos, classical detector at its defaults")
    for g in a.glyphs:
        found, total, s = recall_at(g, a.side)
        print(f"  glyphs {g:4.0f} px: {found:2d}/{total} found ({100 * found / total:3.0f} %), {s:.2f} s/photo")


if __name__ == "__main__":
    main()
