"""The stages a job runs on Ray, for the one driver (workers/project_job.py): the metric site,
then the plan, each a Ray task watched for cancellation and sub-stage progress; the job's inputs
carried from the photos as uploaded onto the anonymised ones (``map_reference``,
``map_placement``); the driver's errors (``JobFailed``, ``JobCancelled``).

No state transition is written here: the driver passes ``stage_done`` and ``fail``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from privacy.metadata import orient_point
from reconstruct.errors import DesignError, PlacementError, ReconstructionError, ScaleReferenceError
from reconstruct.reference import ScaleReference
from reconstruct.sfm import SfmConfig
from workers.routing import STAGE_MEMORY_MB, Pool, stage_options
from workers.tasks import plan_task, reconstruct_task

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class JobCancelled(Exception):
    """The job was cancelled (its contract is ending, its client's data erased) while it ran."""


def _await(ref: Any, cancelled: Callable[[], bool] | None, tick: Callable[[], None] | None = None) -> Any:
    """``ray.get(ref)``, checking every second whether the job was cancelled meanwhile; if so
    the task is killed (its worker process with it) and JobCancelled raised, so a cancelled job
    stops within about a second, not at the end of a minute-long stage, and writes no more.
    ``tick`` is called each second too (sub-stage progress)."""
    if cancelled is None and tick is None:
        return ray.get(ref)
    while True:
        ready, _ = ray.wait([ref], timeout=1.0)
        if ready:
            return ray.get(ref)
        if cancelled is not None and cancelled():
            ray.cancel(ref, force=True)
            raise JobCancelled()
        if tick is not None:
            try:
                tick()
            except JobCancelled:
                ray.cancel(ref, force=True)
                raise


SubProgress = Callable[[str, str, float, float | None], None]  # stage, sub-stage, fraction, ETA s
# Shares of the reconstruct stage's time per sub-stage (the demo's 11 photos: extract 34 s,
# match 6, map 4, scale and up 2, dense 7), for its progress and ETA.
RECONSTRUCT_SHARES = (
    ("extract", 0.55),
    ("match", 0.1),
    ("map", 0.1),
    ("scale", 0.05),
    ("dense", 0.15),
    ("publish", 0.05),
)
PROGRESS_FILE = ".progress.json"


def _count(db: Path, table: str) -> int | None:
    """Rows in a table of the COLMAP database a running task writes: opened read-only and
    immutable, so this reader takes no lock the writer could wait on (a torn read is None)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True, timeout=0.1)
        try:
            return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            con.close()
    except Exception:
        return None


class StageWatch:
    """Sub-stage progress of a running stage task, read from what it leaves in the run folder:
    reconstruct (extract k/N from the features stored, match from the pairs verified, map, scale,
    dense, publish from its work folders) and plan (montage k/N from its progress file). Reports
    (stage, sub-stage, fraction of the stage, ETA in seconds) to ``report`` when it changes."""

    def __init__(self, stage: str, out: Path, n_photos: int, report: SubProgress) -> None:
        self.stage, self.out, self.n, self.report = stage, out, max(1, n_photos), report
        self.t0 = time.perf_counter()
        self.last: tuple[str, float] | None = None

    def _reconstruct(self) -> tuple[str, float]:
        shares = dict(RECONSTRUCT_SHARES)
        before = {k: sum(v for kk, v in RECONSTRUCT_SHARES[:i]) for i, (k, _) in enumerate(RECONSTRUCT_SHARES)}
        sfm = next((p for p in self.out.glob("sfm-*") if p.is_dir()), None)
        stage_dir = self.out / ".staging"
        if sfm is not None:
            if any((sfm / d).exists() for d in ("sparse", "sparse-global")):
                return "map", before["map"]
            db = sfm / "database.db"
            k = _count(db, "descriptors") if db.is_file() else 0
            if k is None or k < self.n:
                k = k or 0
                return f"extract {k}/{self.n}", before["extract"] + shares["extract"] * k / self.n
            pairs = _count(db, "two_view_geometries") or 0
            share = min(0.95, pairs / (self.n * (self.n - 1) / 2))
            return "match", before["match"] + shares["match"] * share
        if stage_dir.is_dir():
            if (stage_dir / "model").is_dir():
                return "publish", before["publish"]
            if any(stage_dir.glob("mvs-*")):
                return "dense", before["dense"]
            return "scale", before["scale"]
        return "start", 0.0

    def _plan(self) -> tuple[str, float]:
        try:
            d = json.loads((self.out / PROGRESS_FILE).read_text())
            return str(d["sub"]), float(d["fraction"])
        except (OSError, ValueError, KeyError, TypeError):
            return "place and draw", 0.0

    def __call__(self) -> None:
        sub, frac = self._reconstruct() if self.stage == "reconstruct" else self._plan()
        if self.last is not None and self.last[0] == sub and abs(self.last[1] - frac) < 0.01:
            return
        self.last = (sub, frac)
        dt = time.perf_counter() - self.t0
        eta = dt / frac - dt if frac > 0.03 else None
        self.report(self.stage, sub, frac, eta)


class JobFailed(RuntimeError):
    """The job stopped; the message says why, for a person to act on."""


def _upright(pt: list[float] | tuple[float, float], intr: dict[str, Any]) -> tuple[float, float]:
    """A pixel of the uploaded photo (before orientation) in the anonymised, upright one."""
    return orient_point(pt[0], pt[1], intr["original_width"], intr["original_height"], intr["orientation"])


def map_placement(placement: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The placement's clicked points, given like the reference's in the uploaded photo's pixels
    before orientation, carried to the anonymised (upright) output, as map_reference does. They
    were passed on as given: a portrait photo's click landed elsewhere, or outside the photo."""
    img = placement.get("image")
    if img is None:
        return placement
    e = next((e for e in entries if e["input"] == img), None)
    if e is None or e["output"] is None:
        raise ScaleReferenceError(f"the placement is on photo '{img}', which could not be used")
    out = dict(placement, image=e["output"])
    if out.get("ground_points") is not None:
        out["ground_points"] = [list(_upright(p, e["intrinsics"])) for p in out["ground_points"]]
    if out.get("ground_point") is not None:
        out["ground_point"] = list(_upright(out["ground_point"], e["intrinsics"]))
    return out


def map_reference(ref: ScaleReference, entries: list[dict[str, Any]]) -> ScaleReference:
    """Reference segments name uploaded photos, in their pixels before orientation: rename them to
    the anonymised outputs and carry the coordinates through the orientation."""
    by_input = {e["input"]: e for e in entries}
    segs = []
    for i, s in enumerate(ref.segments):
        e = by_input.get(s.image)
        if e is None or e["output"] is None:
            raise ScaleReferenceError(f"reference segment {i} is on photo '{s.image}', which could not be used")
        a, b = _upright(s.a, e["intrinsics"]), _upright(s.b, e["intrinsics"])
        segs.append(s.model_copy(update={"image": e["output"], "a": a, "b": b}))
    return ScaleReference(segments=segs, markers=ref.markers)


def unexpected(exc: BaseException | None) -> str:
    """A failure we have no message for, named by its qualified type only (an exception's text
    may hold paths): 'an unexpected error (cv2.error); ...', not 'failed (error)'."""
    if exc is None:
        return "an unexpected error; try again, and report it if it persists"
    name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    return f"an unexpected error ({name}); try again, and report it with the job id if it persists"


def site_and_plan(
    *,
    photos_out: Path,
    good: list[dict[str, Any]],
    reference: ScaleReference,
    design: Path,
    placement: Path,
    out: Path,
    sfm: SfmConfig,
    progress: Progress,
    stage_done: Callable[[str, float], None],
    fail: Callable[[str], JobFailed],
    resumed: bool | str = False,
    pool: Pool = "interactive",
    attempts_dir: Path | None = None,
    cancelled: Callable[[], bool] | None = None,
    sub_progress: SubProgress | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stages 2 and 3 on anonymised photos (Ray must be up): the metric site, then the plan.
    ``resumed``: ``out`` already holds the site from an earlier attempt; go straight to the plan.
    ``attempts_dir``: where each stage task marks its attempts (``workers.tasks.count_attempts``).
    ``cancelled``: polled while a stage runs; when it turns true the stage's task is killed and
    JobCancelled raised. ``sub_progress``: (stage, sub-stage, fraction of the stage, ETA s) at the
    start of each stage and as its task advances (StageWatch).
    ``resumed`` may be a message: why the site is already there (a checkpoint, a reused model)."""
    att = str(attempts_dir) if attempts_dir else None
    n = len(good)
    if resumed:
        info = json.loads((out / "site.json").read_text())
        why = resumed if isinstance(resumed, str) else "done in an earlier attempt, resumed from its checkpoint"
        progress(f"[2/4] reconstruct: {why}")
        return info, _plan_stage(
            out, design, placement, photos_out, progress, stage_done, fail, pool, att, cancelled, sub_progress, n
        )
    if sub_progress is not None:
        sub_progress("reconstruct", "start", 0.0, None)
    watch = StageWatch("reconstruct", out, n, sub_progress) if sub_progress is not None else None
    # 2. Metric site.
    t = time.perf_counter()
    progress(f"[2/4] reconstruct: SIFT, matching and mapping on {len(good)} photos, then scale and up")
    intr = {e["output"]: e["intrinsics"] for e in good}
    try:
        info = _await(
            # GPU-capable: PatchMatch dense stereo on a GPU node, SGBM on CPU otherwise.
            reconstruct_task.options(
                **stage_options("gpu", pool=pool, memory_mb=STAGE_MEMORY_MB["reconstruct"])
            ).remote(str(photos_out), sorted(intr), intr, reference.model_dump(), str(out), sfm.model_dump(), att),
            cancelled,
            watch,
        )
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, (ReconstructionError, ScaleReferenceError)) else None
        raise fail(str(cause) if cause else f"reconstruction failed: {unexpected(exc.cause)}") from None
    except ray.exceptions.RayError as exc:  # workers or nodes lost more often than the retries allow
        raise fail(f"reconstruction lost its worker too often ({type(exc).__name__}); try again") from None
    stage_done("reconstruct", time.perf_counter() - t)
    progress(
        f"      {len(info['registered_images'])} photos placed, scale from {info['scale_source']} "
        f"(+-{100 * info['scale_sigma_rel']:.2f} %)"
    )

    return info, _plan_stage(
        out, design, placement, photos_out, progress, stage_done, fail, pool, att, cancelled, sub_progress, n
    )


def _plan_stage(
    out: Path,
    design: Path,
    placement: Path,
    photos_out: Path,
    progress: Progress,
    stage_done: Callable[[str, float], None],
    fail: Callable[[str], JobFailed],
    pool: Pool = "interactive",
    attempts_dir: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    sub_progress: SubProgress | None = None,
    n_photos: int = 1,
) -> dict[str, Any]:
    # 3. Design merge, drawings, montages.
    t = time.perf_counter()
    progress("[3/4] plan: place the design, draw the plan, render montages")
    if sub_progress is not None:
        sub_progress("plan", "start", 0.0, None)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    watch = StageWatch("plan", out, n_photos, sub_progress) if sub_progress is not None else None
    try:
        plan_result = _await(
            plan_task.options(**stage_options("gpu", pool=pool, memory_mb=STAGE_MEMORY_MB["plan"])).remote(
                str(out), str(design), str(placement), str(out), str(photos_out), attempts_dir
            ),
            cancelled,
            watch,
        )
    except ray.exceptions.RayTaskError as exc:
        # Our own errors speak to the designer; anything else may carry paths: its type only.
        known = isinstance(exc.cause, (PlacementError, DesignError, ReconstructionError))
        raise fail(f"planning failed: {exc.cause if known else unexpected(exc.cause)}") from None
    except ray.exceptions.RayError as exc:
        raise fail(f"planning lost its worker too often ({type(exc).__name__}); try again") from None
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    stage_done("plan", time.perf_counter() - t)
    return plan_result
