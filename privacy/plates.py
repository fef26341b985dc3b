"""Licence-plate detection: a classical detector for European plates.

No well-kept package ships plate weights with a licence we can use offline (the only bundled
model found, OpenCV 4's Haar cascade, is gone from OpenCV 5 wheels). So this detector uses the
cues every EU plate shares: a row of dark, evenly spaced glyphs on a light, flat background,
with an aspect ratio between about 2:1 (square plates) and 5:1 (long plates).

1. black-hat morphology picks dark strokes narrower than a glyph height;
2. their horizontal gradient is closed with a wide kernel, so a glyph row becomes one blob;
3. blobs with a plate's aspect and size are checked for glyph-like structure (``_glyph_score``):
   the patch is brought to a standard height and thresholded at a few levels; long horizontal
   dark runs (the plate's frame, its shadow) are cut away; then at least ``min_glyphs`` dark
   blobs must share a height, a top and a baseline, be strokes rather than solid blocks
   (window panes, arches), stand side by side and spread along the plate;
4. the light part of the plate must be unsaturated or yellow.

It runs at several glyph heights (a factor of ~1.3 apart), since plate glyphs are ~8 px to
~80 px high, at 1280 px on the long side, plus the smallest heights at 2560 px for large
photos. It favours recall: a blurred patch of wall costs little, a readable plate breaks the
contract. Measured on ``shared/data/plates/eu``: 53 of 54 labelled plates; 6 false boxes
on 44 plate-free photos (see docs/privacy.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from privacy.boxes import Box, nms
from privacy.errors import DetectionFailed

log = logging.getLogger(__name__)

_GLYPH_WORK_H = 40  # the glyph check runs on candidate patches at least this tall


@dataclass(frozen=True)
class PlateConfig:
    work_side: int = 1280  # long side the search runs at
    glyph_heights: tuple[int, ...] = (8, 10, 13, 17, 22, 29, 38)  # glyph heights searched, at work_side
    # Large photos: small glyphs are also searched at this long side, so a distant plate whose
    # glyphs are ~8 px at fine_side (under 8 px at work_side, where the glyph check fails) is found.
    fine_side: int = 2560
    fine_glyph_heights: tuple[int, ...] = (8, 10, 13)
    # The smallest glyphs are also searched at the photo's own resolution: a plate 15-25 m away
    # has 8-13 px glyphs in a 12 MP photo, legible there, and under 8 px at fine_side.
    native_glyph_heights: tuple[int, ...] = (8, 10)
    # The candidate mask is thresholded per tile (Otsu, interpolated between tile centres), so a
    # small plate is judged against its neighbourhood, not against the strongest edges of the
    # whole photo: tiles of at least this many pixels, and at least 24 glyph heights.
    threshold_tile: int = 512
    threshold_floor: float = 0.3  # a tile's level never falls under this share of the photo's
    min_aspect: float = 1.8
    max_aspect: float = 7.5
    min_glyphs: int = 4  # separate glyph-shaped dark blobs
    # The character-row cue (MSER): glyph heights at work_side, and MSER's stability step.
    row_glyph_px: tuple[int, int] = (8, 80)
    # MSER's stability steps: 5 for clear plates, 2 as well for dim, low-contrast ones (night,
    # tinted covers): on the US tune half 88 -> 93 of 108, 7 -> 21 row boxes on 44 plate-free photos.
    mser_deltas: tuple[int, ...] = (5, 2)
    # A row of MSER glyphs on a dim plate (night, a tinted cover, a grey plate): its patch is
    # stretched to full range before the glyph test when its contrast (grey-level standard
    # deviation) is at least this, under the glyph test's own floor of 18. US tune half: 93 -> 100
    # of 108 (7 of its 15 misses were such rows, contrast 8-17); 20 -> 21 boxes on 44 plate-free photos.
    row_min_contrast: float = 6.0


def _local_otsu(g8: np.ndarray, tile: int, floor_share: float) -> np.ndarray:
    """255 where ``g8`` is above its neighbourhood's Otsu threshold: one threshold per tile,
    interpolated between tile centres (as CLAHE does), so no seam runs along tile borders.
    A global threshold let a 12 MP photo's strongest edges set the bar: a distant plate's glyph
    row then merged with its car's edges or fell under it (bench/plates.py: 13 px glyphs, 17 of 54
    found with one threshold, 24 with local ones at the same passes)."""
    hh, ww = g8.shape
    ny, nx = max(1, round(hh / tile)), max(1, round(ww / tile))
    if ny * nx == 1:
        return cv2.threshold(g8, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]
    ys = np.linspace(0, hh, ny + 1).astype(int)
    xs = np.linspace(0, ww, nx + 1).astype(int)
    # A flat tile (sky, a wall) has an Otsu level near 0, where JPEG noise would pass: the level
    # never falls under a fraction of the photo's own.
    floor = floor_share * cv2.threshold(g8, 0, 255, cv2.THRESH_OTSU)[0]
    grid = np.empty((ny, nx), np.uint8)
    for i in range(ny):
        for j in range(nx):
            otsu = cv2.threshold(g8[ys[i] : ys[i + 1], xs[j] : xs[j + 1]], 0, 255, cv2.THRESH_OTSU)[0]
            grid[i, j] = int(max(otsu, floor))
    level = cv2.resize(grid, (ww, hh), interpolation=cv2.INTER_LINEAR)
    return cv2.compare(g8, level, cv2.CMP_GT)


def _stretched(patch: np.ndarray, min_contrast: float) -> np.ndarray:
    """``patch`` with its 2nd-98th percentile grey levels stretched to 0-255 when its contrast
    lies between ``min_contrast`` and the glyph test's floor; else as it is."""
    if patch.size == 0:
        return patch
    sd = float(cv2.meanStdDev(patch)[1][0, 0])
    if not min_contrast <= sd < _MIN_CONTRAST:
        return patch
    lo, hi = np.percentile(patch, (2, 98))
    if hi - lo < 4:
        return patch
    return cv2.convertScaleAbs(patch, alpha=255.0 / (hi - lo), beta=-255.0 * lo / (hi - lo))


_MIN_CONTRAST = 18.0  # the glyph test's floor (grey-level standard deviation of the patch)

# The smallest image side a plate could be read in: a plate with 8 px glyphs is ~11 px high.
_MIN_PLATE_PX = 10


class ClassicalPlateDetector:
    name = "classical-eu-plates"

    def __init__(self, config: PlateConfig | None = None) -> None:
        self.config = config or PlateConfig()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        try:
            return self._detect(rgb)
        except Exception as exc:  # never a crash of the batch: the photo is refused (fail closed)
            raise DetectionFailed(f"plate detection failed ({type(exc).__name__})") from None

    def _detect(self, rgb: np.ndarray) -> list[Box]:
        cfg = self.config
        h, w = rgb.shape[:2]
        if min(h, w) < _MIN_PLATE_PX:
            return []  # no room for a readable plate (and a 3000 x 1 image shrinks to nothing)
        full_gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        passes = [(min(1.0, cfg.work_side / max(h, w)), cfg.glyph_heights)]
        for scale, heights in (
            (min(1.0, cfg.fine_side / max(h, w)), cfg.fine_glyph_heights),
            (1.0, cfg.native_glyph_heights),
        ):
            if heights and scale > passes[-1][0] * 1.2:
                passes.append((scale, heights))
        boxes: list[Box] = []
        # Finest pass first, each coarser image area-averaged from the one before: the same pixels
        # within rounding, and cheap (12 MP straight to 1280 px costs 22 ms, 2560 to 1280 px 0.4 ms).
        src, src_s = full_gray, 1.0
        for s, heights in sorted(passes, key=lambda p: -p[0]):
            gray = src
            if s < src_s:
                gray = cv2.resize(src, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            for gh in heights:
                for b in self._at_scale(gray, gh):
                    full = Box(b.x / s, b.y / s, b.w / s, b.h / s, b.score)
                    if self._plate_colours(rgb, full):
                        boxes.append(full)
            src, src_s = gray, s
        # A second, independent cue on the coarsest image (the work size): rows of character
        # regions (MSER), each row checked by the same glyph test. It finds the US 2:1 plates
        # whose glyph row the morphology above does not make into one blob (busy backgrounds,
        # a state name or a logo between the glyphs, thin strokes) and plates of any colour.
        for b in self._character_rows(src):
            boxes.append(Box(b.x / src_s, b.y / src_s, b.w / src_s, b.h / src_s, b.score))
        del src, gray
        return nms(boxes, 0.2)

    def _character_rows(self, gray: np.ndarray) -> list[Box]:
        """Plates found as a row of at least ``min_glyphs`` MSER regions of a glyph's shape that
        share a height, a top and a baseline and stand side by side, each row passing
        :meth:`_glyph_score`; the box covers the plate around the row (a US plate's glyphs are
        about half its height)."""
        cfg = self.config
        out: list[Box] = []
        for delta in cfg.mser_deltas:
            out += self._rows_at(gray, delta)
        return out

    def _rows_at(self, gray: np.ndarray, delta: int) -> list[Box]:
        cfg = self.config
        hh, ww = gray.shape
        lo, hi = cfg.row_glyph_px
        mser = cv2.MSER.create(delta=delta, min_area=max(12, lo * lo // 6), max_area=hi * hi)
        regions, bbs = mser.detectRegions(gray)
        if len(bbs) < cfg.min_glyphs:
            return []
        x, y, w, h = np.asarray(bbs, float).T
        area = np.array([len(r) for r in regions], float)
        keep = (h >= lo) & (h <= hi) & (w >= 0.1 * h) & (w <= h) & (area >= 0.15 * w * h) & (area <= 0.9 * w * h)
        order = np.lexsort((-h[keep], x[keep]))
        x, y, w, h = (a[keep][order] for a in (x, y, w, h))
        n = len(x)
        cx, bot = x + w / 2, y + h
        parent = list(range(n))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(n):
            for j in range(i + 1, n):
                if cx[j] - cx[i] > 1.6 * h[i]:
                    break  # sorted by x: nothing further can be a neighbour
                if (
                    abs(h[j] - h[i]) > 0.2 * max(h[i], h[j])
                    or abs(bot[j] - bot[i]) > 0.2 * h[i]
                    or abs(y[j] - y[i]) > 0.2 * h[i]
                    or cx[j] - cx[i] < 0.25 * h[i]  # the same glyph again (MSER nests regions)
                ):
                    continue
                parent[root(j)] = root(i)
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(root(i), []).append(i)
        out: list[Box] = []
        for members in groups.values():
            if len(members) < cfg.min_glyphs:
                continue
            g = np.array(members)
            hm = float(np.median(h[g]))
            glyphs = 1 + int(np.sum(np.diff(np.sort(cx[g])) >= 0.25 * hm))
            x0, x1 = float(x[g].min()), float((x[g] + w[g]).max())
            y0, y1 = float(np.median(y[g])), float(np.median(bot[g]))
            if not cfg.min_glyphs <= glyphs <= 12 or not 1.5 * hm <= x1 - x0 <= 12 * hm or y1 <= y0:
                continue
            py, px = max(2, round((y1 - y0) / 3)), max(2, round((x1 - x0) / 10))
            patch = gray[max(0, round(y0) - py) : round(y1) + py, max(0, round(x0) - px) : round(x1) + px]
            score = self._glyph_score(_stretched(patch, cfg.row_min_contrast))
            if score <= 0:
                continue
            bx0, by0 = max(0.0, x0 - 0.3 * hm), max(0.0, y0 - 0.6 * hm)
            bx1, by1 = min(float(ww), x1 + 0.3 * hm), min(float(hh), y1 + 0.6 * hm)
            out.append(Box(bx0, by0, bx1 - bx0, by1 - by0, score))
        return out

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
        # |d/dx| of the strokes, blurred and stretched to 0-255 (16-bit and 8-bit: 4x faster than float)
        sobel = cv2.Sobel(blackhat, cv2.CV_16S, 1, 0, ksize=3)
        lo, hi = cv2.minMaxLoc(sobel)[:2]
        if max(-lo, hi) <= 0:
            return []
        g8 = cv2.GaussianBlur(cv2.convertScaleAbs(sobel, alpha=255.0 / max(-lo, hi)), (5, 5), 0)
        mx = cv2.minMaxLoc(g8)[1]
        if mx <= 0:
            return []
        g8 = cv2.convertScaleAbs(g8, alpha=255.0 / mx)
        close = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, int(glyph_h * 1.2)), max(3, glyph_h // 3)))
        g8 = cv2.morphologyEx(g8, cv2.MORPH_CLOSE, close)
        th = _local_otsu(g8, max(cfg.threshold_tile, 24 * glyph_h), cfg.threshold_floor)
        k3 = np.ones((3, 3), np.uint8)
        th = cv2.erode(th, k3, iterations=1)
        th = cv2.dilate(th, k3, iterations=2)
        contours, _ = cv2.findContours(th, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out: list[Box] = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            if bh < glyph_h * 0.6 or bh > glyph_h * 3.0 or bw < bh * cfg.min_aspect or bw > bh * cfg.max_aspect:
                continue
            if bw > ww * 0.6:
                continue
            fill = cv2.contourArea(c) / float(bw * bh)
            if fill < 0.45:
                continue
            py, px = max(2, bh // 6), max(2, bw // 20)
            score = self._glyph_score(gray[max(0, y - py) : y + bh + py, max(0, x - px) : x + bw + px])
            if score > 0:
                pad_x, pad_y = bw * 0.08, bh * 0.25  # cover the plate's border and the country strip
                out.append(
                    Box(max(0, x - pad_x), max(0, y - pad_y), min(ww, bw + 2 * pad_x), min(hh, bh + 2 * pad_y), score)
                )
        return out

    def _glyph_score(self, patch: np.ndarray) -> float:
        """> 0 when the patch looks like a row of dark glyphs on a light background.

        The patch is brought to a standard height and thresholded at a few levels (a cheap
        stand-in for MSER: at low resolution glyphs merge with each other or with the plate's
        frame at one level and separate at another); the best level wins.
        """
        if patch.size == 0 or patch.shape[0] < 6 or patch.shape[1] < 12:
            return 0.0
        contrast = float(cv2.meanStdDev(patch)[1][0, 0])  # as patch.std(), 15x faster on a small patch
        if contrast < _MIN_CONTRAST:
            return 0.0
        ph0 = patch.shape[0]
        if ph0 < _GLYPH_WORK_H:
            f = _GLYPH_WORK_H / ph0
            patch = cv2.resize(patch, (round(patch.shape[1] * f), _GLYPH_WORK_H), interpolation=cv2.INTER_CUBIC)
        otsu, _ = cv2.threshold(patch, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        best = 0.0
        # Long horizontal dark runs are the plate's frame or its shadow, never part of a glyph;
        # at low resolution glyphs touch them, so they are cut away before glyphs are counted.
        line = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, round(0.75 * patch.shape[0])), 1))
        for off in (0.0, -0.25, 0.25):
            level = otsu + off * contrast
            dark = (patch < level).astype(np.uint8)
            best = max(best, self._glyph_row(dark))
            if best >= 6:
                break  # a full plate's worth of glyphs: no need to look further
            best = max(best, self._glyph_row(cv2.subtract(dark, cv2.morphologyEx(dark, cv2.MORPH_OPEN, line))))
            if best >= 6:
                break
        return min(1.0, best / 6.0) * min(1.0, contrast / 50.0)

    def _glyph_row(self, dark: np.ndarray) -> float:
        """The number of glyph-like dark blobs that share a height and a baseline (0 if < min)."""
        ph, pw = dark.shape
        dark_share = cv2.countNonZero(dark) / dark.size  # dark is 0/1
        if not 0.08 <= dark_share <= 0.7:
            return 0.0
        n, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=4)
        gx, gy, gw, gh, area = (stats[1:n, i].astype(float) for i in range(5))
        keep = (
            (gx > 0)  # touching the patch's edge: the plate's frame or the car around it
            & (gy > 0)
            & (gx + gw < pw)
            & (gy + gh < ph)
            & (gh >= 0.3 * ph)
            & (gh <= 0.95 * ph)
            & (gw >= 0.08 * gh)
            & (gw <= 1.1 * gh)
            & (area >= 0.2 * gw * gh)
            & (area <= 0.85 * gw * gh)  # a glyph is strokes: a solid dark block is a pane or an arch
        )
        if int(keep.sum()) < self.config.min_glyphs:
            return 0.0
        # centre x, top, bottom, height
        c = np.stack([gx + gw / 2, gy, gy + gh, gh], axis=1)[keep]
        hmed = float(np.median(c[:, 3]))
        same = (
            (np.abs(c[:, 3] - hmed) <= 0.2 * hmed)
            & (np.abs(c[:, 1] - np.median(c[:, 1])) <= 0.2 * hmed)
            & (np.abs(c[:, 2] - np.median(c[:, 2])) <= 0.2 * hmed)
        )
        glyphs = int(same.sum())
        if glyphs < self.config.min_glyphs:
            return 0.0
        xs = np.sort(c[same, 0])
        if float(xs[-1] - xs[0]) < 0.4 * pw or glyphs > 12:
            return 0.0
        # Glyphs stand side by side with gaps under about two glyph widths.
        if float(np.diff(xs).max()) > 2.2 * hmed:
            return 0.0
        return float(glyphs)
