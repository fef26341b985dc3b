#!/usr/bin/env python3
"""How reconstruction time grows with the number of photos (issue 4: 10 -> 30 -> 60).

1. Real sets from ``../shared/data/sfm`` (10, 11, 13 and 29 photos), through this pipeline's
   sparse stage (``reconstruct.sfm.run_sfm``: features at 1600 px, matching and mapping as
   chosen per input), each in a fresh process: wall time per step, photos placed, peak RSS. The
   29-photo set also runs with sequential matching and with global mapping, side by side.
2. Mapping alone on synthetic scenes of 10, 30, 60 and 120 photos (pycolmap's dataset
   synthesiser writes the matches straight into the database): incremental against global
   (GLOMAP). The shared data has no 60-photo set, so this is where 60 and beyond are measured.

Run: .venv/bin/python bench/scaling.py [--skip-real] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench._common import measured  # noqa: E402

SFM = ROOT.parent / "shared" / "data" / "sfm"
SETS = [
    ("sacre-coeur", "mapping"),
    ("strecha-fountain-P11", "images"),
    ("sceaux-castle", "images"),
    ("opensfm-lund", "images"),
]


def intrinsics(images: Path) -> dict[str, dict[str, Any]]:
    """What the privacy gate's sidecar would carry: size and 35 mm-equivalent focal length."""
    from PIL import Image

    from privacy.metadata import focal_lengths

    out: dict[str, dict[str, Any]] = {}
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        with Image.open(p) as im:
            _, f35 = focal_lengths(im.getexif())
            out[p.name] = {"width": im.width, "height": im.height, "focal_35mm": f35}
    return out


def sparse(images: str, work: str, overrides: dict[str, Any]) -> dict[str, Any]:
    import pycolmap

    from reconstruct.sfm import SfmConfig, run_sfm

    pycolmap.logging.minloglevel = 2
    intr = intrinsics(Path(images))
    r = run_sfm(Path(images), sorted(intr), intr, Path(work), SfmConfig(**overrides))
    return {
        "placed": len(r.registered),
        "photos": len(intr),
        "timings": {k: round(v, 1) for k, v in r.timings.items()},
        "matching": r.choices["matching"]["mode"],
        "mapper": r.choices["mapper"]["mode"],
    }


def synthetic(n: int, mode: str) -> tuple[float, int]:
    import pycolmap

    pycolmap.logging.minloglevel = 3
    d = Path(tempfile.mkdtemp(prefix="bench-syn-"))
    try:
        db = pycolmap.Database.open(str(d / "db.db"))
        o = pycolmap.SyntheticDatasetOptions()
        o.num_rigs, o.num_cameras_per_rig, o.num_frames_per_rig = 1, 1, n
        o.num_points3D = 50 * n
        o.camera_width, o.camera_height = 1600, 1200
        pycolmap.synthesize_dataset(o, db)
        db.close()
        (d / "img").mkdir()
        t = time.perf_counter()
        if mode == "incremental":
            io = pycolmap.IncrementalPipelineOptions()
            models = pycolmap.incremental_mapping(d / "db.db", d / "img", d / "out", options=io)
        else:
            go = pycolmap.GlobalPipelineOptions()
            models = pycolmap.global_mapping(d / "db.db", d / "img", d / "out", options=go)
        dt = time.perf_counter() - t
        return dt, max((r.num_reg_images() for r in models.values()), default=0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    a = ap.parse_args()
    if not a.skip_real:
        print("1. real sets, sparse stage (features 1600 px), one fresh process each")
        runs: list[tuple[str, Path, dict[str, Any]]] = [(s, SFM / s / sub, {}) for s, sub in SETS]
        lund = SFM / "opensfm-lund" / "images"
        runs += [
            ("opensfm-lund, sequential", lund, {"exhaustive_up_to": 10}),
            ("opensfm-lund, global", lund, {"mapper": "global"}),
        ]
        rows = []
        for label, images, over in runs:
            tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
            try:
                m = measured(sparse, str(images), str(tmp), over)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if m["error"]:
                print(f"   {label:<26} error: {m['error']}")
                continue
            r = m["result"]
            t = r["timings"]
            rows.append((r["photos"], m["wall_s"]))
            print(
                f"   {label:<26} {r['placed']:>2}/{r['photos']:<2} placed  {m['wall_s']:6.1f} s wall"
                f" (extract {t['extract_s']}, match {t['match_s']} {r['matching']}, map {t['map_s']} {r['mapper']})"
                f"  {m['wall_s'] / r['photos']:.2f} s/photo  peak {m['peak_rss_mb']:.0f} MB"
            )
    if not a.skip_synthetic:
        print("2. mapping alone, synthetic scenes (all pairs matched, 50 points per photo)")
        prev: dict[str, tuple[int, float]] = {}
        for n in (10, 30, 60, 120):
            cells = []
            for mode in ("incremental", "global"):
                m = measured(synthetic, n, mode)
                if m["error"]:
                    cells.append(f"{mode} error {m['error']}")
                    continue
                dt, placed = m["result"]
                grow = ""
                if mode in prev and placed:
                    n0, t0 = prev[mode]
                    grow = f", ~n^{math.log(dt / t0) / math.log(n / n0):.1f}"
                if placed:
                    prev[mode] = (n, dt)
                cells.append(f"{mode} {dt:6.2f} s ({placed}/{n} placed{grow})")
            print(f"   {n:>3} photos: " + "; ".join(cells))


if __name__ == "__main__":
    main()
