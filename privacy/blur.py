"""Irreversible redaction of image regions.

A light Gaussian can be partly inverted; pixelation alone keeps coarse structure. We pixelate
an enlarged ellipse to a handful of blocks, then smooth the blocks so the edge is not a hard
mosaic. Both steps destroy the high frequencies recognition needs.
"""

from __future__ import annotations

import cv2
import numpy as np

from privacy.boxes import Box


def redact(
    rgb: np.ndarray,
    boxes: list[Box],
    *,
    blocks: int = 6,
    grow: float = 1.25,
    ellipse: bool = True,
    inplace: bool = False,
) -> np.ndarray:
    """Return ``rgb`` with each box pixelated to ``blocks`` cells across and blurred: a copy, or
    ``rgb`` itself when ``inplace`` (only the boxes are touched; no copy of a 48 MP image)."""
    out = rgb if inplace else rgb.copy()
    h, w = rgb.shape[:2]
    for box in boxes:
        b = box.grown(grow, grow, w, h)
        x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
        x1, y1 = min(w, int(np.ceil(b.x + b.w))), min(h, int(np.ceil(b.y + b.h)))
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        roi = out[y0:y1, x0:x1]
        rh, rw = roi.shape[:2]
        n = max(2, blocks)
        small = cv2.resize(roi, (n, max(2, round(n * rh / rw))), interpolation=cv2.INTER_AREA)
        mosaic = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
        k = max(3, (min(rw, rh) // 3) | 1)
        smooth = cv2.GaussianBlur(mosaic, (k, k), 0)
        if ellipse:
            mask = np.zeros((rh, rw), np.uint8)
            cv2.ellipse(mask, (rw // 2, rh // 2), (max(1, rw // 2), max(1, rh // 2)), 0, 0, 360, 255, -1)
            m = (mask > 0)[:, :, None]
            roi[:] = np.where(m, smooth, roi)
        else:
            roi[:] = smooth
    return out
