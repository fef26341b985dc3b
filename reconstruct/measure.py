"""``siteplan measure``: lengths of pixel segments on the metric site, each with a 1-sigma.

Both endpoints go through ``clicks.ClickLifter``: found again in every photo that sees them and
triangulated (``lifted_on: "multi-view"``, with the number of photos), or, where fewer than two
photos agree, lifted onto the local surface in their own photo (``"plane"``: the sparse points
around the pixel; ``"surface"``: the dense mesh), with the reason per endpoint.
sigma combines, in quadrature: the scale's relative uncertainty, and each endpoint's covariance
along the segment (triangulation or surface fit, the bundle adjustment's pose/structure term
there, and the click), and the model's shape where a principal point was held at the image
centre (``clicks.shape_sigma``). The endpoints' pose terms are added as if independent: conservative,
since a shared pose error partly cancels in a length. A segment that cannot be measured gets
``length_m: null`` and a ``reason``, never a made-up number.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from reconstruct.clicks import ClickLifter, shape_sigma
from reconstruct.reference import Segment
from reconstruct.site import Site

log = logging.getLogger(__name__)

DEPTH_RATIO_WARN = 1.6  # endpoints this much further from the camera than each other: a warning


def measure(site: Site, segments: list[Segment], *, photos_dir: Path | None = None) -> list[dict[str, Any]]:
    """Measure ``segments`` on ``site``; the photos are read from ``photos_dir`` (default: the
    folder the site was built from) for the multi-view search."""
    scale_rel = float(site.info.get("scale_sigma_rel", 0.0))
    folder = photos_dir if photos_dir is not None else site.images_dir
    lifter = ClickLifter(
        site.reconstruction,
        folder if folder.is_dir() else None,
        surface_path=site.run_dir / "surface.ply",
    )
    excluded = {e["image"]: e["reason"] for e in site.info.get("pose_check", {}).get("excluded", [])}
    out: list[dict[str, Any]] = []
    for seg in segments:
        item: dict[str, Any] = seg.model_dump(exclude={"length_m"})
        item["a"], item["b"] = list(seg.a), list(seg.b)
        if seg.image not in lifter.views:
            why = excluded.get(seg.image)
            reason = (
                f"the photo was left out of the model: {why}" if why else "the photo is not registered in the model"
            )
            item.update(length_m=None, sigma_m=None, reason=reason)
            out.append(item)
            continue
        pa = lifter.lift(seg.image, seg.a)
        pb = lifter.lift(seg.image, seg.b)
        item["endpoints"] = {"a": pa.to_json(), "b": pb.to_json()}
        if pa.xyz is None or pb.xyz is None or pa.cov is None or pb.cov is None:
            which, p = ("a", pa) if pa.xyz is None else ("b", pb)
            item.update(length_m=None, sigma_m=None, reason=f"endpoint {which}: {p.reason}")
            out.append(item)
            continue
        ab = np.asarray(pb.xyz) - np.asarray(pa.xyz)
        length = float(np.linalg.norm(ab))
        ends = math.hypot(pa.sigma_along(ab), pb.sigma_along(ab))
        shape = shape_sigma(pa, pb)
        sigma = math.sqrt((length * scale_rel) ** 2 + ends**2 + shape**2)
        warnings: list[str] = []
        for name, p in (("a", pa), ("b", pb)):
            if p.disagreement is not None:
                warnings.append(
                    f"endpoint {name}: the surface there and the photos that see it disagree by "
                    f"{100 * p.disagreement:.1f} cm; the photos' point is used"
                )
        centre = lifter.views[seg.image].centre
        da, db = float(np.linalg.norm(pa.xyz - centre)), float(np.linalg.norm(pb.xyz - centre))
        if max(da, db) > DEPTH_RATIO_WARN * min(da, db):
            warnings.append(
                f"the endpoints lie at very different distances from the camera ({da:.2f} m and {db:.2f} m): "
                "check that both are on the object"
            )
        item.update(
            length_m=round(length, 4),
            sigma_m=round(sigma, 4),
            lifted_on={"a": pa.lifted_on, "b": pb.lifted_on},
            sigma_parts_m={
                "scale": round(length * scale_rel, 4),
                "endpoints": round(ends, 4),
                "shape": round(shape, 4),
            },
        )
        if warnings:
            item["warnings"] = warnings
        out.append(item)
    return out
