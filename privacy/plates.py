"""Licence-plate detection: a classical detector for European plates.

No well-kept package ships plate weights with a licence we can use offline (the only bundled
model found, OpenCV 4's Haar cascade, is gone from OpenCV 5 wheels). So this detector uses the
cues every EU plate shares: a row of dark, evenly spaced glyphs on a light, flat background,
with an aspect ratio between about 2:1 (square plates) and 5:1 (long plates).

1. black-hat morphology picks dark strokes narrower than a glyph height;
2. their horizontal gradient is closed with a wide kernel, so a glyph row becomes one blob;
3. blobs with a plate's aspect and size are checked for glyph-like structure: several
   vertical stroke transitions along the middle row, and a light background.

It runs at a few scales, since plate glyph height varies from ~8 px to ~80 px. It favours recall:
a blurred patch of wall costs little, a readable plate breaks the contract.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from privacy.boxes import Box, nms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlateConfig:
    work_side: int = 1280  # long side the search runs at
    glyph_heights: tuple[int, ...] = (10, 18, 30)  # glyph heights searched, at work_side
    min_aspect: float = 1.8
    max_aspect: float = 7.5
    min_transitions: int = 5  # stroke edges along the plate's middle row
    min_glyphs: int = 3  # separate glyph-shaped dark blobs


class ClassicalPlateDetector:
    name = "classical-eu-plates"

    def __init__(self, config: PlateConfig | None = None) -> None:
        self.config = config or PlateConfig()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        cfg = self.config
        h, w = rgb.shape[:2]
        s = min(1.0, cfg.work_side / max(h, w))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if s < 1.0:
            gray = cv2.resize(gray, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        boxes: list[Box] = []
        for gh in cfg.glyph_heights:
            for b in self._at_scale(gray, gh):
                full = Box(b.x / s, b.y / s, b.w / s, b.h / s, b.score)
                if self._plate_colours(rgb, full):
                    boxes.append(full)
        return nms(boxes, 0.2)

    @staticmethod
    def _plate_colours(rgb: np.ndarray, box: Box) -> bool:
        """EU plates are black on white or on yellow: the light part of the patch is either
        unsaturated or yellow. Carved or painted ornaments (red stone, brick) are neither."""
        x0, y0 = int(box.x + 0.1 * box.w), int(box.y + 0.25 * box.h)
        x1, y1 = int(box.x + 0.9 * box.w), int(box.y + 0.75 * box.h)
        patch = rgb[max(0, y0) : y1, max(0, x0) : x1]
        if patch.size == 0:
            return False
        hsv = cv2.cvtColor(np.ascontiguousarray(patch), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(float)
        v = hsv[:, 2]
        light = hsv[v >= np.percentile(v, 60)]
        sat = float(np.median(light[:, 1]))
        hue = float(np.median(light[:, 0]))
        return sat < 90 or 12 <= hue <= 35  # OpenCV hue is 0-180: yellow is ~20-30

    def _at_scale(self, gray: np.ndarray, glyph_h: int) -> list[Box]:
        cfg = self.config
        hh, ww = gray.shape
        k = max(3, int(glyph_h * 0.9)) | 1
        blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
        gx = np.abs(cv2.Sobel(blackhat, cv2.CV_32F, 1, 0, ksize=3))
        gx = cv2.GaussianBlur(gx, (5, 5), 0)
        mx = float(gx.max())
        if mx <= 0:
            return []
        g8: np.ndarray = (gx / mx * 255).astype(np.uint8)
        close = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, int(glyph_h * 1.2)), max(3, glyph_h // 3)))
        g8 = cv2.morphologyEx(g8, cv2.MORPH_CLOSE, close)
        _, th = cv2.threshold(g8, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        k3 = np.ones((3, 3), np.uint8)
        th = cv2.erode(th, k3, iterations=1)
        th = cv2.dilate(th, k3, iterations=2)
        contours, _ = cv2.findContours(th, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out: list[Box] = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            if bh < glyph_h * 0.6 or bh > glyph_h * 2.2 or bw < bh * cfg.min_aspect or bw > bh * cfg.max_aspect:
                continue
            if bw > ww * 0.6:
                continue
            fill = cv2.contourArea(c) / float(bw * bh)
            if fill < 0.45:
                continue
            score = self._glyph_score(gray[y : y + bh, x : x + bw])
            if score > 0:
                pad_x, pad_y = bw * 0.08, bh * 0.25  # cover the plate's border and the country strip
                out.append(
                    Box(max(0, x - pad_x), max(0, y - pad_y), min(ww, bw + 2 * pad_x), min(hh, bh + 2 * pad_y), score)
                )
        return out

    def _glyph_score(self, patch: np.ndarray) -> float:
        """> 0 when the patch looks like a row of dark glyphs on a light background."""
        if patch.size == 0 or patch.shape[0] < 4 or patch.shape[1] < 8:
            return 0.0
        _, bw = cv2.threshold(patch, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        dark_share = float((bw == 0).mean())
        if not 0.12 <= dark_share <= 0.65:
            return 0.0
        rows = bw[bw.shape[0] // 3 : 2 * bw.shape[0] // 3]
        transitions = np.abs(np.diff(rows.astype(np.int16), axis=1)).astype(bool).sum(axis=1)
        t = float(np.median(transitions))
        if t < self.config.min_transitions or t > 40:
            return 0.0
        contrast = float(patch.std())
        if contrast < 20:
            return 0.0
        # Glyphs: several separate dark blobs, each most of the plate's height and narrow.
        n, _, stats, _ = cv2.connectedComponentsWithStats(255 - bw, connectivity=8)
        ph, pw = patch.shape
        cand = []
        for i in range(1, n):
            gx, gy, gw, gh, area = stats[i]
            if 0.3 * ph <= gh <= 0.98 * ph and gw <= 0.35 * pw and area >= 0.15 * gw * gh:
                cand.append((gx, gy + gh / 2, gh))
        if len(cand) < self.config.min_glyphs:
            return 0.0
        # Glyphs of one plate share a height and a baseline.
        c = np.array(cand, float)
        hmed = float(np.median(c[:, 2]))
        same = (np.abs(c[:, 2] - hmed) <= 0.25 * hmed) & (np.abs(c[:, 1] - np.median(c[:, 1])) <= 0.2 * hmed)
        glyphs = int(same.sum())
        if glyphs < self.config.min_glyphs:
            return 0.0
        # ... and spread along the plate rather than clumping at one end.
        xs = c[same, 0]
        if float(xs.max() - xs.min()) < 0.4 * pw:
            return 0.0
        return min(1.0, glyphs / 6.0) * min(1.0, contrast / 60.0)
