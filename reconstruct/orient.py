"""Orientation (+Z up) and the site's planes.

Up comes first from the cameras: people hold phones upright, so the mean of the cameras' "up"
directions is a good prior (photos are already rotated upright by the privacy gate). The ground
is then the largest RANSAC plane (open3d) whose normal is within 25 degrees of that prior and
that lies below the cameras; its normal becomes +Z and its height z = 0. Near-vertical planes
are the facades. Without a ground plane the prior and the lowest points are used, and
site.json says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import open3d as o3d

from reconstruct.geometry import View

log = logging.getLogger(__name__)


@dataclass
class Orientation:
    R: np.ndarray  # world_from_metric rotation
    t: np.ndarray  # world_from_metric translation (metres)
    ground: dict[str, Any]
    facades: list[dict[str, Any]] = field(default_factory=list)
    up_source: str = ""


def camera_up(vs: list[View]) -> np.ndarray:
    ups = np.array([-v.R[1] for v in vs])  # image -y axis, in world
    m = ups.mean(axis=0)
    return m / np.linalg.norm(m)


def find_planes(
    pts: np.ndarray, *, threshold: float, max_planes: int = 6, min_share: float = 0.03, seed: int = 0
) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Successive RANSAC planes: (unit normal n, d with n.X = d, inlier mask over ``pts``)."""
    o3d.utility.random.seed(seed)
    remaining = np.arange(len(pts))
    out = []
    min_count = max(100, int(min_share * len(pts)))
    for _ in range(max_planes):
        if len(remaining) < min_count:
            break
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts[remaining]))
        model, inl = pc.segment_plane(distance_threshold=threshold, ransac_n=3, num_iterations=2000)
        if len(inl) < min_count:
            break
        a, b, c, d = model
        n = np.array([a, b, c])
        norm = np.linalg.norm(n)
        mask = np.zeros(len(pts), bool)
        mask[remaining[np.asarray(inl)]] = True
        out.append((n / norm, -d / norm, mask))
        remaining = np.setdiff1d(remaining, remaining[np.asarray(inl)])
    return out


def orient(pts: np.ndarray, vs: list[View], *, threshold_m: float = 0.03) -> Orientation:
    """Rotation and translation taking metric model coordinates to the site frame (+Z up)."""
    up0 = camera_up(vs)
    centres = np.array([v.centre for v in vs])
    planes = find_planes(pts, threshold=threshold_m)
    ground = None
    cos_ground = math.cos(math.radians(25))
    for n, d, mask in sorted(planes, key=lambda p: -int(p[2].sum())):
        if n @ up0 < 0:
            n, d = -n, -d
        if n @ up0 < cos_ground:
            continue
        heights = centres @ n - d
        if np.mean(heights > 0) < 0.8:  # the ground is below the cameras
            continue
        ground = (n, d, mask)
        break
    if ground is not None:
        up = ground[0]
        z0 = ground[1]
        up_source = "ground plane (RANSAC), checked against the cameras' up direction"
    else:
        up = up0
        z0 = float(np.percentile(pts @ up, 2))
        up_source = "cameras' up direction; ground height from the lowest points (no ground plane found)"
    # Plans are drawn square to the main facade, as an architect would: +Y points from the
    # photographers into the largest near-vertical plane, X runs along it. Without a facade,
    # +Y is the first photo's viewing direction on the ground.
    walls = [(n, d, m) for n, d, m in planes if abs(n @ up) < math.sin(math.radians(20))]
    if walls:
        n, d, _ = max(walls, key=lambda p: int(p[2].sum()))
        if np.mean(centres @ n - d) > 0:  # make n point away from the cameras
            n = -n
        y = n - (n @ up) * up
    else:
        y = vs[0].R[2] - (vs[0].R[2] @ up) * up
    if np.linalg.norm(y) < 1e-6:
        y = np.cross(up, [1.0, 0.0, 0.0])
    y /= np.linalg.norm(y)
    x = np.cross(y, up)
    R = np.vstack([x, y, up])
    # Origin: the ground point below the centre of the site's points.
    c = np.median(pts, axis=0)
    c = c - (c @ up - z0) * up
    t = -R @ c
    ground_json: dict[str, Any] = {
        "plane": [0.0, 0.0, 1.0, 0.0],
        "found": ground is not None,
        "inliers": int(ground[2].sum()) if ground is not None else 0,
        "tilt_from_camera_up_deg": round(math.degrees(math.acos(min(1.0, float(up @ up0)))), 2),
    }
    facades = []
    for n, d, mask in planes:
        if abs(n @ up) < math.sin(math.radians(20)):
            nw = R @ n
            dw = d + float(nw @ t)  # n.X = d  ->  nw.(R X + t) = d + nw.t
            facades.append({"plane": [round(float(v), 5) for v in (*nw, dw)], "inliers": int(mask.sum())})
    return Orientation(R, t, ground_json, facades, up_source)
