"""``siteplan measure``: lengths of pixel segments on the metric site, each with a 1-sigma.

Both endpoints are lifted onto the local surface in their photo (see ``geometry.lift_pixel``).
sigma combines the scale's relative uncertainty and both endpoint lifts. A segment that cannot
be measured gets ``length_m: null`` and a ``reason``, never a made-up number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reconstruct.geometry import lift_pixel, observations, views
from reconstruct.reference import Segment
from reconstruct.site import Site


def measure(site: Site, segments: list[Segment]) -> list[dict[str, Any]]:
    vs = views(site.reconstruction)
    scale_rel = float(site.info.get("scale_sigma_rel", 0.0))
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out: list[dict[str, Any]] = []
    for seg in segments:
        item: dict[str, Any] = seg.model_dump(exclude={"length_m"})
        item["a"], item["b"] = list(seg.a), list(seg.b)
        if seg.image not in vs:
            item.update(length_m=None, sigma_m=None, reason="the photo is not registered in the model")
            out.append(item)
            continue
        if seg.image not in cache:
            cache[seg.image] = observations(site.reconstruction, seg.image)
        ouv, oxyz = cache[seg.image]
        la = lift_pixel(vs[seg.image], seg.a, ouv, oxyz)
        lb = lift_pixel(vs[seg.image], seg.b, ouv, oxyz)
        if la.xyz is None or lb.xyz is None:
            which = "a" if la.xyz is None else "b"
            reason = la.reason if la.xyz is None else lb.reason
            item.update(length_m=None, sigma_m=None, reason=f"endpoint {which}: {reason}")
            out.append(item)
            continue
        length = float(np.linalg.norm(la.xyz - lb.xyz))
        sigma = math.sqrt((length * scale_rel) ** 2 + la.sigma**2 + lb.sigma**2)
        item.update(length_m=round(length, 4), sigma_m=round(sigma, 4))
        out.append(item)
    return out
