"""Photos placed wrong are caught: each photo's pose is checked against the rest of the model.

Incremental mapping can lock a photo into a pose a few decimetres off (a weak, one-sided set of
matches early on) while its own reprojection error stays small: its points were triangulated with
it. Its montage then shows the design in the wrong place, and clicks in it measure wrong. So,
after mapping, every photo is relocalised **against the rest**: only the 3D points that two or
more *other* photos also see (their position does not hang on this photo) are used, its pose is
estimated again from them (LO-RANSAC PnP and refinement, ``pycolmap``), and the two poses are
compared. A photo whose mapped centre lies further from the relocalised one than the
relocalisation's own uncertainty allows (``max_sigmas``) and than a share of the scene's depth
(``min_shift_rel``) is inconsistent:

- with enough support (``min_inliers``) it is **re-registered** at the relocalised pose and the
  model is bundle-adjusted again (robust loss), then checked once more;
- otherwise, or if it is still inconsistent, it is **dropped** from the model (no montage, no
  measurement) and ``site.json["pose_check"]["excluded"]`` says why.

Its reprojection error and how many of its points other photos share are recorded for every
photo. Nothing is kept silently.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycolmap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoseCheckConfig:
    min_shared: int = 30  # points seen by 2+ other photos needed to check a photo at all
    min_inliers: int = 30  # PnP inliers needed to re-register a photo
    max_sigmas: float = 6.0  # centre shift beyond this many of the relocalisation's sigmas ...
    min_shift_rel: float = 0.005  # ... and beyond this share of the median scene depth: inconsistent
    max_error_px: float = 4.0  # PnP inlier threshold


@dataclass
class PoseCheck:
    photos: dict[str, dict[str, Any]] = field(default_factory=dict)
    relocalised: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"photos": self.photos, "relocalised": self.relocalised, "excluded": self.excluded}


def _median_depth(rec: pycolmap.Reconstruction) -> float:
    depths = []
    for img in rec.images.values():
        if not img.has_pose:
            continue
        cfw = img.cam_from_world()
        R, t = np.asarray(cfw.rotation.matrix()), np.asarray(cfw.translation)
        X = np.array([rec.points3D[p.point3D_id].xyz for p in img.points2D if p.has_point3D()]).reshape(-1, 3)
        if len(X):
            depths.append(float(np.median((X @ R.T + t)[:, 2])))
    return float(np.median(depths)) if depths else 1.0


def _relocalise(
    rec: pycolmap.Reconstruction, image_id: int, cfg: PoseCheckConfig
) -> tuple[dict[str, Any], pycolmap.Rigid3d | None]:
    """The photo's pose from the points other photos pin down; facts about it, and the pose."""
    img = rec.image(image_id)
    cam = img.camera
    assert cam is not None  # a registered image has its camera
    uv, X = [], []
    n_obs = 0
    for p in img.points2D:
        if not p.has_point3D():
            continue
        n_obs += 1
        track = rec.points3D[p.point3D_id].track
        others = {el.image_id for el in track.elements if el.image_id != image_id}
        if len(others) >= 2:
            uv.append(p.xy)
            X.append(rec.points3D[p.point3D_id].xyz)
    facts: dict[str, Any] = {"points": n_obs, "shared": len(uv)}
    if n_obs:
        obs = [(p.xy, rec.points3D[p.point3D_id].xyz) for p in img.points2D if p.has_point3D()]
        cfw = img.cam_from_world()
        Xc = np.array([q for _, q in obs]) @ np.asarray(cfw.rotation.matrix()).T + np.asarray(cfw.translation)
        front = Xc[:, 2] > 1e-9
        proj = np.asarray(cam.img_from_cam(np.ascontiguousarray(Xc[front]), check_cheirality=False))
        errs = np.linalg.norm(proj - np.array([q for q, _ in obs])[front], axis=1)
        facts["reprojection_px"] = round(float(np.median(errs)), 3) if len(errs) else None
    if len(uv) < cfg.min_shared:
        return facts, None
    est = pycolmap.AbsolutePoseEstimationOptions()
    est.ransac.max_error = cfg.max_error_px
    got = pycolmap.estimate_and_refine_absolute_pose(
        np.asarray(uv, float), np.asarray(X, float), cam, est, return_covariance=True
    )
    if got is None:
        return facts, None
    inliers = int(np.sum(got["inlier_mask"]))
    facts["inliers"] = inliers
    pose = got["cam_from_world"]
    cov = got.get("covariance")
    if cov is not None:
        # The centre C = -R^T t moves with the translation and, through the rotation, by about the
        # scene's depth per radian (a conservative first-order bound).
        c = np.asarray(cov)
        depth = float(np.median(np.linalg.norm(np.asarray(X) - _centre(pose), axis=1)))
        var = float(np.trace(c[3:, 3:])) + depth**2 * float(np.trace(c[:3, :3]))
        facts["relocalised_sigma"] = math.sqrt(max(0.0, var))
    return facts, pose


def _centre(pose: pycolmap.Rigid3d) -> np.ndarray:
    return np.asarray(-np.asarray(pose.rotation.matrix()).T @ np.asarray(pose.translation))


def check_poses(rec: pycolmap.Reconstruction, config: PoseCheckConfig | None = None) -> PoseCheck:
    """Check, and where needed re-register or drop, every registered photo (``rec`` is changed)."""
    cfg = config or PoseCheckConfig()
    out = PoseCheck()
    depth = _median_depth(rec)
    min_shift = cfg.min_shift_rel * depth
    suspects: list[tuple[int, pycolmap.Rigid3d | None, float]] = []
    for image_id in sorted(rec.reg_image_ids()):
        img = rec.image(image_id)
        facts, pose = _relocalise(rec, image_id, cfg)
        if pose is not None:
            shift = float(np.linalg.norm(_centre(pose) - _centre(img.cam_from_world())))
            facts["shift_rel_depth"] = round(shift / depth, 5)
            sig = float(facts.get("relocalised_sigma", 0.0))
            if shift > max(min_shift, cfg.max_sigmas * sig):
                suspects.append((image_id, pose if facts.get("inliers", 0) >= cfg.min_inliers else None, shift))
        elif facts["shared"] < cfg.min_shared:
            facts["note"] = "too few points shared with two other photos to check its pose"
        facts.pop("relocalised_sigma", None)
        out.photos[img.name] = facts
    if not suspects:
        return out
    for image_id, pose, shift in suspects:
        img = rec.image(image_id)
        if pose is None:
            _exclude(
                rec,
                image_id,
                out,
                f"placed {100 * shift / depth:.1f} % of the scene depth away from where the "
                "other photos put it, and too weakly tied to them to place it again",
            )
            continue
        rec.frame(img.frame_id).rig_from_world = pose
        out.relocalised.append({"image": img.name, "moved_rel_depth": round(shift / depth, 5)})
    if out.relocalised:
        _bundle_adjust(rec)
        for item in list(out.relocalised):
            image_id = rec.find_image_with_name(item["image"]).image_id
            _, pose = _relocalise(rec, image_id, cfg)
            img = rec.image(image_id)
            if pose is None or float(np.linalg.norm(_centre(pose) - _centre(img.cam_from_world()))) > min_shift:
                out.relocalised.remove(item)
                _exclude(rec, image_id, out, "its pose disagrees with the other photos even after placing it again")
    if out.relocalised:
        log.warning("%d photo(s) disagreed with the others and were placed again", len(out.relocalised))
    return out


def _exclude(rec: pycolmap.Reconstruction, image_id: int, out: PoseCheck, reason: str) -> None:
    img = rec.image(image_id)
    name = img.name
    for p in list(img.points2D):
        if p.has_point3D():
            pid = p.point3D_id
            if rec.exists_point3D(pid):
                track = rec.points3D[pid].track
                if track.length() <= 2:
                    rec.delete_point3D(pid)
    rec.deregister_frame(img.frame_id)
    out.excluded.append({"image": name, "reason": reason})
    log.warning("a photo was dropped from the model: its pose disagrees with the others")


def _bundle_adjust(rec: pycolmap.Reconstruction) -> None:
    opts = pycolmap.BundleAdjustmentOptions()
    opts.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    opts.print_summary = False
    try:
        pycolmap.bundle_adjustment(rec, opts)
    except Exception as exc:  # keep the relocalised poses if the adjustment cannot run
        log.warning("bundle adjustment after re-registration failed (%s)", type(exc).__name__)
