"""Whether a redaction hides a face: the high-pass correlation test of issue 22.

The detail recognition works from is what a face has at its feature scale. The test takes the
original's high-pass inside the face's ellipse (the grey image minus its Gaussian blur at
sigma = face width / 12) and correlates it with the same high-pass of the output. The face
counts as hidden when the correlation is below ``HIDDEN_BELOW``. An energy test (how much
high-frequency energy is left) passes a smoothed mosaic that still carries the face's coarse
layout; this one does not.
"""

from __future__ import annotations

import cv2
import numpy as np

from privacy.boxes import Box

HIDDEN_BELOW = 0.3


def _highpass(gray: np.ndarray, sigma: float) -> np.ndarray:
    g = gray.astype(np.float32)
    return g - cv2.GaussianBlur(g, (0, 0), sigma)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def highpass_correlation(original: np.ndarray, output: np.ndarray, face: Box) -> float:
    """Pearson correlation of the two images' high-pass inside ``face``'s inscribed ellipse.

    An output whose high-pass is flat there (a uniform fill) keeps nothing: 0."""
    h, w = original.shape[:2]
    sigma = max(face.w / 12.0, 0.5)
    m = int(np.ceil(4 * sigma)) + 1
    x0, y0 = max(0, int(face.x) - m), max(0, int(face.y) - m)
    x1, y1 = min(w, int(np.ceil(face.x + face.w)) + m), min(h, int(np.ceil(face.y + face.h)) + m)
    a = _highpass(_gray(original[y0:y1, x0:x1]), sigma)
    b = _highpass(_gray(output[y0:y1, x0:x1]), sigma)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    inside = ((xx - cx) / (face.w / 2)) ** 2 + ((yy - cy) / (face.h / 2)) ** 2 <= 1.0
    av, bv = a[inside].astype(np.float64), b[inside].astype(np.float64)
    if av.size < 4:
        return 0.0
    av -= av.mean()
    bv -= bv.mean()
    den = float(np.sqrt((av * av).sum() * (bv * bv).sum()))
    return float((av * bv).sum() / den) if den > 1e-9 else 0.0


def laplacian_variance(rgb: np.ndarray) -> float:
    """The whole image's sharpness: the variance of its Laplacian (grey)."""
    return float(cv2.Laplacian(_gray(rgb).astype(np.float32), cv2.CV_32F).var())
