"""Scoring helpers shared by the accuracy tests and ``bench/accuracy.py``: ground-truth scenes
prepared as the pipeline takes them, similarity fits, and re-referencing a measured scene by each
of its check segments in turn."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from reconstruct.geometry import similarity
from reconstruct.reference import ScaleReference, Segment
from tests.reconstruct.synthetic import make_scene, render_textured


@dataclass
class Prepared:
    images: Path
    reference: ScaleReference
    checks: list[Segment]
    truth: list[float]  # true length of each check
    centres: dict[str, np.ndarray]  # true camera centres, metres


def align(src: np.ndarray, dst: np.ndarray, with_scale: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama, as ../shared/tools/eval_site.py: dst ~ s R src + t."""
    return similarity(src, dst, with_scale)


def _ends(m: dict[str, Any]) -> float:
    """A measured length's own sigma, the scale's left out: its endpoints and the model's shape."""
    parts = m["sigma_parts_m"]
    return math.hypot(float(parts["endpoints"]), float(parts.get("shape") or 0.0))


def rereference(measured: list[dict[str, Any]], truth: list[float], s_true: float = 1.0) -> dict[str, Any]:
    """Every answered check in turn as the only reference: the model's lengths rescaled by it,
    exactly what ``estimate_scale`` does with that one segment (its endpoints are lifted by the
    same code as the checks'), with the sigma it would give (the reference's endpoint and shape
    sigma as the scale's, as ``estimate_scale`` gives it). ``s_true``: truth = s_true x the model
    (from a similarity fit of the cameras), for the scale errors. Returns the scale errors (%),
    the other checks' errors (%) and z-scores."""
    ok = [(m, L) for m, L in zip(measured, truth, strict=True) if m.get("length_m") is not None]
    scale_err, rel, z = [], [], []
    for k, (mk, Lk) in enumerate(ok):
        f = Lk / mk["length_m"]
        ends_k = _ends(mk) / mk["length_m"]
        scale_err.append(abs(100 * (f / s_true - 1)))
        for j, (mj, Lj) in enumerate(ok):
            if j == k:
                continue
            length = mj["length_m"] * f
            sig = math.hypot(_ends(mj) * f, length * ends_k)
            rel.append(abs(length / Lj - 1) * 100)
            z.append(abs(length - Lj) / max(sig, 1e-9))
    return {"references": len(ok), "scale_err_pct": scale_err, "rel_pct": rel, "z": z}


def prepare_synthetic(seed: int, work: Path) -> Prepared:
    """A rendered site whose truth is exact: 8 photos of a textured ground, wall and step."""

    rng = np.random.default_rng(seed)
    scene = make_scene(seed=seed, n_cams=8)
    lo = np.array([rng.uniform(-1.5, -0.5), rng.uniform(0.8, 1.5), 0.0])
    box = (lo, lo + np.array([rng.uniform(1.5, 2.5), rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.35)]))
    out = work / "images"
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(len(scene.cams_truth)):
        n = f"{k:04d}.jpg"
        names.append(n)
        if not (out / n).exists():
            cv2.imwrite(str(out / n), render_textured(scene, k, box=box, sky_above=2.8), [cv2.IMWRITE_JPEG_QUALITY, 92])
    centres = {f"{k:04d}.jpg": -R.T @ t for k, (R, t) in enumerate(scene.cams_truth)}

    def on_site(n: int) -> np.ndarray:  # points on the wall, the ground and the step's top
        kind = rng.integers(0, 3, n)
        P = np.column_stack([rng.uniform(-2.5, 2.5, n), rng.uniform(-0.5, 4.0, n), np.zeros(n)])
        P[kind == 1, 1] = 5.0
        P[kind == 1, 2] = rng.uniform(0.2, 2.5, int((kind == 1).sum()))
        top = kind == 2
        P[top, 0] = rng.uniform(box[0][0] + 0.1, box[1][0] - 0.1, int(top.sum()))
        P[top, 1] = rng.uniform(box[0][1] + 0.1, box[1][1] - 0.1, int(top.sum()))
        P[top, 2] = box[1][2]
        # Ground points hidden by the step are not clickable: move them in front of it.
        hidden = (kind == 0) & (P[:, 0] > box[0][0]) & (P[:, 0] < box[1][0]) & (P[:, 1] > box[0][1] - 0.8)
        P[hidden, 1] = box[0][1] - 0.9
        return P

    def segs(n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            k = int(rng.integers(0, len(names)))
            A, B = on_site(2)
            L = float(np.linalg.norm(A - B))
            if L < 0.8:
                continue
            a, b = scene.pixel(k, A), scene.pixel(k, B)
            if all(20 < p[0] < 1580 and 20 < p[1] < 1180 for p in (a, b)):
                out.append({"image": names[k], "a": list(a), "b": list(b), "length_m": L})
        return out

    ref = segs(1)
    checks = segs(30)
    return Prepared(
        out,
        ScaleReference.model_validate({"segments": ref}),
        [Segment.model_validate({k: v for k, v in c.items() if k != "length_m"}) for c in checks],
        [float(c["length_m"]) for c in checks],
        centres,
    )
