"""Bundle-adjustment uncertainty at a pixel, for measurements and for the scale itself.

``pycolmap.estimate_ba_covariance`` gives every 3D point's covariance with the cameras' pose
covariance carried in (Schur complement); an endpoint clicked in a photo takes the median over
the points observed nearest to it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pycolmap

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


def ids_and_pixels(rec: pycolmap.Reconstruction, name: str) -> tuple[np.ndarray, np.ndarray]:
    img = rec.find_image_with_name(name)
    if img is None:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    pts = [(p.xy, p.point3D_id) for p in img.points2D if p.has_point3D()]
    return np.asarray([q for q, _ in pts], float).reshape(-1, 2), np.asarray([i for _, i in pts], np.int64)


def endpoint_sigma(uv: tuple[float, float], pix: np.ndarray, ids: np.ndarray, sig: dict[int, float]) -> float:
    """The pose/structure sigma at a pixel: the median over the 3D points observed nearest to it."""
    if not len(pix):
        return 0.0
    near = np.argsort(np.linalg.norm(pix - np.asarray(uv, float), axis=1))[:_NEIGHBOURS]
    vals = [sig[int(ids[k])] for k in near if int(ids[k]) in sig]
    return float(np.median(vals)) if vals else 0.0
