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
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from reconstruct.covariance import endpoint_sigma, ids_and_pixels, point_sigmas
from reconstruct.errors import ScaleReferenceError
from reconstruct.geometry import lift_pixel, observations, views
from reconstruct.markers import detect_all, marker_scale
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


def estimate_scale(
    rec: pycolmap.Reconstruction, ref: ScaleReference, *, image_dir: Path | None = None
) -> ScaleEstimate:
    """Combine every reference (segments and markers) into one scale with its sigma."""
    vs = views(rec)
    items: list[dict[str, Any]] = []
    if ref.markers:
        if image_dir is None:
            raise ScaleReferenceError("marker references need the photos to detect the markers in")
        detections = {d: detect_all(image_dir, sorted(vs), d) for d in {m.dictionary for m in ref.markers}}
        for i, m in enumerate(ref.markers):
            ms = marker_scale(m, vs, rec, detections[m.dictionary])
            item: dict[str, Any] = {"kind": "marker", "index": i, "id": m.id, "size_m": m.size_m, "photos": ms.views}
            if ms.scale is None:
                item.update(used=False, reason=ms.reason)
            else:
                item.update(used=True, scale=ms.scale, sigma_rel=ms.sigma_rel)
            items.append(item)
    cov: dict[int, float] | None = None  # computed once, when a segment needs it
    for i, seg in enumerate(ref.segments):
        item = {"kind": "segment", "index": i, "image": seg.image, "length_m": seg.length_m}
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
        # The endpoints' lifts, and the bundle adjustment's pose/structure uncertainty there.
        if cov is None:
            cov = point_sigmas(rec) or {}
        pix, ids = ids_and_pixels(rec, seg.image)
        pose = math.hypot(endpoint_sigma(seg.a, pix, ids, cov), endpoint_sigma(seg.b, pix, ids, cov))
        rel = math.hypot(la.sigma, lb.sigma, pose) / model_len
        item.update(
            used=True, scale=s, sigma_rel=rel, model_length=model_len, pose_sigma_rel=round(pose / model_len, 6)
        )
        items.append(item)
    used = [it for it in items if it.get("used")]
    if not used:
        reasons = "; ".join(f"{it['kind']} {it['index']}: {it['reason']}" for it in items)
        raise ScaleReferenceError(f"no reference could be measured in the model ({reasons})")
    warnings: list[str] = []
    scales = np.array([it["scale"] for it in used])
    sig = np.array([max(it["sigma_rel"], 1e-4) for it in used])
    median = float(np.median(scales))
    for it in used:
        dev = abs(it["scale"] / median - 1)
        if dev > 0.05:
            warnings.append(f"reference {it['kind']} {it['index']} disagrees with the others by {100 * dev:.1f} %")
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
    n_seg = sum(1 for it in used if it["kind"] == "segment")
    n_mark = len(used) - n_seg
    source = " and ".join(
        p
        for p in (f"{n_seg} reference segment(s)" if n_seg else "", f"{n_mark} ArUco marker(s)" if n_mark else "")
        if p
    )
    return ScaleEstimate(math.exp(log_s), sigma, source, items, warnings)
