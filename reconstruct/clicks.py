"""Every clicked pixel becomes a 3D point the same way: reference endpoints (``scale``), placement
ground points (``placement``) and ``measure`` endpoints.

1. The **surface lift**: a plane fitted to the sparse points seen around the pixel in its photo
   (``geometry.lift_pixel``), or the pixel's ray cast at the dense surface where those are too
   few (``geometry.SurfaceLifter``).
2. The **multi-view point** (``multiview.refine_point``), started from the surface lift: the
   point found again in every photo that sees it and triangulated from all of them. It is the
   answer whenever two or more photos agree; the surface lift is the fallback, with the reason.
3. The two are **compared**: when they disagree beyond their sigmas the multi-view point is kept
   (the surface's plane does not describe a step, a post or a frame) and a warning names the
   click, so a reference built on it can widen its sigma.

Each point carries a full 3x3 covariance: the triangulation's (pixel noise by match quality,
inflated by the residuals), the bundle adjustment's pose/structure term at the pixel
(``covariance.point_sigmas``), and the designer's click (``click_px`` pixels across the ray,
stretched by the surface's incidence). A length's sigma is the covariance along the segment,
plus the model's shape where a principal point was held at the image centre (``shape_sigma``:
the length again in the model with it freed, ``covariance.held_intrinsics``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from reconstruct.covariance import HeldIntrinsics, endpoint_sigma, held_intrinsics, ids_and_pixels, point_sigmas
from reconstruct.dense import load_surface
from reconstruct.geometry import Lifted, SurfaceLifter, View, lift_pixel, observations, sigma_along, views
from reconstruct.multiview import MultiViewConfig, PhotoSet, refine_point, retriangulate

log = logging.getLogger(__name__)

DISAGREE_SIGMAS = 3.0  # surface lift and multi-view point further apart than this: a warning
# The bundle adjustment's point sigma near a click is an absolute one: most of it is the whole
# model's drift (the gauge), which moves both ends of a length alike. A multi-view point takes
# this share of its variance: the smallest that keeps every tuned scene within 2 sigma 90 % of
# the time (docs/reconstruct.md; 0.35 left fountain re-referenced at 89 %).
POSE_WEIGHT = 0.6


@dataclass
class ClickedPoint:
    xyz: np.ndarray | None
    cov: np.ndarray | None  # 3x3, metres^2 (model units), every term included
    lifted_on: str  # "multi-view", "plane" (sparse points), "surface" (dense mesh) or "none"
    views: int  # photos the point was found in (1 for a surface lift)
    reason: str | None = None  # why it is not a multi-view point (or why there is no point at all)
    # Distance (model units) between the multi-view point and the surface lift, when they
    # disagree beyond their sigmas; None when they agree or only one exists.
    disagreement: float | None = None
    surface_xyz: np.ndarray | None = None  # the surface lift, kept for the comparison
    surface_sigma: float | None = None
    # The same observations triangulated in the model with its held principal points freed
    # (``covariance.held_intrinsics``), in this model's frame; None when there is no such model.
    alt_xyz: np.ndarray | None = None

    def sigma_along(self, direction: np.ndarray) -> float:
        return 0.0 if self.cov is None else sigma_along(self.cov, direction)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lifted_on": self.lifted_on, "views": self.views}
        if self.cov is not None:
            out["sigma_m"] = round(float(math.sqrt(max(0.0, float(np.trace(self.cov))) / 3.0)), 4)
        if self.reason:
            out["reason"] = self.reason
        if self.disagreement is not None:
            out["surface_disagrees_by"] = round(self.disagreement, 4)
        return out


def shape_sigma(a: ClickedPoint, b: ClickedPoint) -> float:
    """The length's 1-sigma from the model's shape: how much it changes when the principal points
    held at the image centre are freed (0 where every camera's was estimated, or where neither end
    was triangulated). An end without a freed point keeps its place."""
    if a.xyz is None or b.xyz is None or (a.alt_xyz is None and b.alt_xyz is None):
        return 0.0
    pa = a.alt_xyz if a.alt_xyz is not None else a.xyz
    pb = b.alt_xyz if b.alt_xyz is not None else b.xyz
    return abs(float(np.linalg.norm(pb - pa)) - float(np.linalg.norm(np.asarray(b.xyz) - np.asarray(a.xyz))))


class ClickLifter:
    """Lifts clicks on one site model. ``photos_dir`` holds the photos the model was built from
    (the multi-view search reads them; without them every click falls back to the surface lift).
    ``surface_path``: the dense mesh (``surface.ply``), optional."""

    def __init__(
        self,
        rec: pycolmap.Reconstruction,
        photos_dir: Path | None,
        *,
        surface_path: Path | None = None,
        config: MultiViewConfig | None = None,
        click_px: float = 0.5,
        pose_weight: float = POSE_WEIGHT,
        multiview: bool = True,
        shape_check: bool = True,
    ) -> None:
        self.rec = rec
        self.views: dict[str, View] = views(rec)
        self.photos = PhotoSet(photos_dir)
        self.surface_path = surface_path
        self.config = config or MultiViewConfig()
        self.click_px = click_px
        self.pose_weight = pose_weight
        self.multiview = multiview
        self.shape_check = shape_check
        self._obs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._pix: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @functools.cached_property
    def _surface(self) -> SurfaceLifter | None:
        if self.surface_path is None:
            return None
        mesh = load_surface(self.surface_path)
        return SurfaceLifter(*mesh) if mesh is not None else None

    @functools.cached_property
    def held(self) -> HeldIntrinsics | None:
        """The model with its held principal points freed (one bundle adjustment, only where some
        camera's principal point sits exactly at its image centre, as COLMAP leaves it)."""
        return held_intrinsics(self.rec) if self.shape_check else None

    @functools.cached_property
    def _pose_sigmas(self) -> dict[int, float]:
        return point_sigmas(self.rec) or {}

    def surface_lift(self, image: str, uv: tuple[float, float]) -> tuple[Lifted, str]:
        """The single-photo lift: sparse plane, else dense surface."""
        view = self.views[image]
        if image not in self._obs:
            self._obs[image] = observations(self.rec, image)
        ouv, oxyz = self._obs[image]
        got = lift_pixel(view, uv, ouv, oxyz)
        if got.xyz is not None or got.reason == "the point lies outside its photo":
            return got, "plane"
        lifter = self._surface
        dense = lifter.lift(view, uv) if lifter is not None else got
        return (dense, "surface") if dense.xyz is not None else (got, "plane")

    def _occluded(self, view: View, X: np.ndarray) -> bool:
        """The dense surface stands between ``view``'s camera and ``X`` (well before it)."""
        lifter = self._surface
        if lifter is None:
            return False
        import open3d as o3d

        C = view.centre
        dist = float(np.linalg.norm(X - C))
        d = (X - C) / dist
        hit = lifter.scene.cast_rays(o3d.core.Tensor.from_numpy(np.hstack([C, d])[None, :].astype(np.float32)))
        t = float(hit["t_hit"].numpy()[0])
        return math.isfinite(t) and t < dist * 0.97 - 4 * lifter.edge

    def _pose_var(self, image: str, uv: tuple[float, float]) -> float:
        if image not in self._pix:
            self._pix[image] = ids_and_pixels(self.rec, image)
        pix, ids = self._pix[image]
        return endpoint_sigma(uv, pix, ids, self._pose_sigmas) ** 2

    def _click_cov(self, view: View, X: np.ndarray, normal: np.ndarray | None) -> np.ndarray:
        """The designer's click: ``click_px`` pixels in any direction across the ray, at the
        point's range, stretched where the surface is seen obliquely."""
        C = view.centre
        rng = float(np.linalg.norm(X - C))
        d = (X - C) / rng
        s = self.click_px * rng / float(view.K[0, 0])
        cos = 1.0 if normal is None else max(0.3, abs(float(np.asarray(normal) @ d)))
        across = np.eye(3) - np.outer(d, d)
        return np.asarray((s / cos) ** 2 * across)

    def lift(self, image: str, uv: tuple[float, float]) -> ClickedPoint:
        if image not in self.views:
            return ClickedPoint(None, None, "none", 0, "the photo is not registered in the model")
        view = self.views[image]
        if not (0 <= uv[0] <= view.width and 0 <= uv[1] <= view.height):
            return ClickedPoint(None, None, "none", 0, "the point lies outside its photo")
        first, how = self.surface_lift(image, uv)
        pose_var = self._pose_var(image, uv)
        surf: ClickedPoint | None = None
        if first.xyz is not None:
            d = (first.xyz - view.centre) / np.linalg.norm(first.xyz - view.centre)
            cov = first.sigma**2 * np.outer(d, d) + pose_var * np.eye(3)
            cov = cov + self._click_cov(view, first.xyz, first.normal)
            surf = ClickedPoint(first.xyz, cov, how, 1, None, None, first.xyz, first.sigma)
        if not self.multiview:
            return surf or ClickedPoint(None, None, "none", 0, first.reason)
        depth_range = None
        if first.xyz is None:
            # No surface to start from (an edge of the model, a thin post): search the ray over
            # the depths the photo's own points span.
            _, oxyz = self._obs.get(image) or observations(self.rec, image)
            if len(oxyz):
                dz = (oxyz - view.centre) @ (view.R[2])
                dz = dz[dz > 0]
                if len(dz):
                    depth_range = (float(np.percentile(dz, 1)) * 0.5, float(np.percentile(dz, 99)) * 2.0)
        others = [v for n, v in self.views.items() if n != image]
        mv = refine_point(
            view,
            uv,
            first if first.xyz is not None else None,
            others,
            self.photos,
            config=self.config,
            occluded=self._occluded,
            depth_range=depth_range,
        )
        if mv.xyz is None or mv.cov is None:
            reason = f"multi-view: {mv.reason}"
            if surf is None:
                return ClickedPoint(None, None, "none", mv.views, f"{first.reason}; {reason}")
            surf.reason = reason
            return surf
        cov = mv.cov + self.pose_weight * pose_var * np.eye(3) + self._click_cov(view, mv.xyz, first.normal)
        out = ClickedPoint(mv.xyz, cov, "multi-view", mv.views)
        held = self.held
        if held is not None and mv.observations:
            X = retriangulate(mv.observations, held.views, held.from_model(np.asarray(mv.xyz)))
            out.alt_xyz = held.to_model(X) if X is not None else None
        if surf is not None and surf.cov is not None:
            out.surface_xyz, out.surface_sigma = surf.xyz, first.sigma
            gap = np.asarray(mv.xyz) - np.asarray(first.xyz)
            dist = float(np.linalg.norm(gap))
            both = math.sqrt(sigma_along(cov, gap) ** 2 + sigma_along(surf.cov, gap) ** 2)
            if dist > DISAGREE_SIGMAS * both:
                out.disagreement = dist
        return out
