"""Real faces (dlib-pascal crops) pasted at a given size into a site photo, with their boxes."""

from __future__ import annotations

import cv2
import numpy as np

from privacy.boxes import Box


def paste_faces(
    site: np.ndarray,
    crops: list[tuple[np.ndarray, tuple[int, int, int, int]]],
    face_px: float,
    *,
    margin: int = 8,
) -> list[Box]:
    """Paste each crop (scaled so its face is ``face_px`` high) into ``site`` in place, row by
    row, and return where each face now is; crops that do not fit are left out."""
    h, w = site.shape[:2]
    x, y, row_h = margin, margin, 0
    placed: list[Box] = []
    for c, (fx, fy, fw, fh) in crops:
        s = face_px / fh
        cw, ch = max(1, round(c.shape[1] * s)), max(1, round(c.shape[0] * s))
        if x + cw + margin > w:
            x, y, row_h = margin, y + row_h + margin, 0
        if y + ch + margin > h:
            break
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        site[y : y + ch, x : x + cw] = cv2.resize(c, (cw, ch), interpolation=interp)
        placed.append(Box(x + fx * s, y + fy * s, fw * s, fh * s))
        x += cw + margin
        row_h = max(row_h, ch)
    return placed
