"""Small geometry helpers over pycolmap models: views, rays, local plane fits, lifting pixels."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pycolmap  # only in annotations: the API imports this module's users for their schemas


@dataclass(frozen=True)
class View:
    """One registered photo's camera, as plain arrays. World->camera: x_cam = R @ X + t."""

    name: str
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    camera: pycolmap.Camera

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(-self.R.T @ self.t)

    def ray(self, uv: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """Origin and unit direction (world) of the ray through pixel ``uv`` (distortion removed)."""
        xy = np.asarray(self.camera.cam_from_img(np.array([uv], dtype=np.float64)))[0]
        d = self.R.T @ np.array([xy[0], xy[1], 1.0])
        return self.centre, d / np.linalg.norm(d)

    def project(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (with distortion) and depths of world points ``X`` (N x 3)."""
        Xc = (self.R @ np.asarray(X, dtype=np.float64).T).T + self.t
        z = Xc[:, 2]
        safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
        norm = np.column_stack([Xc[:, :2] / safe[:, None], np.ones(len(Xc))])
        uv = self.camera.img_from_cam(np.ascontiguousarray(norm), check_cheirality=False)
        return np.asarray(uv), z


def views(rec: pycolmap.Reconstruction) -> dict[str, View]:
    out: dict[str, View] = {}
    for img in rec.images.values():
        if not img.has_pose:
            continue
        cfw = img.cam_from_world()
        # A copy: img.camera points into ``rec`` and dangles once ``rec`` is freed.
        cam = copy.deepcopy(img.camera)
        out[img.name] = View(
            img.name,
            np.asarray(cam.calibration_matrix()),
            np.asarray(cfw.rotation.matrix()),
            np.asarray(cfw.translation),
            int(cam.width),
            int(cam.height),
            cam,
        )
    return out


def observations(rec: pycolmap.Reconstruction, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and 3D points of every triangulated feature of photo ``name``."""
    img = rec.find_image_with_name(name)
    if img is None:
        return np.zeros((0, 2)), np.zeros((0, 3))
    uv, xyz = [], []
    for p in img.points2D:
        if p.has_point3D():
            uv.append(p.xy)
            xyz.append(rec.points3D[p.point3D_id].xyz)
    return np.asarray(uv, float).reshape(-1, 2), np.asarray(xyz, float).reshape(-1, 3)


@dataclass(frozen=True)
class Plane:
    """n . X = d, with |n| = 1."""

    n: np.ndarray
    d: float
    rms: float  # RMS perpendicular residual of its support points
    support: int

    def distance(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X) @ self.n - self.d


def fit_plane(X: np.ndarray, *, iterations: int = 2, k: float = 2.5) -> tuple[Plane, np.ndarray]:
    """Least-squares plane with iterative outlier rejection (k times the robust sigma)."""
    keep = np.ones(len(X), bool)
    for _ in range(iterations + 1):
        P = X[keep]
        c = P.mean(axis=0)
        _, _, vt = np.linalg.svd(P - c, full_matrices=False)
        n = vt[2]
        r = (X - c) @ n
        sigma = 1.4826 * np.median(np.abs(r[keep])) + 1e-12
        new = np.abs(r) <= k * sigma
        if new.sum() < 4 or (new == keep).all():
            break
        keep = new
    P = X[keep]
    c = P.mean(axis=0)
    _, _, vt = np.linalg.svd(P - c, full_matrices=False)
    n = vt[2]
    rms = float(np.sqrt(np.mean(((P - c) @ n) ** 2)))
    return Plane(n, float(n @ c), rms, int(keep.sum())), keep


@dataclass(frozen=True)
class Lifted:
    xyz: np.ndarray | None
    sigma: float  # 1-sigma position uncertainty along the ray, model units
    reason: str | None = None
    support: int = 0
    normal: np.ndarray | None = None  # the local surface's unit normal at xyz, where it was fitted


def lift_pixel(
    view: View,
    uv: tuple[float, float],
    obs_uv: np.ndarray,
    obs_xyz: np.ndarray,
    *,
    min_points: int = 8,
    click_px: float = 1.0,
    roughness: float = 0.5,
    radii: tuple[float, ...] = (0.015, 0.03, 0.06),
) -> Lifted:
    """Lift a pixel onto the reconstructed surface: fit a local plane to the 3D points seen
    around it in the same photo, and intersect the pixel's ray with that plane.

    Not the nearest sparse point: that would be biased by up to the point spacing. The plane
    fit averages over the neighbourhood, and its residual and extrapolation give the sigma.
    """
    u, v = uv
    if not (0 <= u <= view.width and 0 <= v <= view.height):
        return Lifted(None, math.inf, "the point lies outside its photo")
    if len(obs_uv) < min_points:
        return Lifted(None, math.inf, "the photo has too few reconstructed points")
    diag = math.hypot(view.width, view.height)
    dist = np.hypot(obs_uv[:, 0] - u, obs_uv[:, 1] - v)
    for r in radii:
        near = dist <= r * diag
        if near.sum() >= min_points:
            break
    else:
        return Lifted(None, math.inf, "no reconstructed surface around this point")
    P = obs_xyz[near]
    plane, keep = fit_plane(P)
    C, d = view.ray(uv)
    cos = float(plane.n @ d)
    if abs(cos) < 0.08:
        return Lifted(None, math.inf, "the surface here is seen edge-on")
    s = (plane.d - plane.n @ C) / cos
    if s <= 0:
        return Lifted(None, math.inf, "the surface fit lies behind the camera")
    X = C + s * d
    Q = P[keep]
    c = Q.mean(axis=0)
    inplane = (Q - c) - np.outer((Q - c) @ plane.n, plane.n)
    spread = float(np.sqrt(np.mean(np.sum(inplane**2, axis=1)))) + 1e-12
    off = X - c
    off = off - (off @ plane.n) * plane.n
    # Uncertainty of the fitted plane at X (offset + tilt), plus the surface's own roughness,
    # converted from the normal direction to the ray direction.
    n_pts = max(1, plane.support)
    # Three independent parts, each in metres along the surface:
    # - the fitted plane's own uncertainty at X (offset and tilt);
    # - the surface's departure from that plane (relief, edges): its residual RMS;
    # - where the pixel was clicked: ``click_px`` pixels at this range, stretched by the
    #   incidence angle.
    fit2 = plane.rms**2 * (1.0 / n_pts + 3.0 * float(off @ off) / (n_pts * spread**2))
    rough2 = (roughness * plane.rms) ** 2
    sig_along_ray = math.sqrt(fit2 + rough2) / abs(cos)
    f = float(view.K[0, 0])
    sig_click = click_px * s / f / max(abs(cos), 0.3)
    return Lifted(X, math.hypot(sig_along_ray, sig_click), None, int(plane.support), plane.n)


def rays(view: View, uv: np.ndarray) -> np.ndarray:
    """Unit directions (world, N x 3) of the rays through pixels ``uv`` (N x 2), distortion removed."""
    xy = np.asarray(view.camera.cam_from_img(np.ascontiguousarray(uv, dtype=np.float64)))
    d = np.column_stack([xy, np.ones(len(xy))]) @ view.R  # rows: R^T [x, y, 1]
    return np.asarray(d / np.linalg.norm(d, axis=1, keepdims=True))


class SurfaceLifter:
    """Lift pixels onto the dense surface (``RUN_DIR/surface.ply``) by casting their rays at the
    mesh: the first hit is the visible surface point, occlusions included. Used where the sparse
    neighbourhood of a pixel is too thin for :func:`lift_pixel` (plain walls, ground, edges of the
    model). sigma: the mesh's local departure from a plane around the hit (its noise) over the
    incidence angle, plus the click term as in :func:`lift_pixel`."""

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray) -> None:
        import open3d as o3d

        self.vertices = np.asarray(vertices, np.float64)
        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(
            o3d.core.Tensor.from_numpy(self.vertices.astype(np.float32)),
            o3d.core.Tensor.from_numpy(np.ascontiguousarray(triangles, np.uint32)),
        )
        self.kd = o3d.geometry.KDTreeFlann(self.vertices.T.copy())
        edges = self.vertices[np.asarray(triangles)[:, :2]]
        self.edge = float(np.median(np.linalg.norm(edges[:, 0] - edges[:, 1], axis=1))) if len(edges) else 0.0

    def lift(self, view: View, uv: tuple[float, float], *, click_px: float = 1.0) -> Lifted:
        import open3d as o3d

        u, v = uv
        if not (0 <= u <= view.width and 0 <= v <= view.height):
            return Lifted(None, math.inf, "the point lies outside its photo")
        C, d = view.ray(uv)
        rays = o3d.core.Tensor.from_numpy(np.hstack([C, d])[None, :].astype(np.float32))
        hit = self.scene.cast_rays(rays)
        s = float(hit["t_hit"].numpy()[0])
        if not math.isfinite(s):
            return Lifted(None, math.inf, "the dense surface does not reach this point")
        X = C + s * d
        # The local surface: mesh vertices within a few cells of the hit.
        radius = max(4.0 * self.edge, 0.01 * s)
        k, idx, _ = self.kd.search_radius_vector_3d(X, radius)
        if k < 6:
            return Lifted(None, math.inf, "the dense surface is too sparse here")
        plane, _ = fit_plane(self.vertices[np.asarray(idx)])
        cos = abs(float(plane.n @ d))
        if cos < 0.08:
            return Lifted(None, math.inf, "the surface here is seen edge-on")
        sig_along_ray = math.hypot(plane.rms, 0.5 * self.edge / math.sqrt(12)) / cos
        sig_click = click_px * s / float(view.K[0, 0]) / max(cos, 0.3)
        return Lifted(X, math.hypot(sig_along_ray, sig_click), None, int(k), plane.n)


def sigma_along(cov: np.ndarray, direction: np.ndarray) -> float:
    """1-sigma of a point with covariance ``cov`` along ``direction``."""
    u = np.asarray(direction, float)
    u = u / (np.linalg.norm(u) + 1e-12)
    return float(math.sqrt(max(0.0, float(u @ cov @ u))))


def similarity(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama's least-squares fit ``dst ~ s R src + t`` of two (N, 3) point sets (s = 1 when
    ``with_scale`` is off); the same fit as ../shared/tools/eval_site.py."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = float((S * np.diag(D)).sum() / (a**2).sum() * len(src)) if with_scale else 1.0
    return s, R, md - s * R @ ms
