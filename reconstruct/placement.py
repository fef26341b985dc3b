"""Where the design goes on the site (PLACEMENT.json), resolved to a pose in site metres.

Accepted forms:
- ``{"image": "0000.jpg", "ground_points": [[u1, v1], [u2, v2]]}``: two points clicked on the
  ground in one photo (for a gate: the outer edges of its posts). They are lifted onto the
  ground plane; they fix the position (midpoint), the direction (point 1 -> point 2 is the
  design's +X) and the opening's width. The design's front faces the photo's camera.
- ``{"image": "0000.jpg", "ground_point": [u, v], "rotation_deg": 30}``: one clicked point plus
  a rotation about +Z of the design's +X from the site's +X.
- ``{"site": {"position": [x, y], "rotation_deg": 30}}``: explicit site coordinates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from reconstruct.design import Design, rotation_z
from reconstruct.errors import PlacementError
from reconstruct.geometry import View, sigma_along
from reconstruct.jsonfile import load_model

if TYPE_CHECKING:  # the API imports this module for its schemas: no pycolmap, no open3d there
    from reconstruct.clicks import ClickLifter


class SitePose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    position: tuple[float, float] | tuple[float, float, float]
    rotation_deg: float = 0.0


class PlacementSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    ground_points: list[tuple[float, float]] | None = Field(default=None, min_length=2, max_length=2)
    ground_point: tuple[float, float] | None = None
    rotation_deg: float = 0.0
    site: SitePose | None = None


@dataclass
class Placement:
    R: np.ndarray  # site_from_design rotation
    t: np.ndarray  # site_from_design translation
    sx: float  # stretch along the design's width (1 unless scalable)
    opening_m: float | None
    opening_sigma_m: float | None
    form: str
    warnings: list[str]
    # How each clicked ground point was found (lifted_on, views, ground: local/found/assumed).
    ground_points: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, float) * np.array([self.sx, 1.0, 1.0])
        return np.asarray((self.R @ v.T).T + self.t)

    def to_json(self) -> dict[str, Any]:
        yaw = math.degrees(math.atan2(self.R[1, 0], self.R[0, 0]))
        return {
            "form": self.form,
            "position_m": [round(float(x), 4) for x in self.t],
            "rotation_deg": round(yaw, 3),
            "stretch_x": round(self.sx, 5),
            "opening_m": None if self.opening_m is None else round(self.opening_m, 4),
            "opening_sigma_m": None if self.opening_sigma_m is None else round(self.opening_sigma_m, 4),
            "warnings": self.warnings,
            "ground_points": self.ground_points,
        }


def load_placement(path: Path) -> PlacementSpec:
    return load_model(path, PlacementSpec, PlacementError, "placement")


FLAT_GROUND = (0.0, 0.0, 1.0, 0.0)


def lift_to_ground(
    view: View,
    uv: tuple[float, float],
    *,
    ground: tuple[float, float, float, float] | list[float] = FLAT_GROUND,
    max_range_m: float = 200.0,
) -> np.ndarray:
    """Intersect a pixel's ray with the ground plane (n.X = d; z = 0 unless the ground slopes)."""
    if not (0 <= uv[0] <= view.width and 0 <= uv[1] <= view.height):
        raise PlacementError(f"the placement point {list(uv)} lies outside photo {view.name}")
    n, dist = np.asarray(ground[:3], dtype=np.float64), float(ground[3])
    C, d = view.ray(uv)
    if n @ d >= -1e-6 or n @ C - dist <= 0:
        raise PlacementError(
            f"the placement point {list(uv)} in photo {view.name} is not on the ground "
            "(its ray does not meet the ground plane)"
        )
    s = (dist - n @ C) / (n @ d)
    X = C + s * d
    if np.linalg.norm(X - C) > max_range_m:
        raise PlacementError(f"the placement point {list(uv)} meets the ground {s:.0f} m away; click nearer")
    return np.asarray(X)


ASSUMED_GROUND_SIGMA_M = 0.3  # how far the ground can be from "1.5 m below the cameras"
LOCAL_GROUND_COS = math.cos(math.radians(25))  # a surface lift this near level is ground


@dataclass
class GroundClick:
    xyz: np.ndarray
    sigma_along: Callable[[np.ndarray], float]  # 1-sigma of the point along a direction
    info: dict[str, Any]


def ground_click(
    view: View,
    uv: tuple[float, float],
    *,
    ground: tuple[float, float, float, float] | list[float] = FLAT_GROUND,
    ground_found: bool = True,
    ground_sigma_m: float = 0.02,
    lifter: ClickLifter | None = None,
) -> GroundClick:
    """One clicked ground point: triangulated from the photos that see it where two or more
    agree; else the dense surface where it is level there; else the ground plane; and, where the
    ground was not found, the assumed plane with a sigma that says so."""
    if not (0 <= uv[0] <= view.width and 0 <= uv[1] <= view.height):
        raise PlacementError(f"the placement point {list(uv)} lies outside photo {view.name}")
    n = np.asarray(ground[:3], dtype=np.float64)
    dist = float(ground[3])
    why: str | None = None  # why the photos' own point was not used
    if lifter is not None and view.name in lifter.views:
        cp = lifter.lift(view.name, uv)
        why = cp.reason
        if cp.xyz is not None and cp.cov is not None:
            cov = cp.cov
            height = float(n @ cp.xyz - dist)
            info: dict[str, Any] = {**cp.to_json(), "height_above_ground_plane_m": round(height, 3)}
            level = True
            if cp.lifted_on != "multi-view":
                # A single-photo lift counts as the local ground only where its surface is level.
                normal = _local_normal(lifter, view, uv)
                level = normal is not None and abs(float(normal[2])) >= LOCAL_GROUND_COS
            if level:
                info["ground"] = "local" if ground_found else "local, no ground plane found"
                return GroundClick(np.asarray(cp.xyz), functools.partial(sigma_along, cov), info)
            why = f"{cp.reason}; the surface lifted on is not level here"
    X = lift_to_ground(view, uv, ground=ground)
    _, d = view.ray(uv)
    extra = {"reason": why} if why else {}
    if ground_found:
        cov = ground_sigma_m**2 * np.eye(3)
        info = {"lifted_on": "ground plane", "views": 1, "ground": "found", **extra}
        return GroundClick(X, functools.partial(sigma_along, cov), info)
    # The ground is only assumed: its height error moves the point along the ray.
    along = ASSUMED_GROUND_SIGMA_M / max(0.05, abs(float(n @ d)))
    cov = ground_sigma_m**2 * np.eye(3) + along**2 * np.outer(d, d)
    info = {"lifted_on": "assumed ground", "views": 1, "ground": "assumed", **extra}
    return GroundClick(X, functools.partial(sigma_along, cov), info)


def _local_normal(lifter: ClickLifter, view: View, uv: tuple[float, float]) -> np.ndarray | None:
    lifted, _ = lifter.surface_lift(view.name, uv)
    return None if lifted.normal is None else np.asarray(lifted.normal)


def resolve(
    spec: PlacementSpec,
    design: Design,
    views: dict[str, View],
    *,
    scale_sigma_rel: float = 0.0,
    ground_sigma_m: float = 0.02,
    ground: tuple[float, float, float, float] | list[float] = FLAT_GROUND,
    ground_found: bool = True,
    lifter: ClickLifter | None = None,
) -> Placement:
    """The design's pose on the site. With ``lifter`` each clicked ground point is triangulated
    from the photos that see it (the local ground), not only intersected with the ground plane;
    ``ground_found`` False means the plane is an assumption, which widens the sigma and is said."""
    warnings: list[str] = []
    if spec.site is not None:
        p = spec.site.position
        t = np.array([p[0], p[1], p[2] if len(p) == 3 else 0.0])
        return Placement(rotation_z(spec.site.rotation_deg), t, 1.0, None, None, "site", warnings)
    if spec.image is None:
        raise PlacementError("the placement needs either 'site' coordinates or an 'image' with clicked points")
    if spec.image not in views:
        raise PlacementError(f"photo {spec.image} of the placement could not be placed in the model")
    view = views[spec.image]
    kw: dict[str, Any] = {
        "ground": ground,
        "ground_found": ground_found,
        "ground_sigma_m": ground_sigma_m,
        "lifter": lifter,
    }
    if spec.ground_points is not None:
        a = ground_click(view, spec.ground_points[0], **kw)
        b = ground_click(view, spec.ground_points[1], **kw)
        A, B = a.xyz, b.xyz
        ab = B - A
        opening = float(np.linalg.norm(ab[:2]))
        if opening < 0.05:
            raise PlacementError("the two placement points are the same spot on the ground")
        x = np.array([ab[0], ab[1], 0.0]) / opening
        y = np.cross([0.0, 0.0, 1.0], x)
        mid = (A + B) / 2  # on the ground where the photos put the clicks (the plane where they could not)
        to_cam = view.centre - mid
        if y @ to_cam < 0:  # the design's front faces the photographer
            x, y = -x, -y
        R = np.column_stack([x, y, [0.0, 0.0, 1.0]])
        width = design.width
        sx = 1.0
        if design.scalable:
            sx = opening / width
        elif width > opening * 1.02:
            warnings.append(f"the design ({width:.3f} m) is wider than the opening ({opening:.3f} m)")
        fall = abs(float(ab[2]))
        if fall > 0.05:  # the design stands level at the middle: one end floats, the other is buried
            warnings.append(
                f"the ground falls {100 * fall:.0f} cm across the opening; the design is drawn level at its "
                "middle: plan the posts' footings for the difference"
            )
        # Opening sigma: the scale, and each clicked point along the opening.
        horiz = np.array([ab[0], ab[1], 0.0])
        sigma = math.sqrt((opening * scale_sigma_rel) ** 2 + a.sigma_along(horiz) ** 2 + b.sigma_along(horiz) ** 2)
        for k, g in enumerate((a, b), start=1):
            h = g.info.get("height_above_ground_plane_m")
            if ground_found and h is not None and abs(h) > 0.15:
                warnings.append(
                    f"ground point {k} lies {h:+.2f} m from the site's ground plane: check that it was clicked on "
                    "the ground (the photos' point is used)"
                )
        if "assumed" in (a.info["ground"], b.info["ground"]):
            warnings.append(
                "no ground was found around the clicked points or in the site model: the design stands on a ground "
                "assumed 1.5 m below the cameras, and its position and opening are uncertain "
                f"(opening +-{100 * sigma:.0f} cm); add photos that show the ground, or place it by site coordinates"
            )
        placed = Placement(R, mid, sx, opening, sigma, "two ground points", warnings)
        placed.ground_points = [a.info, b.info]
        return placed
    if spec.ground_point is not None:
        g = ground_click(view, spec.ground_point, **kw)
        if g.info["ground"] == "assumed":
            warnings.append(
                "no ground was found around the clicked point or in the site model: the design stands on a ground "
                "assumed 1.5 m below the cameras; add photos that show the ground, or place it by site coordinates"
            )
        placed = Placement(rotation_z(spec.rotation_deg), g.xyz, 1.0, None, None, "ground point and rotation", warnings)
        placed.ground_points = [g.info]
        return placed
    raise PlacementError("the placement names a photo but neither 'ground_points' nor 'ground_point'")
