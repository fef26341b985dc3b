"""Irreversible redaction of image regions.

What a redaction must remove is the structure recognition works from: the face's layout at its
feature scale (eyes, mouth, hairline), not only the finest detail. The test that judges it
(tests/privacy/hidden.py, issue 22) correlates the high-pass of the original inside the face's
ellipse (the image minus its Gaussian blur at sigma = face width / 12) with the same high-pass
of the output; a face is hidden when that correlation is under 0.3.

The old redaction, a 6-cell mosaic smoothed afterwards, removed 90 % of the high-frequency
energy and still failed that test for 16-28 % of real faces at their true boxes: the smoothing
restored the coarse layout the mosaic had broken into blocks. Measured on the 43 dlib-pascal
faces pasted at 12-128 px into site photos, at their true boxes, after JPEG: smoothed mosaic
72-84 % hidden; plain 4- or 6-cell mosaic 88-100 %; one box blur half the region wide 100 %
(but its side lobes pass fine detail with the sign flipped: median correlation -0.04);
two such passes (a triangle kernel: side lobes 4x lower) 98-100 %; two passes plus grey noise
of 2 levels 100 % at every size (median correlation 0.01-0.04).

So the region is blurred twice with a box whose side follows the region (half its shorter
side by default, never less), then random noise is added (the gate seeds it from a digest of
the original pixels: the same photo gives the same bytes, and the output alone does not give the
seed, so the noise cannot be subtracted again) and the result is pasted inside the ellipse (faces) or the
rectangle (plates). Only the boxes are touched: the image as a whole keeps its sharpness.
"""

from __future__ import annotations

import cv2
import numpy as np

from privacy.boxes import Box

# The blur's side as a share of the region's shorter side at the default strength, which is
# also the floor: a weaker blur is never applied whatever the policy asks.
KERNEL_SHARE = 0.5
DEFAULT_BLOCKS = 6  # the policy's strength knob (``blur_blocks``): fewer is stronger
PASSES = 2
NOISE_SIGMA = 2.0  # grey levels


def kernel_share(blocks: int) -> float:
    """The box blur's side over the region's shorter side for a policy strength ``blocks``
    (the old mosaic's cells across): 3 / blocks, floored at :data:`KERNEL_SHARE`, so 6 cells
    (the default) and anything finer give the floor and 2-5 cells a wider blur."""
    return max(KERNEL_SHARE, 3.0 / max(1, blocks))


def redact(
    rgb: np.ndarray,
    boxes: list[Box],
    *,
    blocks: int = DEFAULT_BLOCKS,
    grow: float = 1.25,
    ellipse: bool = True,
    inplace: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Return ``rgb`` with each box (enlarged by ``grow``) blurred beyond recognition: a copy, or
    ``rgb`` itself when ``inplace`` (only the boxes are touched; no copy of a 48 MP image)."""
    out = rgb if inplace else rgb.copy()
    h, w = rgb.shape[:2]
    share = kernel_share(blocks)
    gen = rng if rng is not None else np.random.default_rng()
    for box in boxes:
        gw, gh = box.w * grow, box.h * grow  # as grown, before the image's border clips it
        b = box.grown(grow, grow, w, h)
        x0, y0 = int(np.floor(b.x)), int(np.floor(b.y))
        x1, y1 = min(w, int(np.ceil(b.x + b.w))), min(h, int(np.ceil(b.y + b.h)))
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        roi = out[y0:y1, x0:x1]
        rh, rw = roi.shape[:2]
        # The kernel follows the box as grown, not as the border clips it: a face cut by the
        # image's edge is blurred as strongly as a whole one.
        k = max(3, round(max(2.0, min(gw, gh)) * share) | 1)
        hidden = roi
        for _ in range(PASSES):
            hidden = cv2.blur(hidden, (k, k), borderType=cv2.BORDER_REFLECT)
        noise = gen.normal(0.0, NOISE_SIGMA, (rh, rw, 1)).astype(np.float32)
        hidden = np.clip(hidden.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        # A box at the border (the detector clips its boxes there) is redacted as a rectangle:
        # the ellipse inscribed in a clipped box would leave the face's cut corners.
        at_border = box.x <= 1 or box.y <= 1 or box.x + box.w >= w - 1 or box.y + box.h >= h - 1
        if ellipse and not at_border:
            mask = np.zeros((rh, rw), np.uint8)
            cx, cy = box.x + box.w / 2 - x0, box.y + box.h / 2 - y0
            axes = (max(1, round(gw / 2)), max(1, round(gh / 2)))
            cv2.ellipse(mask, (round(cx), round(cy)), axes, 0, 0, 360, 255, -1)
            roi[:] = np.where((mask > 0)[:, :, None], hidden, roi)
        else:
            roi[:] = hidden
    return out
