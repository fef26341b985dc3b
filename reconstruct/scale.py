"""Metric scale from reference segments measured on site.

Each segment's endpoints go through ``clicks.ClickLifter``: triangulated from every photo that
sees them, or lifted onto the local surface where fewer than two photos agree (each endpoint says
which, and why). The ratio of the true length to the model length is that segment's scale, with a
sigma from the endpoints' covariances along the segment. The surface lift of the same clicks is a
check: where the two disagree beyond their sigmas the reference is named and its sigma widened.
Several references are combined by inverse-variance weights; one that disagrees with the others
beyond both sigmas is named and down-weighted to its deviation, and the references' scatter
widens the combined sigma.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from reconstruct.clicks import ClickLifter, shape_sigma
from reconstruct.errors import ScaleReferenceError
from reconstruct.geometry import views
from reconstruct.markers import detect_all, marker_scale
from reconstruct.reference import ScaleReference

log = logging.getLogger(__name__)
DEPTH_RATIO_WARN = 1.6  # a reference whose endpoints' ranges differ this much may have slipped off


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
    rec: pycolmap.Reconstruction, ref: ScaleReference, *, image_dir: Path | None = None, multiview: bool = True
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
    lifter = ClickLifter(rec, image_dir, multiview=multiview)
    warnings: list[str] = []
    for i, seg in enumerate(ref.segments):
        item = {"kind": "segment", "index": i, "image": seg.image, "length_m": seg.length_m}
        if seg.image not in vs:
            item["used"] = False
            item["reason"] = "its photo could not be placed in the model"
            items.append(item)
            continue
        pa, pb = lifter.lift(seg.image, seg.a), lifter.lift(seg.image, seg.b)
        item["endpoints"] = {"a": pa.to_json(), "b": pb.to_json()}
        if pa.xyz is None or pb.xyz is None or pa.cov is None or pb.cov is None:
            item["used"] = False
            which, p = ("a", pa) if pa.xyz is None else ("b", pb)
            item["reason"] = f"endpoint {which}: {p.reason}"
            items.append(item)
            continue
        ab = np.asarray(pb.xyz) - np.asarray(pa.xyz)
        model_len = float(np.linalg.norm(ab))
        centre = vs[seg.image].centre
        da, db = float(np.linalg.norm(pa.xyz - centre)), float(np.linalg.norm(pb.xyz - centre))
        if max(da, db) > DEPTH_RATIO_WARN * min(da, db):
            warnings.append(
                f"reference segment {i}: its endpoints lie at very different distances from the camera "
                f"({max(da, db) / min(da, db):.1f}x): check that both are on the measured object"
            )
        assert seg.length_m is not None
        s = seg.length_m / model_len
        # The model's shape where a principal point was held at the image centre: the reference's
        # length again in the model with it freed (``clicks.shape_sigma``).
        shape = shape_sigma(pa, pb)
        rel = math.sqrt(pa.sigma_along(ab) ** 2 + pb.sigma_along(ab) ** 2 + shape**2) / model_len
        item.update(used=True, scale=s, sigma_rel=rel, model_length=model_len)
        if shape > 0:
            item["shape_sigma_rel"] = round(shape / model_len, 6)
        # The single-photo surface lift of the same clicks is the check: where it disagrees beyond
        # both sigmas, the reference's sigma is widened to cover the two.
        if pa.surface_xyz is not None and pb.surface_xyz is not None and "multi-view" in (pa.lifted_on, pb.lifted_on):
            surf_len = float(np.linalg.norm(np.asarray(pb.surface_xyz) - np.asarray(pa.surface_xyz)))
            item["surface_length_ratio"] = round(surf_len / model_len, 6)
            worst = max(
                (p for p in (("a", pa), ("b", pb)) if p[1].disagreement is not None),
                key=lambda p: p[1].disagreement or 0.0,
                default=None,
            )
            gap = abs(surf_len / model_len - 1)
            if worst is not None:
                warnings.append(
                    f"reference segment {i}: at endpoint {worst[0]} the surface and the photos that see it disagree "
                    f"({100 * gap:.1f} % in length); the photos' point is used and the sigma widened"
                )
                item["sigma_rel"] = rel = max(rel, gap / 2)
        items.append(item)
    used = [it for it in items if it.get("used")]
    if not used:
        reasons = "; ".join(f"{it['kind']} {it['index']}: {it['reason']}" for it in items)
        raise ScaleReferenceError(f"no reference could be measured in the model ({reasons})")
    scales = np.array([it["scale"] for it in used])
    sig = np.array([max(it["sigma_rel"], 1e-4) for it in used])
    median = float(np.median(scales))
    if len(used) >= 2:
        # Each reference against the weighted scale of the others: one that disagrees beyond both
        # sigmas (and by more than a tape's 0.5 %) is named and down-weighted to its deviation,
        # so the scale comes from the consistent ones and the scatter widens the sigma below.
        for k, it in enumerate(used):
            rest = [j for j in range(len(used)) if j != k]
            wr = 1.0 / sig[rest] ** 2
            others = float(np.exp(np.sum(wr * np.log(scales[rest])) / wr.sum()))
            both = math.hypot(float(sig[k]), 1.0 / math.sqrt(float(wr.sum())))
            dev = abs(it["scale"] / others - 1)
            if dev > max(3.0 * both, 0.005) and (len(used) == 2 or dev > abs(median / others - 1)):
                warnings.append(
                    f"reference {it['kind']} {it['index']} disagrees with the others by {100 * dev:.1f} % "
                    f"(beyond their sigmas, {100 * both:.2f} %); the scale rests on the others"
                )
                it["sigma_rel"] = max(it["sigma_rel"], dev)
                it["inconsistent"] = True
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
