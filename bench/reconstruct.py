#!/usr/bin/env python3
"""Our metric sparse reconstruction vs plain pycolmap, same photos, same run.

usage: bench/reconstruct.py [--scene DIR] [--images N]

Prints wall time, peak RSS and accuracy (camera centres vs the scene's ground truth, with
../shared/tools/eval_site.py's alignment) for both, and the time ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the package it benchmarks: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench._common import measured  # noqa: E402


def _eval_module() -> Any:
    spec = importlib.util.spec_from_file_location("eval_site", ROOT.parent / "shared" / "tools" / "eval_site.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours(images: str, names: list[str], reference: str, out: str) -> dict[str, Any]:
    import pycolmap

    from reconstruct.reference import load_reference
    from reconstruct.site import reconstruct

    pycolmap.logging.minloglevel = 2
    site = reconstruct(Path(images), load_reference(Path(reference)), Path(out), names=names)
    return {
        "registered": len(site.info["registered_images"]),
        "timings": site.info["timings"],
        "choices": site.info["choices"],
    }


def plain(images: str, names: list[str], out: str) -> dict[str, Any]:
    import pycolmap

    pycolmap.logging.minloglevel = 2
    work = Path(out)
    work.mkdir(parents=True)
    db = work / "database.db"
    pycolmap.extract_features(db, images, image_names=names)
    pycolmap.match_exhaustive(db)
    models = pycolmap.incremental_mapping(db, images, work / "sparse")
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    (work / "model").mkdir()
    rec.write_text(str(work / "model"))
    return {"registered": rec.num_reg_images()}


def score(ev: Any, scene: Path, run: Path) -> dict[str, Any]:
    gt = ev.gt_centres(scene)
    est = ev.est_centres(run)
    names = sorted(set(gt) & set(est))
    G = np.array([gt[n] for n in names])
    E = np.array([est[n] for n in names])
    s, R, t = ev.align(E, G, with_scale=False)
    metric = np.linalg.norm((s * (R @ E.T)).T + t - G, axis=1)
    s2, R2, t2 = ev.align(E, G, with_scale=True)
    shape = np.linalg.norm((s2 * (R2 @ E.T)).T + t2 - G, axis=1)
    return {
        "metric_err_mean_m": round(float(metric.mean()), 4),
        "shape_err_mean_m": round(float(shape.mean()), 4),
        "scale_err_pct": round(100 * (1 / s2 - 1), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", default=str(ROOT.parent / "shared" / "data" / "sfm" / "strecha-fountain-P11"))
    ap.add_argument("--images", type=int, default=0, help="use only the first N photos")
    args = ap.parse_args()
    scene = Path(args.scene)
    images = scene / "images"
    names = sorted(p.name for p in images.glob("*.jpg"))
    if args.images:
        names = names[: args.images]
    ev = _eval_module()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rec-"))
    try:
        a = measured(ours, str(images), names, str(scene / "reference.json"), str(tmp / "ours"))
        b = measured(plain, str(images), names, str(tmp / "plain"))
        rows = {"ours": a, "pycolmap_defaults": b}
        for key, run in (("ours", tmp / "ours"), ("pycolmap_defaults", tmp / "plain")):
            if rows[key]["error"] is None:
                rows[key]["accuracy"] = score(ev, scene, run)
        print(json.dumps({"scene": scene.name, "photos": len(names), **rows}, indent=1, default=str))
        if a["error"] is None and b["error"] is None:
            dense = float(a["result"]["timings"].get("dense_s", 0.0))
            sparse = a["wall_s"] - dense
            print(
                f"\ntime ratio ours (up to the metric sparse model) / pycolmap defaults: {sparse / b['wall_s']:.2f}"
                f"  ({sparse:.1f} s vs {b['wall_s']:.1f} s; target <= 0.5)"
            )
            print(f"ours' dense surface, timed apart: {dense:.1f} s (whole run {a['wall_s']:.1f} s)")
            print(f"peak RSS: {a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
