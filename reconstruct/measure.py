"""``siteplan measure``: lengths of pixel segments on the metric site, each with a 1-sigma.

Both endpoints are lifted onto the local surface in their photo: a plane fitted to the sparse
points seen around the pixel (``geometry.lift_pixel``), and where those are too few, the pixel's
ray cast at the dense surface (``geometry.SurfaceLifter``); each endpoint reports which.
sigma combines, in quadrature: the scale's relative uncertainty, both endpoint lifts (local plane
fit), and the pose/structure uncertainty of bundle adjustment at each endpoint (the median
covariance of the 3D points around it, from ``pycolmap.estimate_ba_covariance``, which carries
the cameras' pose covariance through the Schur complement). The endpoints' pose terms are added
as if independent: conservative, since a shared pose error partly cancels in a length. A segment
that cannot be measured gets ``length_m: null`` and a ``reason``, never a made-up number.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import numpy as np

from reconstruct.covariance import endpoint_sigma, ids_and_pixels, point_sigmas
from reconstruct.dense import load_surface
from reconstruct.geometry import Lifted, SurfaceLifter, lift_pixel, observations, views
from reconstruct.reference import Segment
from reconstruct.site import Site

log = logging.getLogger(__name__)


def measure(site: Site, segments: list[Segment]) -> list[dict[str, Any]]:
    vs = views(site.reconstruction)
    scale_rel = float(site.info.get("scale_sigma_rel", 0.0))
    sig = point_sigmas(site.reconstruction) if segments else None
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out: list[dict[str, Any]] = []

    @functools.cache
    def surface() -> SurfaceLifter | None:  # loaded on first need
        mesh = load_surface(site.run_dir / "surface.ply")
        return SurfaceLifter(*mesh) if mesh is not None else None

    def lift_endpoint(image: str, uv: tuple[float, float]) -> tuple[Lifted, str]:
        ouv, oxyz = cache[image]
        got = lift_pixel(vs[image], uv, ouv, oxyz)
        if got.xyz is not None or got.reason == "the point lies outside its photo":
            return got, "plane"
        lifter = surface()
        dense = lifter.lift(vs[image], uv) if lifter is not None else got
        return (dense, "surface") if dense.xyz is not None else (got, "plane")

    for seg in segments:
        item: dict[str, Any] = seg.model_dump(exclude={"length_m"})
        item["a"], item["b"] = list(seg.a), list(seg.b)
        if seg.image not in vs:
            item.update(length_m=None, sigma_m=None, reason="the photo is not registered in the model")
            out.append(item)
            continue
        if seg.image not in cache:
            cache[seg.image] = observations(site.reconstruction, seg.image)
        la, how_a = lift_endpoint(seg.image, seg.a)
        lb, how_b = lift_endpoint(seg.image, seg.b)
        if la.xyz is None or lb.xyz is None:
            which = "a" if la.xyz is None else "b"
            reason = la.reason if la.xyz is None else lb.reason
            item.update(length_m=None, sigma_m=None, reason=f"endpoint {which}: {reason}")
            out.append(item)
            continue
        length = float(np.linalg.norm(la.xyz - lb.xyz))
        pose = 0.0
        if sig is not None:
            pix, ids = ids_and_pixels(site.reconstruction, seg.image)
            pose = math.hypot(endpoint_sigma(seg.a, pix, ids, sig), endpoint_sigma(seg.b, pix, ids, sig))
        lift = math.hypot(la.sigma, lb.sigma)
        sigma = math.sqrt((length * scale_rel) ** 2 + lift**2 + pose**2)
        item.update(
            length_m=round(length, 4),
            sigma_m=round(sigma, 4),
            lifted_on={"a": how_a, "b": how_b},
            sigma_parts_m={
                "scale": round(length * scale_rel, 4),
                "lift": round(lift, 4),
                "pose": round(pose, 4) if sig is not None else None,
            },
        )
        out.append(item)
    return out
