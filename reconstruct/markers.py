"""Metric scale from printed ArUco markers of known size.

Markers are detected (``cv2.aruco``, sub-pixel corners) in every registered photo. Each corner
seen in two or more photos is triangulated from the photos' rays (least squares); a marker seen
in one photo only has its corners lifted onto the local surface instead. The four sides and two
diagonals, against the printed size, give the scale; the corner uncertainty (reprojection
residual, at least ``DETECTION_PX``) gives its sigma.

OpenCV puts pixel centres at integer coordinates; this project (and COLMAP) puts them at +0.5,
so detected corners are shifted by half a pixel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from reconstruct.geometry import View, lift_pixel, observations
from reconstruct.reference import Marker

log = logging.getLogger(__name__)

DETECTION_PX = 0.5  # 1-sigma of a refined ArUco corner, pixels (0.3-0.6 px seen on oblique synthetic views)


def dictionary(name: str) -> Any:
    code = getattr(cv2.aruco, name, None)
    if not isinstance(code, int):
        raise ValueError(f"unknown ArUco dictionary '{name}' (use e.g. DICT_4X4_50)")
    return cv2.aruco.getPredefinedDictionary(code)


def detect(image: np.ndarray, dict_name: str) -> dict[int, np.ndarray]:
    """Marker id -> its 4 corners (4 x 2, this project's pixel convention)."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    params = cv2.aruco.DetectorParameters()
    params.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
    det = cv2.aruco.ArucoDetector(dictionary(dict_name), params)
    corners, ids, _ = det.detectMarkers(gray)
    out: dict[int, np.ndarray] = {}
    if ids is None:
        return out
    for c, i in zip(corners, ids.ravel(), strict=True):
        out[int(i)] = np.asarray(c, float).reshape(4, 2) + 0.5
    return out


def triangulate(rays: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The point closest to all rays (origin, unit direction), least squares."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for C, d in rays:
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ C
    return np.asarray(np.linalg.solve(A, b))


@dataclass
class MarkerScale:
    marker: Marker
    scale: float | None
    sigma_rel: float
    views: int
    reason: str | None = None


def marker_scale(
    marker: Marker, vs: dict[str, View], rec: Any, detections: dict[str, dict[int, np.ndarray]]
) -> MarkerScale:
    """Scale from one marker, given its dictionary's detections per photo."""
    seen = {name: d[marker.id] for name, d in detections.items() if marker.id in d}
    if not seen:
        return MarkerScale(marker, None, math.inf, 0, "the marker was not found in any placed photo")
    corners = np.zeros((4, 3))
    sig = np.zeros(4)
    if len(seen) >= 2:
        for k in range(4):
            rays = [vs[n].ray(tuple(c[k])) for n, c in seen.items()]
            X = triangulate(rays)
            res, rng = [], []
            for n, c in seen.items():
                uv, z = vs[n].project(X[None])
                res.append(float(np.linalg.norm(uv[0] - c[k])))
                rng.append(float(z[0]))
            px = max(DETECTION_PX, float(np.sqrt(np.mean(np.square(res)))))
            f = float(np.mean([vs[n].K[0, 0] for n in seen]))
            corners[k] = X
            sig[k] = px * float(np.mean(rng)) / f / math.sqrt(len(seen))
    else:
        name, c = next(iter(seen.items()))
        ouv, oxyz = observations(rec, name)
        for k in range(4):
            lifted = lift_pixel(vs[name], (float(c[k, 0]), float(c[k, 1])), ouv, oxyz, click_px=DETECTION_PX)
            if lifted.xyz is None:
                return MarkerScale(marker, None, math.inf, 1, f"corner {k}: {lifted.reason}")
            corners[k], sig[k] = lifted.xyz, lifted.sigma
    sides = [np.linalg.norm(corners[(k + 1) % 4] - corners[k]) for k in range(4)]
    diags = [
        np.linalg.norm(corners[2] - corners[0]) / math.sqrt(2),
        np.linalg.norm(corners[3] - corners[1]) / math.sqrt(2),
    ]
    model_side = float(np.mean(sides + diags))
    if model_side <= 0:
        return MarkerScale(marker, None, math.inf, len(seen), "the marker's corners coincide")
    # Six lengths from four corners: about two corners' worth of independent information.
    sigma_rel = float(np.sqrt(np.mean(sig**2)) * math.sqrt(2) / (model_side * math.sqrt(2)))
    shape = float(np.std(sides) / model_side)  # a bent or mis-detected marker shows here
    return MarkerScale(marker, marker.size_m / model_side, math.hypot(sigma_rel, shape / 2), len(seen))


def detect_all(image_dir: Path, names: list[str], dict_name: str) -> dict[str, dict[int, np.ndarray]]:
    """Detections of one dictionary in each named photo."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for n in names:
        img = cv2.imread(str(image_dir / n), cv2.IMREAD_GRAYSCALE)
        if img is not None:
            out[n] = detect(img, dict_name)
    return out
