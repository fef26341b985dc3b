"""Orientation (+Z up) and the site's planes.

Up comes first from gravity as the photos show it: the vertical edges of buildings, posts and
frames (reconstruct/vertical.py). Without decisive edges, from the cameras: people hold phones
upright, so the mean of the cameras' "up" directions is a rough prior (off by the phones' mean
pitch). The ground is the largest RANSAC plane (open3d) whose normal is near that up and that
lies below the cameras (or, when walls win RANSAC, the same among the points well below the
cameras). +Z is gravity when the edges decide it; the ground is then refitted through its
inliers with +Z fixed and keeps only the slope its points pin down (three standard errors, and
none across a strip such as a street or the foot of a wall), so it is level or a sloped plane on
which placement clicks land. Without edges, a well-spread ground plane's normal is +Z (as
before), else the cameras' up is. The ground is z = 0 at the origin. Near-vertical planes are
the facades. Without a ground plane the ground is taken 1.5 m below the cameras (phones held by
people standing on it), and site.json says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import open3d as o3d

from reconstruct.geometry import View
from reconstruct.vertical import VerticalEstimate

log = logging.getLogger(__name__)


PHONE_HEIGHT_M = 1.5  # a phone held to take a photo, above the ground the photographer stands on
NO_GROUND = f"ground height {PHONE_HEIGHT_M} m below the cameras (no ground plane found)"


@dataclass
class Orientation:
    R: np.ndarray  # world_from_metric rotation
    t: np.ndarray  # world_from_metric translation (metres)
    ground: dict[str, Any]
    facades: list[dict[str, Any]] = field(default_factory=list)
    up_source: str = ""
    vertical: VerticalEstimate | None = None  # in the frame orient() was given


def camera_up(vs: list[View]) -> np.ndarray:
    ups = np.array([-v.R[1] for v in vs])  # image -y axis, in world
    m = ups.mean(axis=0)
    return m / np.linalg.norm(m)


def find_planes(
    pts: np.ndarray,
    *,
    threshold: float,
    max_planes: int = 6,
    min_share: float = 0.03,
    min_points: int = 100,
    seed: int = 0,
) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Successive RANSAC planes: (unit normal n, d with n.X = d, inlier mask over ``pts``)."""
    o3d.utility.random.seed(seed)
    remaining = np.arange(len(pts))
    out = []
    min_count = max(min_points, int(min_share * len(pts)))
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


def _pick_ground(
    planes: list[tuple[np.ndarray, float, np.ndarray]],
    pts: np.ndarray,
    up0: np.ndarray,
    centres: np.ndarray,
    cos_max: float,
) -> tuple[np.ndarray, float, np.ndarray] | None:
    """The largest plane near level (normal within acos(cos_max) of up0) below the cameras:
    (normal, d, its inlier points)."""
    for n, d, mask in sorted(planes, key=lambda p: -int(p[2].sum())):
        if n @ up0 < 0:
            n, d = -n, -d
        if n @ up0 < cos_max:
            continue
        heights = centres @ n - d
        if np.mean(heights > 0) < 0.8:  # the ground is below the cameras
            continue
        return n, d, pts[mask]
    return None


def ground_under(inliers: np.ndarray, up: np.ndarray, *, min_slope_deg: float = 1.0) -> tuple[np.ndarray, float, float]:
    """The ground through a plane's inlier points, with +Z known: (normal, d, slope in degrees).

    Heights are fitted by least squares against the two horizontal axes of the points' spread;
    a slope along an axis is kept only where it is three times its standard error, and across a
    strip (the points spread little that way: a street, the foot of a wall) not at all. Below
    ``min_slope_deg`` the ground is level. RANSAC's own normal is not used: it is a 3-point
    hypothesis that leans any way about a strip, and open3d's is not repeatable run to run."""
    c = inliers.mean(axis=0)
    q = inliers - c
    z = q @ up
    evals, evecs = _in_plane_spread(inliers, up)
    h = q - np.outer(z, up)
    axes = [evecs[:, 2], evecs[:, 1]]
    spread = [float(evals[2]), float(evals[1])]
    X = np.column_stack([h @ a for a in axes])
    g = np.zeros(2)
    if len(q) >= 10:
        sol, *_ = np.linalg.lstsq(X, z, rcond=None)
        resid = z - X @ sol
        sigma = math.sqrt(float(resid @ resid) / max(1, len(q) - 3))
        for i in range(2):
            se = sigma / math.sqrt(max(len(q) * spread[i], 1e-12))
            pinned = i == 0 or spread[1] >= STRIP_RATIO**2 * spread[0]
            if pinned and abs(sol[i]) > 3 * se:
                g[i] = sol[i]
    slope = math.degrees(math.atan(float(np.linalg.norm(g))))
    if slope < min_slope_deg:
        g[:], slope = 0.0, 0.0
    n = up - g[0] * axes[0] - g[1] * axes[1]
    n /= np.linalg.norm(n)
    return n, float(n @ c), round(slope, 2)


STRIP_RATIO = 0.3  # points spread less than this across as along are a strip


def _in_plane_spread(points: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variances (ascending) and axes of ``points`` projected on the plane normal to ``n``: the
    last two span the plane."""
    q = points - points.mean(axis=0)
    q = q - np.outer(q @ n, n)
    evals, evecs = np.linalg.eigh(q.T @ q / max(1, len(q)))
    return evals, evecs


def _well_spread(inliers: np.ndarray, n: np.ndarray) -> bool:
    """Whether a plane's inliers pin its tilt in both directions: not a strip (the foot of a
    wall, a kerb), whose plane may lean any way about its length."""
    ev, _ = _in_plane_spread(inliers, n)
    return bool(ev[1] >= STRIP_RATIO**2 * ev[2])


def orient(
    pts: np.ndarray,
    vs: list[View],
    *,
    threshold_m: float = 0.03,
    vertical: VerticalEstimate | None = None,
    min_slope_deg: float = 1.0,
) -> Orientation:
    """Rotation and translation taking metric model coordinates to the site frame (+Z up).

    With ``vertical`` (gravity, from the photos' edges) +Z is gravity and the ground is searched
    near level; it is kept as a sloped plane when it slopes more than ``min_slope_deg`` and its
    points pin the slope down, else as a level plane at its height. Without it, the cameras'
    up is the prior and a ground plane found near it decides +Z."""
    cam_up = camera_up(vs)
    up0 = vertical.up if vertical is not None else cam_up
    centres = np.array([v.centre for v in vs])
    # Sparse points are noisier further from the cameras: a fixed tolerance finds no ground
    # on a castle's forecourt photographed from 30 m.
    depth = float(np.median(np.linalg.norm(pts[:: max(1, len(pts) // 2000)][:, None] - centres[None], axis=2)))
    threshold = max(threshold_m, 0.004 * depth)
    planes = find_planes(pts, threshold=threshold)
    cos_ground = math.cos(math.radians(25 if vertical is None else 15))
    ground = _pick_ground(planes, pts, up0, centres, cos_ground)
    if ground is None:
        # Walls and roofs win the first RANSAC rounds on a building's photos: look again among
        # the points well below the cameras only, where the ground is when it was photographed.
        low = pts[pts @ up0 < float(np.median(centres @ up0)) - 0.5]
        if len(low) >= 50:
            lows = find_planes(low, threshold=threshold, max_planes=3, min_share=0.1, min_points=50)
            ground = _pick_ground(lows, low, up0, centres, cos_ground)
    slope = None
    if vertical is None and ground is not None and _well_spread(ground[2], ground[0]):
        # No edges: a ground plane whose points pin its tilt gives +Z (the earlier behaviour).
        up = ground[0]
        up_source = "ground plane (RANSAC), checked against the cameras' up direction"
        gn, gd, slope = ground[0], ground[1], 0.0
    else:
        # Gravity from the edges (or, without them, the cameras' up) is +Z: a gate's posts are
        # plumb, whatever the driveway does; the ground keeps only the slope its points show.
        up = vertical.up if vertical is not None else up0
        up_source = vertical.describe() if vertical is not None else "cameras' up direction"
        if ground is None:
            up_source += f"; {NO_GROUND}"
            # The photographers stand on it: their median height less a hand-held phone's. The
            # lowest points are no guide (noise below the ground; on a building's steps, above it).
            gn, gd = up, float(np.median(centres @ up)) - PHONE_HEIGHT_M
        else:
            gn, gd, slope = ground_under(ground[2], up, min_slope_deg=min_slope_deg)
            up_source += (
                f"; the ground (RANSAC plane) slopes {slope:.1f} deg" if slope > 0 else "; ground level (RANSAC plane)"
            )
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
    c = c + (gd - gn @ c) / (gn @ up) * up  # along +Z onto the ground
    t = -R @ c
    plane = [0.0, 0.0, 1.0, 0.0]
    if ground is not None:  # level unless the ground clearly slopes
        gw = R @ gn
        plane = [round(float(v), 6) for v in (*gw, gd + float(gw @ t))]
    ground_json: dict[str, Any] = {
        "plane": plane,
        "found": ground is not None,
        "inliers": len(ground[2]) if ground is not None else 0,
        "tilt_from_camera_up_deg": round(math.degrees(math.acos(min(1.0, float(up @ cam_up)))), 2),
        "slope_deg": slope,
        "ransac_tolerance_m": round(threshold, 3),
    }
    facades = []
    for n, d, mask in planes:
        if abs(n @ up) < math.sin(math.radians(20)):
            nw = R @ n
            dw = d + float(nw @ t)  # n.X = d  ->  nw.(R X + t) = d + nw.t
            facades.append({"plane": [round(float(v), 5) for v in (*nw, dw)], "inliers": int(mask.sum())})
    return Orientation(R, t, ground_json, facades, up_source, vertical)
