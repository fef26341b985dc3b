"""Bundle-adjustment uncertainty at a pixel, for measurements and for the scale itself.

``pycolmap.estimate_ba_covariance`` gives every 3D point's covariance with the cameras' pose
covariance carried in (Schur complement); an endpoint clicked in a photo takes the median over
the points observed nearest to it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pycolmap

from reconstruct.geometry import View, similarity, views

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


@dataclass(frozen=True)
class HeldIntrinsics:
    """The model again with every principal point that was held at its image's centre freed.

    COLMAP keeps a principal point at the image centre unless it is refined (``sfm``: cameras
    shared by 8 or more photos, and not beyond 5 % off centre). Held there, it is an assumption the
    bundle adjustment's covariance knows nothing of, and a phone's lies a few pixels off: the model
    bends (fountain-P11 with 6 of its photos: the reference 0.2 % long, 2.5 of its sigmas). The
    freed model is the data's own answer to "how much does that assumption move this length":
    a clicked point is triangulated again from the same observations in it, and the difference in
    a length is taken as one sigma of the model's shape (``clicks.shape_sigma``)."""

    views: dict[str, View]
    # The freed model's frame mapped onto the model's: X = s R X' + t (a similarity over the
    # points, so that only the shape differs, not the gauge).
    s: float
    R: np.ndarray
    t: np.ndarray
    moved_px: dict[int, float]  # camera id -> how far its principal point moved

    def to_model(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.s * self.R @ X + self.t)

    def from_model(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.R.T @ (X - self.t) / self.s)


MAX_FREED_SHIFT = 0.2  # a principal point freed further than this share of the image is not believed


def held_intrinsics(rec: pycolmap.Reconstruction) -> HeldIntrinsics | None:
    """The model with its held principal points freed (one bundle adjustment), or None when every
    camera's was refined already (then there is nothing to add), or when freeing fails or runs a
    point off by more than ``MAX_FREED_SHIFT`` of its image (then no number is believed)."""
    used = {rec.images[i].camera_id for i in rec.reg_image_ids()}
    held = [
        c
        for c in sorted(used)
        if abs(rec.cameras[c].principal_point_x - rec.cameras[c].width / 2) < 1e-6
        and abs(rec.cameras[c].principal_point_y - rec.cameras[c].height / 2) < 1e-6
    ]
    if not held:
        return None
    trial = pycolmap.Reconstruction(rec)
    config = pycolmap.BundleAdjustmentConfig()
    for i in rec.reg_image_ids():
        config.add_image(i)
    for c in used - set(held):
        config.set_constant_cam_intrinsics(c)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_principal_point = True
    opts.print_summary = False
    try:
        pycolmap.create_default_ceres_bundle_adjuster(opts, config, trial).solve()
    except Exception as exc:  # the term is then left out, and said so
        log.warning("principal point could not be freed for the shape check (%s)", type(exc).__name__)
        return None
    moved: dict[int, float] = {}
    for c in held:
        a, b = rec.cameras[c], trial.cameras[c]
        d = math.hypot(a.principal_point_x - b.principal_point_x, a.principal_point_y - b.principal_point_y)
        if d > MAX_FREED_SHIFT * max(a.width, a.height):
            log.warning("freed principal point ran %.0f px off: not believed, no shape term", d)
            return None
        moved[c] = d
    ids = [p for p in rec.points3D if p in trial.points3D]
    if len(ids) < 10:
        return None
    A = np.array([rec.points3D[p].xyz for p in ids])
    B = np.array([trial.points3D[p].xyz for p in ids])
    s, R, t = similarity(B, A)
    return HeldIntrinsics(views(trial), s, R, t, moved)
