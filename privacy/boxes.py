"""Axis-aligned boxes in pixels, and the non-maximum suppression shared by the detectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    score: float = 1.0

    def xywh(self) -> list[int]:
        return [round(self.x), round(self.y), round(self.w), round(self.h)]

    def grown(self, fx: float, fy: float, width: int, height: int) -> Box:
        """The box enlarged about its centre by factors fx, fy, clipped to the image."""
        cx, cy = self.x + self.w / 2, self.y + self.h / 2
        w, h = self.w * fx, self.h * fy
        x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
        x1, y1 = min(float(width), cx + w / 2), min(float(height), cy + h / 2)
        return Box(x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0), self.score)


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: list[Box], threshold: float = 0.3) -> list[Box]:
    """Greedy non-maximum suppression; also drops a box mostly inside a higher-scoring one."""
    if not boxes:
        return []
    order = sorted(boxes, key=lambda b: -b.score)
    xyxy = np.array([[b.x, b.y, b.x + b.w, b.y + b.h] for b in order])
    areas = np.maximum(0, xyxy[:, 2] - xyxy[:, 0]) * np.maximum(0, xyxy[:, 3] - xyxy[:, 1])
    keep: list[int] = []
    suppressed = np.zeros(len(order), bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        ix0 = np.maximum(xyxy[i, 0], xyxy[:, 0])
        iy0 = np.maximum(xyxy[i, 1], xyxy[:, 1])
        ix1 = np.minimum(xyxy[i, 2], xyxy[:, 2])
        iy1 = np.minimum(xyxy[i, 3], xyxy[:, 3])
        inter = np.maximum(0, ix1 - ix0) * np.maximum(0, iy1 - iy0)
        union = areas[i] + areas - inter
        ov = np.where(union > 0, inter / np.maximum(union, 1e-9), 0)
        contained = np.where(areas > 0, inter / np.maximum(areas, 1e-9), 0)
        suppressed |= (ov >= threshold) | (contained >= 0.8)
    return [order[i] for i in keep]
