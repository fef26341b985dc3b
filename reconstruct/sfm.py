"""Sparse reconstruction with pycolmap: SIFT features, matching and mapping, chosen per input.

Choices (recorded in ``SfmResult.choices`` and then in site.json):
- feature image size: the photos' own size up to ``max_image_size`` (SIFT on more pixels costs
  time and adds little once the long side is ~1600 px for scenes a few metres across);
- matching: exhaustive for small sets (every pair is affordable and most robust), sequential
  with a wide overlap for larger ones, since phone photos of a site are taken walking along it;
- cameras: photos that share a size and a focal-length prior share one camera (fewer unknowns,
  better-conditioned bundle adjustment); the prior comes from the privacy gate's sidecar;
- mapper: incremental for the 5-60 photos a designer takes (as fast as global mapping there),
  GLOMAP's global mapping from ``global_from`` photos; either falls back to the other when it
  places fewer than half the photos (bench/scaling.py: on opensfm-lund incremental placed 2 of
  29, global all 29);
- vocabulary-tree matching is not offered: COLMAP downloads its tree at run time, and nothing
  may be downloaded here; sequential matching covers larger sets.

Degenerate sets are refused with the reason: photos that do not overlap, and photos that overlap
without parallax (taken from one spot), both before and after mapping.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from reconstruct.errors import ReconstructionError

log = logging.getLogger(__name__)


class SfmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_size: int = Field(default=1600, ge=320, description="Long side SIFT runs at.")
    # 4096, not COLMAP's 8192: on fountain-P11 at full size, 8192 -> 4096 cut matching 6.0 -> 2.3 s
    # and mapping 11.7 -> 3.9 s, and kept every accuracy target (centres 0.78 -> 0.74 cm, scale
    # -0.14 -> -0.13 %, median 0.13 -> 0.17 %, p90 1.81 -> 2.22 %, sigma 69 -> 72 % within 1).
    # first_octave 0 instead of -1 was faster still but took p90 to 2.6 % (docs/reconstruct.md).
    max_num_features: int = Field(default=4096, ge=256, description="SIFT features per image.")
    first_octave: int = Field(
        default=-1, ge=-1, le=1, description="SIFT's first octave: -1 doubles the image first (finer features, slower)."
    )
    exhaustive_up_to: int = Field(default=40, ge=2, description="Match every pair up to this many photos.")
    sequential_overlap: int = Field(default=12, ge=2, description="Neighbours matched in sequential mode.")
    num_threads: int = Field(default=-1, description="Threads for extraction, matching and mapping; -1 = all.")
    min_photos: int = Field(default=3, ge=2, description="Fewer registered photos than this is an error.")
    min_baseline_ratio: float = Field(
        default=0.02,
        gt=0,
        description="Camera positions must spread over at least this share of the scene's distance "
        "(below it the photos were taken from one spot: no depth can be measured).",
    )
    seed: int = Field(default=0, description="Random seed for RANSAC and mapping, for repeatable runs.")
    mapper: Literal["auto", "incremental", "global"] = Field(
        default="auto", description="auto: incremental below `global_from` photos, global (GLOMAP) from there."
    )
    global_from: int = Field(default=100, ge=3, description="Photos from which `auto` maps globally.")
    principal_point_from: int = Field(
        default=8,
        ge=0,
        description="Refine a camera's principal point when at least this many placed photos share it (0: never).",
    )


@dataclass
class SfmResult:
    reconstruction: pycolmap.Reconstruction
    registered: list[str]
    unregistered: list[str]
    choices: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _camera_groups(
    names: list[str], intrinsics: dict[str, dict[str, Any]]
) -> dict[tuple[int, int, float | None], list[str]]:
    groups: dict[tuple[int, int, float | None], list[str]] = defaultdict(list)
    for n in names:
        i = intrinsics.get(n) or {}
        f35 = i.get("focal_35mm")
        groups[(int(i.get("width") or 0), int(i.get("height") or 0), float(f35) if f35 else None)].append(n)
    return groups


def run_sfm(
    image_dir: Path,
    names: list[str],
    intrinsics: dict[str, dict[str, Any]],
    work_dir: Path,
    config: SfmConfig | None = None,
) -> SfmResult:
    """Features, matches and the largest model, for ``names`` in ``image_dir``."""
    cfg = config or SfmConfig()
    if len(names) < cfg.min_photos:
        raise ReconstructionError(f"{len(names)} usable photos; at least {cfg.min_photos} are needed")
    work_dir.mkdir(parents=True, exist_ok=True)
    db_path = work_dir / "database.db"
    db_path.unlink(missing_ok=True)
    pycolmap.set_random_seed(cfg.seed)
    timings: dict[str, float] = {}
    choices: dict[str, Any] = {}

    t0 = time.perf_counter()
    long_side = max((max(int(i.get("width") or 0), int(i.get("height") or 0)) for i in intrinsics.values()), default=0)
    size = min(cfg.max_image_size, long_side) if long_side else cfg.max_image_size
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = size
    extraction.num_threads = cfg.num_threads
    extraction.sift.max_num_features = cfg.max_num_features
    extraction.sift.first_octave = cfg.first_octave
    choices["feature_image_size"] = size
    groups = _camera_groups(names, intrinsics)
    cams = []
    for (w, h, f35), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = "SIMPLE_RADIAL"
        if f35 and w and h:
            f_px = f35 / 36.0 * max(w, h)
            reader.camera_params = f"{f_px},{w / 2},{h / 2},0"
        mode = pycolmap.CameraMode.SINGLE if len(group) > 1 and w and h else pycolmap.CameraMode.PER_IMAGE
        pycolmap.extract_features(
            db_path,
            image_dir,
            image_names=group,
            camera_mode=mode,
            reader_options=reader,
            extraction_options=extraction,
            device=pycolmap.Device.cpu,
        )
        cams.append(
            {
                "images": len(group),
                "shared": mode == pycolmap.CameraMode.SINGLE,
                "focal_prior_px": round(f35 / 36.0 * max(w, h), 1) if f35 and w and h else None,
            }
        )
    choices["cameras"] = cams
    timings["extract_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = cfg.num_threads
    if len(names) <= cfg.exhaustive_up_to:
        choices["matching"] = {"mode": "exhaustive", "why": f"{len(names)} photos <= {cfg.exhaustive_up_to}"}
        pycolmap.match_exhaustive(db_path, matching_options=matching, device=pycolmap.Device.cpu)
    else:
        seq = pycolmap.SequentialPairingOptions()
        seq.overlap = cfg.sequential_overlap
        seq.quadratic_overlap = True
        choices["matching"] = {
            "mode": "sequential",
            "overlap": cfg.sequential_overlap,
            "why": f"{len(names)} photos > {cfg.exhaustive_up_to}; site photos are taken in order",
        }
        pycolmap.match_sequential(db_path, matching_options=matching, pairing_options=seq, device=pycolmap.Device.cpu)
    timings["match_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models, choices["mapper"] = _map(db_path, image_dir, work_dir, len(names), cfg)
    timings["map_s"] = time.perf_counter() - t0
    if not models:
        raise ReconstructionError(_why_no_model(db_path, len(names)))
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    if rec.num_points3D() < 10 * rec.num_reg_images():
        # A handful of points holding many cameras: a model in name only.
        raise ReconstructionError(_why_no_model(db_path, len(names)))
    _check_baseline(rec, cfg.min_baseline_ratio)
    t0 = time.perf_counter()
    rec, choices["principal_point"] = _refine_principal_points(rec, cfg.principal_point_from)
    timings["principal_point_s"] = time.perf_counter() - t0
    registered = sorted(img.name for img in rec.images.values() if img.has_pose)
    if len(registered) < cfg.min_photos:
        raise ReconstructionError(
            f"only {len(registered)} photos could be placed; at least {cfg.min_photos} overlapping photos are needed"
        )
    unregistered = sorted(set(names) - set(registered))
    log.info("sparse model: %d of %d photos registered, %d points", len(registered), len(names), rec.num_points3D())
    return SfmResult(rec, registered, unregistered, choices, timings)


def _map(
    db_path: Path, image_dir: Path, work_dir: Path, n: int, cfg: SfmConfig
) -> tuple[dict[int, pycolmap.Reconstruction], dict[str, Any]]:
    """Incremental or global (GLOMAP) mapping, chosen per input, with the other as a fallback when
    the first places fewer than half the photos. bench/scaling.py: both take about the same time
    up to 60 photos and incremental grows about as n^3 beyond; on opensfm-lund (29 photos)
    incremental mapping placed only 2 photos where global mapping placed all 29."""
    first = cfg.mapper
    why = f"set to {first}"
    if first == "auto":
        first = "global" if n >= cfg.global_from else "incremental"
        why = f"{n} photos {'>=' if first == 'global' else '<'} {cfg.global_from}"
    second = "incremental" if first == "global" else "global"
    enough = max(cfg.min_photos, (n + 1) // 2)
    models = _run_mapper(first, db_path, image_dir, work_dir, cfg)
    placed = max((r.num_reg_images() for r in models.values()), default=0)
    if placed >= enough:
        return models, {"mode": first, "why": why, "models": len(models)}
    if _one_spot(db_path, n):
        # Global positioning happily places cameras that only turned (a wrong model): never try it.
        return models, {"mode": first, "why": why + "; the photos show no parallax", "models": len(models)}
    log.warning("%s mapping placed %d of %d photos; trying %s mapping", first, placed, n, second)
    other = _run_mapper(second, db_path, image_dir, work_dir, cfg)
    placed2 = max((r.num_reg_images() for r in other.values()), default=0)
    if placed2 > placed:
        why += f"; {first} mapping placed only {placed} of {n}, {second} mapping {placed2}"
        return other, {"mode": second, "why": why, "models": len(other)}
    why += f"; {second} mapping placed no more ({placed2})"
    return models, {"mode": first, "why": why, "models": len(models)}


def _run_mapper(
    mode: str, db_path: Path, image_dir: Path, work_dir: Path, cfg: SfmConfig
) -> dict[int, pycolmap.Reconstruction]:
    if mode == "global":
        gopts = pycolmap.GlobalPipelineOptions()
        gopts.num_threads = cfg.num_threads
        gopts.random_seed = cfg.seed
        gopts.min_model_size = cfg.min_photos
        return dict(pycolmap.global_mapping(db_path, image_dir, work_dir / "sparse-global", options=gopts))
    iopts = pycolmap.IncrementalPipelineOptions()
    iopts.num_threads = cfg.num_threads
    iopts.random_seed = cfg.seed
    iopts.min_model_size = cfg.min_photos
    return dict(pycolmap.incremental_mapping(db_path, image_dir, work_dir / "sparse", options=iopts))


def _refine_principal_points(
    rec: pycolmap.Reconstruction, min_images: int
) -> tuple[pycolmap.Reconstruction, dict[str, Any]]:
    """A final bundle adjustment that also frees the principal point of every camera shared by
    ``min_images`` or more placed photos (the others stay fixed: one photo cannot pin it).

    COLMAP fixes it at the image centre by default; a phone's lies a few pixels off, which bends
    the model (on fountain-P11 at full size: camera centres 1.6 -> 0.8 cm, scale error -0.30 ->
    -0.14 %, shape 6.6 -> 3.0 mm). A refined point that runs off more than 5 % of the image from
    the centre is not believed unless the reprojection error falls by a fifth when it is freed
    (then up to 20 %): otherwise the model from mapping is kept."""
    counts: dict[int, int] = defaultdict(int)
    for i in rec.reg_image_ids():
        counts[rec.images[i].camera_id] += 1
    refine = sorted(c for c, k in counts.items() if min_images and k >= min_images)
    if not refine:
        return rec, {"refined": False, "why": f"no camera is shared by {min_images} or more placed photos"}
    trial = pycolmap.Reconstruction(rec)
    config = pycolmap.BundleAdjustmentConfig()
    for i in rec.reg_image_ids():
        config.add_image(i)
    for c in counts:
        if c not in refine:
            config.set_constant_cam_intrinsics(c)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_principal_point = True
    try:
        pycolmap.create_default_ceres_bundle_adjuster(opts, config, trial).solve()
    except Exception as exc:  # the model from mapping stands
        log.warning("principal point refinement failed (%s)", type(exc).__name__)
        return rec, {"refined": False, "why": f"the bundle adjustment failed ({type(exc).__name__})"}
    shifts = {}
    rec.update_point_3d_errors()
    trial.update_point_3d_errors()
    before = float(rec.compute_mean_reprojection_error())
    after = float(trial.compute_mean_reprojection_error())
    # Evidence for a point far off centre (a cropped photo, a shifted sensor): the residuals
    # must fall clearly when it is freed. Held-out check (bench/accuracy.py fountain-crop, 10 %
    # cropped off two sides: the point 369 px = 13 % off): refused by the 5 % rule alone, the model
    # kept the centred point and came out 1.2 % off in scale with 6.5 cm camera errors.
    evidence = after <= 0.8 * before
    for c in refine:
        cam = trial.cameras[c]
        off = float(np.hypot(cam.principal_point_x - cam.width / 2, cam.principal_point_y - cam.height / 2))
        limit = (0.2 if evidence else 0.05) * max(cam.width, cam.height)
        if off > limit:
            why = f"the refined principal point ran {off:.0f} px off centre: not believed"
            return rec, {"refined": False, "why": why, "reprojection_px": [round(before, 3), round(after, 3)]}
        shifts[str(c)] = round(off, 1)
    return trial, {
        "refined": True,
        "offset_px": shifts,
        "reprojection_px": [round(before, 3), round(after, 3)],
        "why": f"cameras shared by {min_images}+ placed photos",
    }


# Pairs whose motion is a homography: a pure rotation (or a flat scene, which COLMAP cannot tell
# apart from two views alone).
_ROTATION_LIKE = {
    pycolmap.TwoViewGeometryConfiguration.PANORAMIC,
    pycolmap.TwoViewGeometryConfiguration.PLANAR_OR_PANORAMIC,
}
ONE_SPOT = (
    "the photos overlap but show no depth: they seem to be taken from one spot, the camera turned but "
    "not moved. Take the photos while walking along the site, a step or more between them"
)


def _pair_stats(db_path: Path, n_photos: int) -> tuple[int, int, bool]:
    """(pairs that overlap enough, all pairs, whether the photos were taken from one spot: most
    overlapping pairs are explained by a pure rotation)."""
    db = pycolmap.Database.open(str(db_path))
    try:
        _, geoms = db.read_two_view_geometries()
    finally:
        db.close()
    verified = [g for g in geoms if len(g.inlier_matches) >= 30]
    rotation_like = sum(g.config in _ROTATION_LIKE for g in verified)
    pairs = n_photos * (n_photos - 1) // 2
    one_spot = len(verified) >= max(1, pairs // 4) and rotation_like >= 0.8 * len(verified)
    return len(verified), pairs, one_spot


def _one_spot(db_path: Path, n_photos: int) -> bool:
    return _pair_stats(db_path, n_photos)[2]


def _why_no_model(db_path: Path, n_photos: int) -> str:
    """Why mapping found no (usable) model: the photos do not overlap, or overlap without parallax."""
    verified, pairs, one_spot = _pair_stats(db_path, n_photos)
    if one_spot:
        return ONE_SPOT
    return (
        f"the photos could not be put together: only {verified} of {pairs} photo pairs overlap "
        "enough. Take overlapping photos (each part of the site in at least two of them)"
    )


def _check_baseline(rec: pycolmap.Reconstruction, min_ratio: float = 0.02) -> None:
    """A model whose cameras all sit in one spot has no metric depth, whatever the mapper says:
    refuse it rather than measure on it."""
    centres = np.array([im.projection_center() for im in rec.images.values() if im.has_pose])
    pts = np.array([p.xyz for p in rec.points3D.values()])
    if len(centres) < 2 or len(pts) == 0:
        return
    spread = float(np.max(np.linalg.norm(centres - centres.mean(axis=0), axis=1)))
    depth = float(np.median(np.linalg.norm(pts - centres.mean(axis=0), axis=1)))
    if depth > 0 and spread < min_ratio * depth:
        raise ReconstructionError(ONE_SPOT)
