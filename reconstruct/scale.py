"""Metric scale from reference segments measured on site.

Each segment's endpoints are lifted onto the local surface in its photo; the ratio of the true
length to the model length is that segment's scale, with a sigma from the endpoint lifts.
Several segments are combined by inverse-variance weights; a segment that disagrees with the
consensus by more than 5 % is reported and down-weighted by its inconsistency.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycolmap

from reconstruct.errors import ScaleReferenceError
from reconstruct.geometry import lift_pixel, observations, views
from reconstruct.reference import ScaleReference

log = logging.getLogger(__name__)


@dataclass
class ScaleEstimate:
    scale: float  # metres per model unit
    sigma_rel: float  # 1-sigma relative uncertainty of the scale
    source: str
    per_reference: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "metres_per_model_unit": self.scale,
            "sigma_rel": self.sigma_rel,
            "sigma_pct": round(100 * self.sigma_rel, 3),
            "references": self.per_reference,
            "warnings": self.warnings,
        }


def estimate_scale(rec: pycolmap.Reconstruction, ref: ScaleReference) -> ScaleEstimate:
    vs = views(rec)
    items: list[dict[str, Any]] = []
    for i, seg in enumerate(ref.segments):
        item: dict[str, Any] = {"kind": "segment", "index": i, "image": seg.image, "length_m": seg.length_m}
        if seg.image not in vs:
            item["used"] = False
            item["reason"] = "its photo could not be placed in the model"
            items.append(item)
            continue
        ouv, oxyz = observations(rec, seg.image)
        la = lift_pixel(vs[seg.image], seg.a, ouv, oxyz)
        lb = lift_pixel(vs[seg.image], seg.b, ouv, oxyz)
        if la.xyz is None or lb.xyz is None:
            item["used"] = False
            item["reason"] = la.reason or lb.reason
            items.append(item)
            continue
        model_len = float(np.linalg.norm(la.xyz - lb.xyz))
        assert seg.length_m is not None
        s = seg.length_m / model_len
        rel = math.hypot(la.sigma, lb.sigma) / model_len
        item.update(used=True, scale=s, sigma_rel=rel, model_length=model_len)
        items.append(item)
    used = [it for it in items if it.get("used")]
    if not used:
        reasons = "; ".join(f"segment {it['index']}: {it['reason']}" for it in items)
        raise ScaleReferenceError(f"no reference could be measured in the model ({reasons})")
    warnings: list[str] = []
    scales = np.array([it["scale"] for it in used])
    sig = np.array([max(it["sigma_rel"], 1e-4) for it in used])
    median = float(np.median(scales))
    for it in used:
        dev = abs(it["scale"] / median - 1)
        if dev > 0.05:
            warnings.append(f"reference segment {it['index']} disagrees with the others by {100 * dev:.1f} %")
            # Down-weight by inconsistency: its effective sigma is at least its deviation.
            it["sigma_rel"] = max(it["sigma_rel"], dev)
    sig = np.array([max(it["sigma_rel"], 1e-4) for it in used])
    w = 1.0 / sig**2
    log_s = float(np.sum(w * np.log(scales)) / w.sum())
    sigma = float(1.0 / math.sqrt(w.sum()))
    if len(used) > 1:
        # Do not claim more certainty than the references' scatter supports.
        chi2 = float(np.sum(w * (np.log(scales) - log_s) ** 2) / (len(used) - 1))
        sigma *= math.sqrt(max(1.0, chi2))
    for it in used:
        it["scale"] = round(it["scale"], 8)
        it["sigma_rel"] = round(it["sigma_rel"], 6)
    return ScaleEstimate(math.exp(log_s), sigma, f"{len(used)} reference segment(s)", items, warnings)
