"""The reconstruct stage: photos + scale reference -> a metric site in RUN_DIR.

RUN_DIR layout (DESIGN.md §3.2): ``model/`` (COLMAP text, metres, +Z up), ``site.json``, and
``points.ply`` (the site's coloured points, same frame).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from reconstruct.dense import DenseConfig, dense_surface, load_surface, transform_surface
from reconstruct.errors import ReconstructionError
from reconstruct.geometry import views
from reconstruct.orient import Orientation, camera_up, orient
from reconstruct.poses import check_poses
from reconstruct.reference import ScaleReference, check_reference
from reconstruct.scale import estimate_scale
from reconstruct.sfm import SfmConfig, run_sfm
from reconstruct.vertical import vertical_from_lines

log = logging.getLogger(__name__)


@dataclass
class Site:
    run_dir: Path
    reconstruction: pycolmap.Reconstruction
    info: dict[str, Any]

    @property
    def images_dir(self) -> Path:
        """The photos the site was built from: site.json's ``images_dir`` is relative to the run
        folder (an absolute one survives the join); older runs kept them in ``images/``."""
        return self.run_dir / str(self.info.get("images_dir") or "images")


STAGING = ".staging"
PREVIOUS = ".previous"  # the earlier run's outputs while the new ones move in
# A run's outputs; site.json, written last, marks a complete one (load_site demands it).
OUTPUT_NAMES = ("model", "points.ply", "surface.ply")


def _remove(p: Path) -> None:
    """A file, a link (never what it points to) or a folder, if present."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _publish(stage: Path, run_dir: Path) -> None:
    """Replace the previous run's outputs by the staged ones. site.json goes first and comes back
    last, so a process killed in between leaves a folder load_site refuses, never a model of one
    run beside the facts of another. The earlier outputs are moved aside, not deleted, until the
    new ones are all in: an error on the way (a permission, a full disk) puts them back."""
    prev = run_dir / PREVIOUS
    _remove(prev)
    prev.mkdir()
    marker = run_dir / "site.json"
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in ("site.json", *OUTPUT_NAMES):
            old = run_dir / name
            if old.is_symlink() or old.exists():
                old.replace(prev / name)
                moved.append(name)
        for name in OUTPUT_NAMES:
            if (stage / name).exists():
                (stage / name).replace(run_dir / name)
                placed.append(name)
        (stage / "site.json").replace(marker)
    except BaseException:
        for name in placed:
            _remove(run_dir / name)
        for name in reversed(moved):  # site.json, the marker, last
            (prev / name).replace(run_dir / name)
        with contextlib.suppress(OSError):
            prev.rmdir()  # empty now; if a move back failed, what it holds stays
        raise
    _remove(prev)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def reconstruct(
    image_dir: Path,
    reference: ScaleReference,
    run_dir: Path,
    *,
    intrinsics: dict[str, dict[str, Any]] | None = None,
    names: list[str] | None = None,
    config: SfmConfig | None = None,
    dense: DenseConfig | None = None,
    pipeline_version: str | None = None,
) -> Site:
    """Build the metric, +Z-up site model from the photos in ``image_dir``.
    ``pipeline_version``: the caller's (``siteplan.PIPELINE_VERSION``), recorded in site.json."""
    t_all = time.perf_counter()
    if names is None:
        names = photo_names(image_dir)
    if intrinsics is None:
        intrinsics = _intrinsics_from_files(image_dir, names)
    sizes = {
        n: (int(i["width"]), int(i["height"])) for n, i in intrinsics.items() if i.get("width") and i.get("height")
    }
    check_reference(reference, set(names), sizes)
    cfg = config or SfmConfig()
    if len(names) < cfg.min_photos:
        raise ReconstructionError(f"{len(names)} usable photos; at least {cfg.min_photos} are needed")

    run_dir.mkdir(parents=True, exist_ok=True)
    # Work dirs an earlier attempt left when its process was killed (a retried stage): COLMAP
    # databases, undistorted photo copies and unpublished outputs, never to be packed into a
    # checkpoint or mistaken for a model.
    for stale in [*run_dir.glob("sfm-*"), *run_dir.glob("mvs-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    for stale in (run_dir / STAGING, run_dir / PREVIOUS, run_dir / ".model.tmp"):
        _remove(stale)
    # Everything is built beside the previous run's outputs and replaces them only once all of
    # it exists (_publish): a re-run that fails leaves the earlier model whole, never half of it.
    stage = run_dir / STAGING
    stage.mkdir()
    try:
        return _build(image_dir, reference, run_dir, stage, names, intrinsics, cfg, dense, t_all, pipeline_version)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _build(
    image_dir: Path,
    reference: ScaleReference,
    run_dir: Path,
    stage: Path,
    names: list[str],
    intrinsics: dict[str, dict[str, Any]],
    cfg: SfmConfig,
    dense: DenseConfig | None,
    t_all: float,
    pipeline_version: str | None = None,
) -> Site:
    work = Path(tempfile.mkdtemp(prefix="sfm-", dir=run_dir))
    try:
        sfm = run_sfm(image_dir, names, intrinsics, work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = sfm.reconstruction
    timings = dict(sfm.timings)

    t0 = time.perf_counter()
    poses = check_poses(rec)
    registered = [n for n in sfm.registered if n not in {e["image"] for e in poses.excluded}]
    if len(registered) < cfg.min_photos:
        raise ReconstructionError(
            f"only {len(registered)} photos agree on the site's geometry; at least {cfg.min_photos} are needed"
        )
    timings["pose_check_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scale = estimate_scale(rec, reference, image_dir=image_dir)
    timings["scale_s"] = time.perf_counter() - t0  # the references' clicks triangulated included
    rec.transform(pycolmap.Sim3d(scale.scale, pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    pts = np.array([p.xyz for p in rec.points3D.values()])
    vs = [views(rec)[n] for n in registered]
    vertical = vertical_from_lines(image_dir, vs, camera_up(vs))
    ori = orient(pts, vs, vertical=vertical)
    rec.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(ori.R), ori.t))
    timings["scale_orient_s"] = time.perf_counter() - t0

    dense_cfg = dense or DenseConfig()
    dense_info: dict[str, Any] = {"enabled": dense_cfg.enabled}
    surface_path = stage / "surface.ply"
    if dense_cfg.enabled:
        t0 = time.perf_counter()
        dense_info.update(dense_surface(rec, image_dir, surface_path, dense_cfg))
        timings["dense_s"] = time.perf_counter() - t0
        ori = _refine_with_surface(rec, surface_path, registered, ori)
    scale_warnings = list(scale.warnings) + plausible_heights(rec, registered, ori.ground)

    (stage / "model").mkdir()
    rec.write_text(str(stage / "model"))
    rec.export_PLY(str(stage / "points.ply"))
    timings["total_s"] = time.perf_counter() - t_all
    info: dict[str, Any] = {
        "pipeline_version": pipeline_version,
        "units": "metres",
        "up": "+Z",
        "scale": {**scale.to_json(), "warnings": scale_warnings},
        "scale_source": scale.source,
        "scale_sigma_rel": scale.sigma_rel,
        "ground_plane": ori.ground,
        "up_source": ori.up_source,
        "facades": ori.facades,
        "registered_images": registered,
        "unregistered_images": sfm.unregistered + [e["image"] for e in poses.excluded],
        "pose_check": poses.to_json(),
        "num_points": int(rec.num_points3D()),
        "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4),
        "choices": sfm.choices,
        "dense": dense_info,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # Where `siteplan plan` finds the photos again, relative to the run folder.
        "images_dir": os.path.relpath(image_dir.resolve(), run_dir.resolve()),
    }
    _write_json(stage / "site.json", info)
    _publish(stage, run_dir)
    log.info(
        "site: scale %.5f m/unit (+-%.2f %%), %d photos, ground found: %s",
        scale.scale,
        100 * scale.sigma_rel,
        len(registered),
        ori.ground["found"],
    )
    return Site(run_dir, rec, info)


# People hold a phone between about these heights above the ground they stand on.
PLAUSIBLE_CAMERA_HEIGHT_M = (0.7, 2.6)


def plausible_heights(rec: pycolmap.Reconstruction, registered: list[str], ground: dict[str, Any]) -> list[str]:
    """With the ground found, the scale implies how high the photos were taken: a check on a
    single reference that nothing else can give. A median height a person with a phone cannot
    reach means the reference length (or its clicks) is wrong."""
    if not ground.get("found"):
        return []
    vs = views(rec)
    n = np.asarray(ground.get("plane", [0.0, 0.0, 1.0, 0.0])[:3], float)
    d = float(ground.get("plane", [0.0, 0.0, 1.0, 0.0])[3])
    heights = [float(vs[name].centre @ n - d) for name in registered if name in vs]
    if len(heights) < 3:
        return []
    h = float(np.median(heights))
    lo, hi = PLAUSIBLE_CAMERA_HEIGHT_M
    if lo <= h <= hi:
        return []
    return [
        f"with this scale the photos were taken {h:.2f} m above the ground (median), where a person holds a phone "
        f"at {lo}-{hi} m: check the reference length and its clicks"
    ]


def _refine_with_surface(
    rec: pycolmap.Reconstruction, surface_path: Path, registered: list[str], ori: Orientation
) -> Orientation:
    """Find the ground and facades again on the dense surface, which sees far more of the ground
    than the sparse points; when it finds the ground, move the model and the surface onto it."""
    surf = load_surface(surface_path)
    if surf is None:
        return ori
    verts = surf[0]
    if len(verts) > 150_000:
        verts = verts[np.random.default_rng(0).choice(len(verts), 150_000, replace=False)]
    pts = np.vstack([np.array([p.xyz for p in rec.points3D.values()]), verts])
    vs = [views(rec)[n] for n in registered]
    vertical = None
    if ori.vertical is not None:  # the model has since been turned by ori.R
        vertical = replace(ori.vertical, up=ori.R @ ori.vertical.up)
    again = orient(pts, vs, vertical=vertical)
    if not again.ground["found"]:
        return ori
    rec.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(again.R), again.t))
    transform_surface(surface_path, again.R, again.t)
    again.up_source += "; the ground was found on the dense surface"
    return again


PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def photo_names(image_dir: Path) -> list[str]:
    """The photos of a folder given to ``siteplan reconstruct``: upright JPEG or PNG, as the privacy
    gate writes them. A rotated or HEIC photo is refused with what to do: SfM reads pixels as
    stored, and the reference's clicks were made on the upright photo."""
    from PIL import Image

    from privacy.anonymize import IMAGE_SUFFIXES, list_images

    names = []
    for p in list_images(image_dir):
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES - PHOTO_SUFFIXES:  # HEIC, TIFF, WebP: the gate decodes them
            raise ReconstructionError(
                f"{p.name}: {suffix} photos are read by the privacy gate only; "
                "run `siteplan anonymize` on the folder first (it writes upright JPEGs)"
            )
        if suffix not in PHOTO_SUFFIXES:
            continue
        try:
            with Image.open(p) as im:
                orientation = im.getexif().get(0x0112, 1)
        except OSError:
            raise ReconstructionError(f"{p.name} is not a readable image") from None
        if orientation not in (0, 1):
            raise ReconstructionError(
                f"{p.name} is stored rotated (EXIF orientation {orientation}); "
                "run `siteplan anonymize` on the folder first (it writes upright photos)"
            )
        names.append(p.name)
    return names


def _intrinsics_from_files(image_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Read the focal-length prior from the minimal EXIF the privacy gate writes."""
    from PIL import Image

    from privacy.metadata import focal_lengths

    out: dict[str, dict[str, Any]] = {}
    for n in names:
        try:
            with Image.open(image_dir / n) as im:
                f, f35 = focal_lengths(im.getexif())
                out[n] = {"width": im.width, "height": im.height, "focal_mm": f, "focal_35mm": f35}
        except OSError:
            out[n] = {}
    return out


def load_site(run_dir: Path) -> Site:
    model, info_path = run_dir / "model", run_dir / "site.json"
    if not (model / "images.txt").is_file() or not info_path.is_file():
        raise ReconstructionError(f"{run_dir.name} holds no complete model; run `siteplan reconstruct` first")
    rec = pycolmap.Reconstruction(str(model))
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise ReconstructionError(
            f"{run_dir.name}/site.json cannot be read; run `siteplan reconstruct` again"
        ) from None
    return Site(run_dir, rec, info)
