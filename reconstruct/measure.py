"""``siteplan measure``: lengths of pixel segments on the metric site, each with a 1-sigma.

Both endpoints are lifted onto the local surface in their photo (see ``geometry.lift_pixel``).
sigma combines, in quadrature: the scale's relative uncertainty, both endpoint lifts (local plane
fit), and the pose/structure uncertainty of bundle adjustment at each endpoint (the median
covariance of the 3D points around it, from ``pycolmap.estimate_ba_covariance``, which carries
the cameras' pose covariance through the Schur complement). The endpoints' pose terms are added
as if independent: conservative, since a shared pose error partly cancels in a length. A segment
that cannot be measured gets ``length_m: null`` and a ``reason``, never a made-up number.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pycolmap

from reconstruct.geometry import lift_pixel, observations, views
from reconstruct.reference import Segment
from reconstruct.site import Site

log = logging.getLogger(__name__)
_NEIGHBOURS = 12  # 3D points around an endpoint whose covariance speaks for it


def point_sigmas(rec: pycolmap.Reconstruction) -> dict[int, float] | None:
    """1-sigma position uncertainty (metres) of every 3D point after bundle adjustment, with the
    poses' covariance carried in; None when the estimate fails (the term is then left out)."""
    try:
        config = pycolmap.BundleAdjustmentConfig()
        for i in rec.reg_image_ids():
            config.add_image(i)
        ba = pycolmap.create_default_ceres_bundle_adjuster(pycolmap.BundleAdjustmentOptions(), config, rec)
        cov = pycolmap.estimate_ba_covariance(pycolmap.BACovarianceOptions(), rec, ba)
    except Exception as exc:  # a library failure must not stop a measurement
        log.warning("pose covariance not available (%s)", type(exc).__name__)
        return None
    if cov is None:
        return None
    out: dict[int, float] = {}
    for pid in rec.points3D:
        c = cov.get_point_cov(pid)
        if c is not None:
            out[int(pid)] = float(math.sqrt(max(0.0, float(np.trace(np.asarray(c)))) / 3.0))
    return out


def _ids_and_pixels(rec: pycolmap.Reconstruction, name: str) -> tuple[np.ndarray, np.ndarray]:
    img = rec.find_image_with_name(name)
    if img is None:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    pts = [(p.xy, p.point3D_id) for p in img.points2D if p.has_point3D()]
    return np.asarray([q for q, _ in pts], float).reshape(-1, 2), np.asarray([i for _, i in pts], np.int64)


def _pose_sigma(uv: tuple[float, float], pix: np.ndarray, ids: np.ndarray, sig: dict[int, float]) -> float:
    if not len(pix):
        return 0.0
    near = np.argsort(np.linalg.norm(pix - np.asarray(uv, float), axis=1))[:_NEIGHBOURS]
    vals = [sig[int(ids[k])] for k in near if int(ids[k]) in sig]
    return float(np.median(vals)) if vals else 0.0


def measure(site: Site, segments: list[Segment]) -> list[dict[str, Any]]:
    vs = views(site.reconstruction)
    scale_rel = float(site.info.get("scale_sigma_rel", 0.0))
    sig = point_sigmas(site.reconstruction) if segments else None
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out: list[dict[str, Any]] = []
    for seg in segments:
        item: dict[str, Any] = seg.model_dump(exclude={"length_m"})
        item["a"], item["b"] = list(seg.a), list(seg.b)
        if seg.image not in vs:
            item.update(length_m=None, sigma_m=None, reason="the photo is not registered in the model")
            out.append(item)
            continue
        if seg.image not in cache:
            cache[seg.image] = observations(site.reconstruction, seg.image)
        ouv, oxyz = cache[seg.image]
        la = lift_pixel(vs[seg.image], seg.a, ouv, oxyz)
        lb = lift_pixel(vs[seg.image], seg.b, ouv, oxyz)
        if la.xyz is None or lb.xyz is None:
            which = "a" if la.xyz is None else "b"
            reason = la.reason if la.xyz is None else lb.reason
            item.update(length_m=None, sigma_m=None, reason=f"endpoint {which}: {reason}")
            out.append(item)
            continue
        length = float(np.linalg.norm(la.xyz - lb.xyz))
        pose = 0.0
        if sig is not None:
            pix, ids = _ids_and_pixels(site.reconstruction, seg.image)
            pose = math.hypot(_pose_sigma(seg.a, pix, ids, sig), _pose_sigma(seg.b, pix, ids, sig))
        lift = math.hypot(la.sigma, lb.sigma)
        sigma = math.sqrt((length * scale_rel) ** 2 + lift**2 + pose**2)
        item.update(
            length_m=round(length, 4),
            sigma_m=round(sigma, 4),
            sigma_parts_m={
                "scale": round(length * scale_rel, 4),
                "lift": round(lift, 4),
                "pose": round(pose, 4) if sig is not None else None,
            },
        )
        out.append(item)
    return out
