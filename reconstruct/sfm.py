"""Sparse reconstruction with pycolmap: SIFT features, matching and mapping, chosen per input.

Choices (recorded in ``SfmResult.choices`` and then in site.json):
- feature image size: the photos' own size up to ``max_image_size`` (SIFT on more pixels costs
  time and adds little once the long side is ~1600 px for scenes a few metres across);
- matching: exhaustive for small sets (every pair is affordable and most robust), sequential
  with a wide overlap for larger ones, since phone photos of a site are taken walking along it;
- cameras: photos that share a size and a focal-length prior share one camera (fewer unknowns,
  better-conditioned bundle adjustment); the prior comes from the privacy gate's sidecar;
- mapper: incremental (robust on the 5-60 photos a designer takes).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from reconstruct.errors import ReconstructionError

log = logging.getLogger(__name__)


class SfmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_size: int = Field(default=1600, ge=320, description="Long side SIFT runs at.")
    max_num_features: int = Field(default=8192, ge=256, description="SIFT features per image.")
    exhaustive_up_to: int = Field(default=40, ge=2, description="Match every pair up to this many photos.")
    sequential_overlap: int = Field(default=12, ge=2, description="Neighbours matched in sequential mode.")
    num_threads: int = Field(default=-1, description="Threads for extraction, matching and mapping; -1 = all.")
    min_photos: int = Field(default=3, ge=2, description="Fewer registered photos than this is an error.")
    seed: int = Field(default=0, description="Random seed for RANSAC and mapping, for repeatable runs.")


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
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = cfg.num_threads
    opts.random_seed = cfg.seed
    opts.min_model_size = cfg.min_photos
    models = pycolmap.incremental_mapping(db_path, image_dir, work_dir / "sparse", options=opts)
    timings["map_s"] = time.perf_counter() - t0
    choices["mapper"] = {"mode": "incremental", "models": len(models)}
    if not models:
        raise ReconstructionError(
            "the photos could not be put together: too little overlap between them, or all taken from one spot"
        )
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    registered = sorted(img.name for img in rec.images.values() if img.has_pose)
    if len(registered) < cfg.min_photos:
        raise ReconstructionError(
            f"only {len(registered)} photos could be placed; at least {cfg.min_photos} overlapping photos are needed"
        )
    unregistered = sorted(set(names) - set(registered))
    log.info("sparse model: %d of %d photos registered, %d points", len(registered), len(names), rec.num_points3D())
    return SfmResult(rec, registered, unregistered, choices, timings)
