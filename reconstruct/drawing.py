"""Dimensioned drawings of the placed design: top view (SVG + DXF) and front elevation (SVG).

The numbers come first and once: :func:`fabrication_dimensions` measures what a fabricator needs
(overall width, clear opening between the posts, height, the site's opening, post-to-wall on each
side from the posts' outer faces, the ground's fall across the opening), each with its 1-sigma
where it is measured on the site. plan.json, both SVGs, the DXF and the report all take their
numbers from that one list.

Drawings are built as a small list of primitives in site metres (:class:`Sheet`), then written to
SVG (paper millimetres at a stated scale) and to DXF (model space in metres, $INSUNITS = metres,
true DIMENSION entities whose displayed text is the measurement in metres: DIMLFAC = 1).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import numpy as np
import trimesh

PAPER_SCALES = (20, 50, 100, 200, 500)
MAX_PAPER_MM = (380.0, 230.0)  # A3 landscape, less margins and the title block
FONT_MM = 3.0  # dimension text height on paper
SHORT = {
    "clear_opening": "clear",
    "site_opening": "opening",
    "post_to_wall": "to wall",
    "post_to_obstacle": "to obstacle",
}
CHAR_W = 0.6  # average glyph width / height for Helvetica (generous: the layout must not overlap)
TITLE_H_MM = 34.0  # the title block's height under the drawing


@dataclass
class Measure:
    """One number of the plan: what it is, its value and (measured on the site) its 1-sigma."""

    key: str
    label: str
    value_m: float
    sigma_m: float | None  # None: a size of the design itself, exact as designed
    source: Literal["design", "site"]
    a: np.ndarray  # site metres (3,), the measured points, for drawing
    b: np.ndarray
    note: str = ""

    def text(self) -> str:
        if self.sigma_m is None:
            return f"{self.value_m:.3f} m"
        return f"{self.value_m:.3f} ± {self.sigma_m:.3f} m"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "value_m": round(self.value_m, 4),
            "sigma_m": None if self.sigma_m is None else round(self.sigma_m, 4),
            "source": self.source,
            "note": self.note,
        }


@dataclass
class Dim:
    a: np.ndarray  # 2D, metres
    b: np.ndarray
    offset: float  # metres, to the left of a->b
    label: str  # e.g. "overall width"
    value_m: float
    sigma_m: float | None = None
    key: str = ""

    def text(self) -> str:
        s = f"{self.value_m:.3f}" if self.sigma_m is None else f"{self.value_m:.3f} ± {self.sigma_m:.3f}"
        short = SHORT.get(self.key.removesuffix("_left").removesuffix("_right"), "")
        return f"{short} {s}" if short else s


@dataclass
class Sheet:
    title: str
    polys: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (N x 2, layer)
    lines: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    ground_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    dims: list[Dim] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: list[tuple[str, str]] = field(default_factory=list)  # (label, value text) for the title block
    arrow: tuple[np.ndarray, str] | None = None  # a direction (2D unit) and what it points to
    project: str = ""
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))

    def extent(self) -> np.ndarray:
        pts = [p for p, _ in self.polys] + [np.array([a, b]) for a, b, _ in self.lines]
        for d in self.dims:
            n = _left(d.b - d.a) * d.offset
            pts.append(np.array([d.a + n, d.b + n]))
        allp = np.vstack(pts) if pts else np.zeros((1, 2))
        return np.array([allp.min(axis=0), allp.max(axis=0)])


def _left(v: np.ndarray) -> np.ndarray:
    n = np.array([-v[1], v[0]])
    return n / (np.linalg.norm(n) + 1e-12)


def _components(vertices: np.ndarray, faces: np.ndarray) -> list[np.ndarray]:
    """The vertices of each connected component of a mesh."""
    if len(faces) == 0:
        return []
    labels = trimesh.graph.connected_component_labels(trimesh.graph.face_adjacency(faces), node_count=len(faces))
    out = []
    for k in range(int(labels.max()) + 1):
        idx = np.unique(faces[labels == k])
        out.append(np.asarray(vertices)[idx])
    return out


def _hull(xy: np.ndarray) -> np.ndarray | None:
    import cv2

    if len(xy) < 3:
        return None
    hull = cv2.convexHull(xy.astype(np.float32)).reshape(-1, 2).astype(float)
    return hull if len(hull) >= 3 else None


def _hulls_xy(vertices: np.ndarray, faces: np.ndarray) -> list[np.ndarray]:
    """One 2D convex outline per connected component of a mesh, projected onto XY."""
    out = []
    for comp in _components(vertices, faces):
        h = _hull(comp[:, :2])
        if h is not None:
            out.append(h)
    return out


@dataclass
class _Wall:
    a: np.ndarray
    b: np.ndarray
    sigma_m: float  # spread of its points about the plane (robust)


def _walls(points: np.ndarray, facades: list[dict[str, Any]], tol: float = 0.05) -> list[_Wall]:
    """Each facade plane's trace on the ground, over the extent of the points on it."""
    segs: list[_Wall] = []
    if not facades:
        return segs
    # Keep the main walls: planes with a good share of the largest one's support, and not a
    # parallel layer (a plinth, a window recess) within 0.4 m of one already kept.
    top = max(f["inliers"] for f in facades)
    kept: list[dict[str, Any]] = []
    for f in sorted(facades, key=lambda f: -f["inliers"]):
        if f["inliers"] < 0.25 * top:
            continue
        n = np.asarray(f["plane"][:3])
        if any(
            abs(n @ np.asarray(k["plane"][:3])) > 0.97
            and abs(f["plane"][3] - np.sign(n @ np.asarray(k["plane"][:3])) * k["plane"][3]) < 0.4
            for k in kept
        ):
            continue
        kept.append(f)
    for f in kept:
        nx, ny, nz, d = f["plane"]
        n2 = np.array([nx, ny])
        if np.linalg.norm(n2) < 0.5:
            continue
        res = points @ np.array([nx, ny, nz]) - d
        on = np.abs(res) < tol
        if on.sum() < 20:
            continue
        p = points[on][:, :2]
        direc = np.array([-ny, nx]) / np.linalg.norm(n2)
        s = p @ direc
        foot = n2 * d / (n2 @ n2)
        lo, hi = np.percentile(s, [1, 99])
        base = foot - (foot @ direc) * direc
        r = res[on]
        sigma = float(1.4826 * np.median(np.abs(r - np.median(r))))
        segs.append(_Wall(base + lo * direc, base + hi * direc, max(sigma, 0.005)))
    return segs


def _wall_segments(points: np.ndarray, facades: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(w.a, w.b) for w in _walls(points, facades)]


def _point_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    s = float(np.clip((p - a) @ ab / (ab @ ab + 1e-12), 0, 1))
    return a + s * ab


def _ray_segment(o: np.ndarray, d: np.ndarray, a: np.ndarray, b: np.ndarray) -> float | None:
    """Distance along the ray o + s d (s > 0) to segment a-b, or None."""
    e = b - a
    den = d[0] * (-e[1]) - d[1] * (-e[0])
    if abs(den) < 1e-9:
        return None
    r = a - o
    s = (r[0] * (-e[1]) - r[1] * (-e[0])) / den
    u = (d[0] * r[1] - d[1] * r[0]) / den
    if s <= 0 or not -0.02 <= u <= 1.02:
        return None
    return float(s)


@dataclass
class Frame:
    """The placed design's axes on the site: u along its width, w towards its front, z up."""

    origin: np.ndarray  # site metres, the design's anchor (ground level)
    ax: np.ndarray  # unit (3,), the design's +X
    fr: np.ndarray  # unit (3,), the design's +Y (its front)

    @classmethod
    def of(cls, placement: dict[str, Any]) -> Frame:
        yaw = math.radians(placement["rotation_deg"])
        return cls(
            np.asarray(placement["position_m"], float),
            np.array([math.cos(yaw), math.sin(yaw), 0.0]),
            np.array([-math.sin(yaw), math.cos(yaw), 0.0]),
        )

    def local(self, v: np.ndarray) -> np.ndarray:
        r = np.asarray(v, float) - self.origin
        return np.column_stack([r @ self.ax, r @ self.fr, r[:, 2]])

    def site(self, u: float, w: float = 0.0, z: float = 0.0) -> np.ndarray:
        return np.asarray(self.origin + u * self.ax + w * self.fr + np.array([0.0, 0.0, z]))


@dataclass
class Posts:
    """The design's extent along its width and, where it has them, its end posts."""

    u0: float  # outer face at -X
    u1: float  # outer face at +X
    inner0: float | None  # inner face of the post at -X
    inner1: float | None
    height: float
    depth: tuple[float, float]  # w range


def find_posts(world: list[tuple[np.ndarray, np.ndarray]], frame: Frame) -> Posts:
    """End posts: components at either end, narrow (< 20 % of the width) and standing from the
    ground to most of the height. A design without them (a panel) has no clear opening."""
    allv = frame.local(np.vstack([v for v, _ in world]))
    u0, u1 = float(allv[:, 0].min()), float(allv[:, 0].max())
    zmin, zmax = float(allv[:, 2].min()), float(allv[:, 2].max())
    width = max(u1 - u0, 1e-6)
    inner0: float | None = None
    inner1: float | None = None
    for v, f in world:
        for comp in _components(v, f):
            c = frame.local(comp)
            cu0, cu1 = float(c[:, 0].min()), float(c[:, 0].max())
            tall = c[:, 2].max() >= zmin + 0.6 * (zmax - zmin) and c[:, 2].min() <= zmin + 0.05 * (zmax - zmin)
            if not tall or cu1 - cu0 > 0.2 * width:
                continue
            if cu0 - u0 < 0.02 * width:
                inner0 = cu1 if inner0 is None else max(inner0, cu1)
            if u1 - cu1 < 0.02 * width:
                inner1 = cu0 if inner1 is None else min(inner1, cu0)
    return Posts(u0, u1, inner0, inner1, zmax - zmin, (float(allv[:, 1].min()), float(allv[:, 1].max())))


def _obstacle(
    site_points: np.ndarray, walls: list[_Wall], frame: Frame, u_face: float, sign: float, depth: tuple[float, float]
) -> tuple[float, float, str] | None:
    """From a post's outer face along the design's axis (outwards, sign = +-1): the nearest wall
    trace, or the first dense cluster of site points in the post's corridor (a hedge, a bin).
    Returns (distance, its sigma, 'wall' | 'obstacle'), or None within 10 m."""
    o3 = frame.site(u_face, 0.5 * (depth[0] + depth[1]))
    o, d = o3[:2], sign * frame.ax[:2]
    best: tuple[float, float, str] | None = None
    for w in walls:
        s = _ray_segment(o, d, w.a, w.b)
        if s is not None and s < 10 and (best is None or s < best[0]):
            best = (s, w.sigma_m, "wall")
    loc = frame.local(site_points)
    along = sign * (loc[:, 0] - u_face)
    half = max(0.2, 0.5 * (depth[1] - depth[0]) + 0.1)
    corridor = (along > 0.02) & (along < 10) & (np.abs(loc[:, 1] - 0.5 * (depth[0] + depth[1])) < half)
    corridor &= (loc[:, 2] > 0.2) & (loc[:, 2] < 2.5)
    ss = np.sort(along[corridor])
    k = 12  # points within 15 cm: a surface, not a stray match
    if len(ss) >= k:
        dens = ss[k - 1 :] - ss[: len(ss) - k + 1]
        hit = np.nonzero(dens < 0.15)[0]
        if len(hit):
            i = int(hit[0])
            first = ss[i : i + k]
            dist = float(np.median(first[: k // 2])) if len(first) else float(ss[i])
            if best is None or dist < best[0] - 0.05:
                best = (dist, max(float(np.std(first)), 0.01), "obstacle")
    return best


def _ground_z(site_points: np.ndarray, xy: np.ndarray, plane: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """The ground's height at a point: the median of the points near it at ground level (within
    0.5 m, 0.15 m of the plane), or the ground plane itself. Returns (z, its 1-sigma)."""
    n = np.asarray(plane[:3], float)
    zp = float((plane[3] - n[0] * xy[0] - n[1] * xy[1]) / n[2]) if abs(n[2]) > 1e-6 else 0.0
    if len(site_points):
        near = np.linalg.norm(site_points[:, :2] - xy, axis=1) < 0.5
        near &= np.abs(site_points[:, 2] - zp) < 0.15
        z = site_points[near, 2]
        if len(z) >= 8:
            mad = 1.4826 * float(np.median(np.abs(z - np.median(z))))
            return float(np.median(z)), max(mad / math.sqrt(len(z)) * 1.25, 0.005)
    return zp, 0.02


def fabrication_dimensions(
    world: list[tuple[np.ndarray, np.ndarray]],
    placement: dict[str, Any],
    site_points: np.ndarray,
    facades: list[dict[str, Any]],
    *,
    scale_sigma_rel: float = 0.0,
    ground_plane: list[float] | tuple[float, ...] = (0.0, 0.0, 1.0, 0.0),
    ground_sigma_m: float = 0.02,
    opening: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Measure]:
    """The numbers a fabricator orders by, in one list (the drawings and the report use these).

    Design sizes (overall width, clear opening between the posts' inner faces, height) are exact
    as designed. Site numbers carry a 1-sigma: the scale's relative uncertainty, the placement
    point's lift onto the ground (``ground_sigma_m``) and the spread of the wall or obstacle
    surface, in quadrature; the opening's sigma is the placement's own.
    """
    frame = Frame.of(placement)
    posts = find_posts(world, frame)
    out = [
        Measure(
            "overall_width",
            "overall width",
            posts.u1 - posts.u0,
            None,
            "design",
            frame.site(posts.u0),
            frame.site(posts.u1),
        ),
    ]
    if posts.inner0 is not None and posts.inner1 is not None and posts.inner1 > posts.inner0:
        out.append(
            Measure(
                "clear_opening",
                "clear opening between posts",
                posts.inner1 - posts.inner0,
                None,
                "design",
                frame.site(posts.inner0),
                frame.site(posts.inner1),
            )
        )
    out.append(
        Measure(
            "height", "height", posts.height, None, "design", frame.site(posts.u1), frame.site(posts.u1, z=posts.height)
        )
    )
    if opening is not None:
        oa, ob = opening
        sig = placement.get("opening_sigma_m")
        out.append(
            Measure(
                "site_opening",
                "opening on site",
                float(np.linalg.norm(ob[:2] - oa[:2])),
                None if sig is None else float(sig),
                "site",
                np.asarray(oa, float),
                np.asarray(ob, float),
                "between the clicked points",
            )
        )
    walls = _walls(site_points, facades)
    # Seen from the front (the photographer's side), the design's -X end is on the right.
    for side, face, sign in (("right", posts.u0, -1.0), ("left", posts.u1, 1.0)):
        hit = _obstacle(site_points, walls, frame, face, sign, posts.depth)
        if hit is None:
            continue
        dist, obst_sigma, kind = hit
        sigma = math.sqrt((dist * scale_sigma_rel) ** 2 + ground_sigma_m**2 + obst_sigma**2)
        wmid = 0.5 * (posts.depth[0] + posts.depth[1])
        out.append(
            Measure(
                f"post_to_{kind}_{side}",
                f"post to {kind}, {side}",
                dist,
                sigma,
                "site",
                frame.site(face, wmid),
                frame.site(face + sign * dist, wmid),
                "from the post's outer face, along the design's axis; left/right seen from the front",
            )
        )
    za, sa = _ground_z(site_points, frame.site(posts.u0)[:2], ground_plane)
    zb, sb = _ground_z(site_points, frame.site(posts.u1)[:2], ground_plane)
    fall = abs(za - zb)
    lower = "level" if fall < 0.005 else ("lower at the right" if za < zb else "lower at the left")
    out.append(
        Measure(
            "ground_fall",
            "ground fall across the opening",
            fall,
            math.hypot(sa, sb),
            "site",
            frame.site(posts.u0, z=za - frame.origin[2]),
            frame.site(posts.u1, z=zb - frame.origin[2]),
            f"between the posts' outer faces; {lower} (seen from the front)",
        )
    )
    return out


def top_view(
    design_world: list[tuple[np.ndarray, np.ndarray]],
    placement: dict[str, Any],
    site_points: np.ndarray,
    facades: list[dict[str, Any]],
    *,
    design_name: str,
    opening: tuple[np.ndarray, np.ndarray] | None = None,
    measures: list[Measure] | None = None,
    project: str = "",
) -> Sheet:
    """The plan: site points and walls, the design's footprint, and its dimensions."""
    if measures is None:
        measures = fabrication_dimensions(design_world, placement, site_points, facades, opening=opening)
    sheet = Sheet(title=f"Top view: {design_name}", project=project)
    frame = Frame.of(placement)
    allv = np.vstack([v for v, _ in design_world])
    centre = allv.mean(axis=0)[:2]
    by = {m.key: m for m in measures}
    reach = [float(np.linalg.norm(m.b[:2] - centre)) for m in measures if m.key.startswith("post_to")]
    r = max([4.0, 1.2 * float(np.ptp(allv[:, :2], axis=0).max())] + [x + 0.5 for x in reach])
    near = np.linalg.norm(site_points[:, :2] - centre, axis=1) < r
    base = float(placement["position_m"][2])  # the ground under the design (z = 0 unless it slopes)
    ctx = site_points[near & (site_points[:, 2] > base + 0.1)]
    grd = site_points[near & (site_points[:, 2] <= base + 0.1)]
    rng = np.random.default_rng(0)
    if len(ctx) > 6000:
        ctx = ctx[rng.choice(len(ctx), 6000, replace=False)]
    if len(grd) > 3000:
        grd = grd[rng.choice(len(grd), 3000, replace=False)]
    sheet.points = ctx[:, :2]
    sheet.ground_points = grd[:, :2]
    for w in _walls(site_points, facades):
        a, b = w.a, w.b
        if np.linalg.norm(_point_segment(centre, a, b) - centre) < r:
            # Clip the trace to the drawing's disc: a long facade would set the sheet's scale.
            d = (b - a) / (np.linalg.norm(b - a) + 1e-12)
            s0 = (centre - a) @ d
            lo, hi = max(0.0, s0 - r), min(float(np.linalg.norm(b - a)), s0 + r)
            if hi > lo:
                sheet.lines.append((a + lo * d, a + hi * d, "WALLS"))
    for v, f in design_world:
        for hull in _hulls_xy(v, f):
            sheet.polys.append((hull, "DESIGN"))
    # Dimension lines in front of the design (its +Y, towards the photographer): a chain along the
    # design's axis (post-to-wall | overall width | post-to-wall), then the clear opening, then the
    # site's opening, each a row further out.
    front = float(frame.local(allv)[:, 1].max())
    rows = [front + 0.45, front + 0.9, front + 1.35]

    def dim(m: Measure, row: float) -> None:
        a, b = m.a[:2], m.b[:2]
        if (b - a) @ frame.ax[:2] < 0:
            a, b = b, a
        # offset is to the left of a->b; a->b runs along +X, whose left is the design's front.
        sheet.dims.append(
            Dim(
                a,
                b,
                offset=row - float(frame.local(np.array([m.a]))[0, 1]) + 0.0,
                label=m.label,
                value_m=m.value_m,
                sigma_m=m.sigma_m,
                key=m.key,
            )
        )

    for key in (
        "overall_width",
        "post_to_wall_left",
        "post_to_wall_right",
        "post_to_obstacle_left",
        "post_to_obstacle_right",
    ):
        if key in by:
            dim(by[key], rows[0])
    if "clear_opening" in by:
        dim(by["clear_opening"], rows[1])
    if "site_opening" in by:
        dim(by["site_opening"], rows[2])
    sheet.table = [(m.label, m.text()) for m in measures]
    if facades and sheet.lines:
        # The facade arrow: from the design towards the nearest wall trace kept on the sheet.
        feet = [(_point_segment(centre, a, b), a, b) for a, b, _ in sheet.lines]
        foot = min(feet, key=lambda f: float(np.linalg.norm(f[0] - centre)))[0]
        v = foot - centre
        if np.linalg.norm(v) > 0.05:
            sheet.arrow = (v / np.linalg.norm(v), "facade")
    if sheet.arrow is None:
        sheet.arrow = (frame.fr[:2].copy(), "front")
    return sheet


def elevation(
    design_world: list[tuple[np.ndarray, np.ndarray]],
    placement: dict[str, Any],
    site_points: np.ndarray,
    *,
    design_name: str,
    measures: list[Measure] | None = None,
    project: str = "",
) -> Sheet:
    """Front view, as the photographer sees the design: its -X end on the right, up is +Z."""
    frame = Frame.of(placement)

    def to2(v: np.ndarray) -> np.ndarray:  # seen from the front: horizontal is -u
        loc = frame.local(v)
        return np.column_stack([-loc[:, 0], loc[:, 2]])

    sheet = Sheet(title=f"Front elevation: {design_name}", project=project)
    for v, f in design_world:
        for comp in _components(v, f):
            h = _hull(to2(comp))
            if h is not None:
                sheet.polys.append((h, "DESIGN"))
    xs = to2(np.vstack([v for v, _ in design_world]))
    x0, x1 = float(xs[:, 0].min()), float(xs[:, 0].max())
    zmax = float(xs[:, 1].max())
    gx0, gx1 = min(x0 - 1.0, -3.0), max(x1 + 1.0, 3.0)
    sheet.lines.append((np.array([gx0, 0.0]), np.array([gx1, 0.0]), "GROUND"))
    # Site behind the design as context, kept inside the sheet's frame (it is clipped, never
    # allowed to spill over the title or off the page).
    rel = site_points - frame.origin
    depth = rel @ frame.fr
    keep = (depth < 0) & (depth > -8) & (rel[:, 2] > 0.02)
    ctx = to2(site_points[keep])
    zcap = max(zmax + 1.0, 2.5)
    ctx = ctx[(ctx[:, 0] > gx0) & (ctx[:, 0] < gx1) & (ctx[:, 1] < zcap)]
    if len(ctx) > 6000:
        ctx = ctx[np.random.default_rng(0).choice(len(ctx), 6000, replace=False)]
    sheet.points = ctx
    by = {m.key: m for m in (measures or [])}
    w = by.get("overall_width")
    sheet.dims.append(
        Dim(
            np.array([x0, 0.0]),
            np.array([x1, 0.0]),
            offset=-0.45,
            label="overall width",
            value_m=w.value_m if w else x1 - x0,
            key="overall_width",
        )
    )
    co = by.get("clear_opening")
    if co is not None:
        p, q = to2(np.array([co.a, co.b]))
        lo, hi = sorted((float(p[0]), float(q[0])))
        sheet.dims.append(
            Dim(np.array([lo, 0.0]), np.array([hi, 0.0]), offset=-0.9, label=co.label, value_m=co.value_m, key=co.key)
        )
    ht = by.get("height")
    sheet.dims.append(
        Dim(
            np.array([x1, 0.0]),
            np.array([x1, zmax]),
            offset=-0.45,
            label="height",
            value_m=ht.value_m if ht else zmax,
            key="height",
        )
    )
    sheet.table = [(m.label, m.text()) for m in (measures or [])]
    return sheet


def to3(xy: np.ndarray) -> np.ndarray:
    return np.column_stack([xy, np.zeros(len(xy))])


def choose_scale(sheet: Sheet) -> int:
    ext = sheet.extent()
    size = np.maximum(ext[1] - ext[0], 0.1) * 1000.0  # mm
    for s in PAPER_SCALES:
        if size[0] / s <= MAX_PAPER_MM[0] and size[1] / s <= MAX_PAPER_MM[1]:
            return s
    return PAPER_SCALES[-1]


# --- layout on paper ------------------------------------------------------------------------


@dataclass
class TextBox:
    """A text's box on paper (mm): centre, half sizes along and across its baseline, its angle."""

    cx: float
    cy: float
    hw: float
    hh: float
    ang: float  # degrees, SVG (clockwise, y down)

    def corners(self) -> np.ndarray:
        c, s = math.cos(math.radians(self.ang)), math.sin(math.radians(self.ang))
        ux, vx = np.array([c, s]) * self.hw, np.array([-s, c]) * self.hh
        m = np.array([self.cx, self.cy])
        return np.array([m - ux - vx, m + ux - vx, m + ux + vx, m - ux + vx])


def text_box(x: float, y: float, text: str, size: float, ang: float = 0.0, anchor: str = "middle") -> TextBox:
    """The box of an SVG text element at baseline point (x, y), rotated by ``ang`` about it."""
    w = CHAR_W * size * len(text)
    dx = {"start": w / 2, "middle": 0.0, "end": -w / 2}[anchor]
    dy = -0.35 * size  # glyphs sit mostly above the baseline: cap height ~0.7 size
    c, s = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    return TextBox(x + c * dx - s * dy, y + s * dx + c * dy, w / 2, 0.42 * size, ang)


def _sat(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether two convex polygons (k x 2) overlap (separating axis test)."""
    for poly in (p, q):
        for i in range(len(poly)):
            e = poly[(i + 1) % len(poly)] - poly[i]
            n = np.array([-e[1], e[0]])
            a, b = p @ n, q @ n
            if a.max() <= b.min() or b.max() <= a.min():
                return False
    return True


def box_hits_segment(box: TextBox, p: np.ndarray, q: np.ndarray) -> bool:
    return _sat(box.corners(), np.array([p, q + 1e-9 * np.array([1.0, 1.0])]))


def boxes_overlap(a: TextBox, b: TextBox) -> bool:
    return _sat(a.corners(), b.corners())


def write_svg(sheet: Sheet, path: Path, *, subtitle: str = "") -> int:
    """Write the sheet to SVG at a standard scale; returns the scale denominator.

    Layout: the title on top, the drawing, then the title block (project, date, scale, units, the
    dimension table and the facade/front arrow). Dimension text sits beside its line on the side
    away from what it measures, moved along the line until it touches no line and no other text;
    site points are clipped to the drawing's frame."""
    scale = choose_scale(sheet)
    ext = sheet.extent()
    margin, head = 12.0, 20.0
    k = 1000.0 / scale  # paper mm per metre
    pad = 8.0  # room for dimension text beyond the extent
    w = max((ext[1, 0] - ext[0, 0]) * k + 2 * (margin + pad), 250.0)
    draw_h = (ext[1, 1] - ext[0, 1]) * k + 2 * pad
    tb_rows = max(len(sheet.table), 4)
    tb_h = max(TITLE_H_MM, 6.0 + 4.2 * tb_rows)
    h = head + draw_h + tb_h + margin
    ox = margin + pad + ((w - 2 * (margin + pad)) - (ext[1, 0] - ext[0, 0]) * k) / 2

    def P(p: np.ndarray) -> tuple[float, float]:
        return (ox + (p[0] - ext[0, 0]) * k, head + pad + (ext[1, 1] - p[1]) * k)

    frame_box = (margin, head, w - margin, head + draw_h)
    segs: list[tuple[np.ndarray, np.ndarray]] = []  # every line drawn, paper mm, for the layout
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.1f}mm" height="{h:.1f}mm" '
        f'viewBox="0 0 {w:.2f} {h:.2f}" font-family="Helvetica, Arial, sans-serif">',
        f'<rect x="0" y="0" width="{w:.2f}" height="{h:.2f}" fill="white"/>',
        f'<text class="title" x="{margin}" y="9" font-size="5">{escape(sheet.title)}</text>',
        f'<text class="title" x="{margin}" y="15.5" font-size="3" data-scale="1:{scale}">Scale 1:{scale} on A3 '
        f"- dimensions in metres{escape(subtitle)}</text>",
        f'<clipPath id="frame"><rect x="{frame_box[0]:.2f}" y="{frame_box[1]:.2f}" '
        f'width="{frame_box[2] - frame_box[0]:.2f}" height="{frame_box[3] - frame_box[1]:.2f}"/></clipPath>',
    ]

    def inside(x: float, y: float) -> bool:
        return frame_box[0] < x < frame_box[2] and frame_box[1] < y < frame_box[3]

    for cls, pts, col in (("ground-points", sheet.ground_points, "#c9cfd4"), ("site-points", sheet.points, "#9aa4ad")):
        if len(pts):
            out.append(f'<g id="{cls}" fill="{col}" clip-path="url(#frame)">')
            for p in pts:
                x, y = P(p)
                if inside(x, y):
                    out.append(f'<circle cx="{x:.2f}" cy="{y:.2f}" r="0.25"/>')
            out.append("</g>")
    for a, b, layer in sheet.lines:
        (x0, y0), (x1, y1) = P(a), P(b)
        sw = 1.2 if layer == "WALLS" else 0.5
        segs.append((np.array([x0, y0]), np.array([x1, y1])))
        out.append(
            f'<line class="{layer.lower()}" x1="{x0:.2f}" y1="{y0:.2f}" x2="{x1:.2f}" y2="{y1:.2f}" '
            f'stroke="#2b2f33" stroke-width="{sw}"/>'
        )
    out.append('<g id="design" fill="#3a6ea5" fill-opacity="0.55" stroke="#1d3f66" stroke-width="0.25">')
    for poly, _ in sheet.polys:
        pp = [np.array(P(p)) for p in poly]
        segs += [(pp[i], pp[(i + 1) % len(pp)]) for i in range(len(pp))]
        out.append('<polygon points="' + " ".join(f"{x:.2f},{y:.2f}" for x, y in pp) + '"/>')
    out.append("</g>")
    # Dimension geometry first (all of it is an obstacle for every text), then the texts.
    dim_geo: list[tuple[Dim, np.ndarray, np.ndarray, np.ndarray]] = []
    out.append('<g id="dimensions" stroke="#c0392b" fill="#c0392b" stroke-width="0.3">')
    for d in sheet.dims:
        n = _left(d.b - d.a) * d.offset
        A, B = np.array(P(d.a + n)), np.array(P(d.b + n))
        EA, EB = np.array(P(d.a)), np.array(P(d.b))
        out_dir = (A - EA) if d.offset != 0 else np.array([0.0, -1.0])
        out_dir = out_dir / (np.linalg.norm(out_dir) + 1e-12)
        if d.offset != 0:
            for E, Q in ((EA, A), (EB, B)):
                gap = E + 1.0 * out_dir  # extension lines start clear of the object...
                end = Q + 1.5 * out_dir  # ...and pass the dimension line a little
                out.append(
                    f'<line class="ext" x1="{gap[0]:.2f}" y1="{gap[1]:.2f}" x2="{end[0]:.2f}" '
                    f'y2="{end[1]:.2f}" stroke-width="0.18"/>'
                )
                segs.append((gap, end))
        out.append(f'<line class="dimline" x1="{A[0]:.2f}" y1="{A[1]:.2f}" x2="{B[0]:.2f}" y2="{B[1]:.2f}"/>')
        segs.append((A, B))
        for T, dirn in ((A, B - A), (B, A - B)):  # 45-degree architectural ticks
            t = dirn / (np.linalg.norm(dirn) + 1e-12)
            tick = (t + out_dir) / math.sqrt(2) * 1.2
            out.append(
                f'<line class="tick" x1="{T[0] - tick[0]:.2f}" y1="{T[1] - tick[1]:.2f}" '
                f'x2="{T[0] + tick[0]:.2f}" y2="{T[1] + tick[1]:.2f}" stroke-width="0.45"/>'
            )
        dim_geo.append((d, A, B, out_dir))
    placed: list[TextBox] = []
    texts: list[str] = []
    centre = np.mean([P(p) for poly, _ in sheet.polys for p in poly], axis=0) if sheet.polys else np.zeros(2)
    for d, A, B, out_dir in dim_geo:
        vx, vy = B - A
        ang = math.degrees(math.atan2(vy, vx))
        if ang >= 90 or ang < -90:  # upright: read from the bottom, or from the right when vertical
            ang -= 180 if ang >= 90 else -180
        if ang >= 90 - 1e-6:
            ang -= 180
        c, s = math.cos(math.radians(ang)), math.sin(math.radians(ang))
        up = np.array([s, -c])  # the text's up, on paper
        txt = d.text()
        length = float(np.linalg.norm(B - A))
        face = up if up @ out_dir >= 0 else -up  # towards the outside of the dimension
        t = (B - A) / (length + 1e-12)
        cands: list[tuple[np.ndarray, bool]] = []  # (baseline point, must fit between the ends)
        for side in (1.0, -1.0):
            f = face * side
            for frac in (0.5, 0.35, 0.65, 0.2, 0.8):
                M = A + frac * (B - A)
                cands.append((M + f * 0.9 if f @ up > 0 else M + f * (0.9 + 0.72 * FONT_MM), True))
        half = CHAR_W * FONT_MM * len(txt) / 2
        ends = sorted(((A, -t), (B, t)), key=lambda e: -float(np.linalg.norm(e[0] - centre)))
        for lift in (0.0, 1.0, 2.0, 3.0, 4.5, 6.0):  # beyond an end (the far one first), stepping out
            for E, along in ends:
                e = E + along * (1.5 + half) + face * (0.9 + lift * 1.3 * FONT_MM)
                if face @ up <= 0:
                    e = e + face * 0.72 * FONT_MM
                cands.append((e, False))
        flat: list[np.ndarray] = []  # a short dimension's text, level, near its far end
        for E, along in ends[:1]:
            for r in (1.0, 1.6, 2.4, 3.4):
                for dirn in (along + face, face, along, along - face, -along + face):
                    dirn = dirn / np.linalg.norm(dirn)
                    flat.append(E + dirn * (half + 2.0) * r / 1.6 * np.array([1.0, 0.6]))
        chosen: tuple[float, float, TextBox, float] | None = None
        options = [(b, btw, ang) for b, btw in cands[:10]] + [(b, False, 0.0) for b in flat]
        options += [(b, btw, ang) for b, btw in cands[10:]]
        for base, between, a_c in options:
            box = text_box(float(base[0]), float(base[1]), txt, FONT_MM, a_c)
            if between and box.hw * 2 > length - 1.0:
                continue
            inside_frame = all(inside(float(x), float(y)) for x, y in box.corners())
            if (
                inside_frame
                and not any(box_hits_segment(box, p, q) for p, q in segs)
                and not any(boxes_overlap(box, o) for o in placed)
            ):
                chosen = (float(base[0]), float(base[1]), box, a_c)
                break
        if chosen is None:  # nowhere clear: beside the middle of the line, as CAD would put it
            base = cands[0][0]
            chosen = (float(base[0]), float(base[1]), text_box(float(base[0]), float(base[1]), txt, FONT_MM, ang), ang)
        x, y, box, ang = chosen
        placed.append(box)
        texts.append(
            f'<text class="dim" data-key="{escape(d.key)}" data-label="{escape(d.label)}" '
            f'data-value-m="{d.value_m:.4f}" x="{x:.2f}" y="{y:.2f}" text-anchor="middle" stroke="none" '
            f'font-size="{FONT_MM}" transform="rotate({ang:.2f} {x:.2f} {y:.2f})">{escape(txt)}</text>'
        )
    out += texts
    out.append("</g>")
    # Title block.
    ty = head + draw_h
    out.append(
        f'<g id="title-block" font-size="3"><rect x="{margin}" y="{ty:.2f}" width="{w - 2 * margin:.2f}" '
        f'height="{tb_h:.2f}" fill="none" stroke="#2b2f33" stroke-width="0.35"/>'
    )
    info = [
        ("project", sheet.project or "-"),
        ("date", sheet.date),
        ("scale", f"1:{scale} on A3"),
        ("units", "metres; ± is 1-sigma"),
    ]
    for i, (key, val) in enumerate(info):
        yy = ty + 6 + 4.2 * i
        out.append(f'<text x="{margin + 3:.2f}" y="{yy:.2f}" fill="#57606a">{escape(key)}</text>')
        out.append(f'<text x="{margin + 20:.2f}" y="{yy:.2f}">{escape(val)}</text>')
    tx = margin + 95
    for i, (label, val) in enumerate(sheet.table):
        yy = ty + 6 + 4.2 * i
        out.append(f'<text x="{tx:.2f}" y="{yy:.2f}" fill="#57606a">{escape(label)}</text>')
        out.append(f'<text x="{tx + 62:.2f}" y="{yy:.2f}">{escape(val)}</text>')
    # Scale bar (1 m) under the sheet facts, the arrow at the block's right.
    bx, byy = margin + 3, ty + tb_h - 5
    out.append(f'<rect x="{bx:.2f}" y="{byy - 1.5:.2f}" width="{k:.2f}" height="1.5" fill="black"/>')
    out.append(f'<text x="{bx + k + 2:.2f}" y="{byy:.2f}">1 m</text>')
    if sheet.arrow is not None:
        v, what = sheet.arrow
        cx, cy = w - margin - 14, ty + 13
        dx, dy = float(v[0]) * 7, -float(v[1]) * 7
        out.append(
            f'<line x1="{cx - dx:.2f}" y1="{cy - dy:.2f}" x2="{cx + dx:.2f}" y2="{cy + dy:.2f}" '
            'stroke="#2b2f33" stroke-width="0.5"/>'
        )
        nx, ny = -dy / 7 * 1.6, dx / 7 * 1.6
        hx, hy = cx + dx * 0.6, cy + dy * 0.6
        out.append(
            f'<polygon points="{cx + dx:.2f},{cy + dy:.2f} {hx + nx:.2f},{hy + ny:.2f} '
            f'{hx - nx:.2f},{hy - ny:.2f}" fill="#2b2f33"/>'
        )
        out.append(f'<text x="{cx:.2f}" y="{ty + 26:.2f}" text-anchor="middle">{escape(what)}</text>')
    out.append("</g>")
    out.append("</svg>")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(out), encoding="utf-8")
    tmp.replace(path)
    return scale


def write_dxf(sheet: Sheet, path: Path, *, scale: int | None = None) -> None:
    """The same sheet as DXF: model space in metres ($INSUNITS 6), layers that hold what their
    names say (SITE: points above the ground, GROUND: points on it, WALLS, DESIGN, DIMENSIONS,
    TITLE), real DIMENSION entities that display the measurement in metres, upright, and the
    extents set. The title block sits under the drawing, sized for the stated paper scale."""
    import ezdxf
    from ezdxf import appsettings, units, zoom

    scale = scale or choose_scale(sheet)
    mm = scale / 1000.0  # model metres per paper millimetre
    doc = ezdxf.new("R2010", setup=True)
    doc.units = units.M
    doc.header["$MEASUREMENT"] = 1  # metric
    doc.header["$LUNITS"] = 2  # decimal
    doc.header["$LUPREC"] = 3
    for name, color in (("SITE", 8), ("GROUND", 9), ("WALLS", 7), ("DESIGN", 5), ("DIMENSIONS", 1), ("TITLE", 7)):
        doc.layers.add(name, color=color)
    msp = doc.modelspace()
    for pts, layer in ((sheet.points, "SITE"), (sheet.ground_points, "GROUND")):
        for p in pts[:: max(1, len(pts) // 3000)]:
            msp.add_point((float(p[0]), float(p[1])), dxfattribs={"layer": layer})
    for a, b, layer in sheet.lines:
        msp.add_line(tuple(a), tuple(b), dxfattribs={"layer": layer})
    for poly, layer in sheet.polys:
        msp.add_lwpolyline([tuple(p) for p in poly], close=True, dxfattribs={"layer": layer})
    style = {
        "dimlfac": 1.0,  # ezdxf's EZDXF style has 100 (centimetres from metres): CAD showed "350"
        "dimdec": 3,
        "dimtxt": FONT_MM * mm,
        "dimasz": 1.5 * mm,
        "dimexo": 1.0 * mm,
        "dimexe": 1.5 * mm,
        "dimgap": 0.8 * mm,
        "dimtad": 1,  # text above the line
        "dimtih": 0,
        "dimtoh": 0,
        "dimzin": 0,  # keep trailing zeros: 3.500
    }
    for d in sheet.dims:
        a, b = np.asarray(d.a, float), np.asarray(d.b, float)
        off = d.offset if d.offset else 0.3
        base = (a + b) / 2 + _left(b - a) * off
        # Upright text: measure from the end that makes the line point right (or up).
        ang = math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))
        if ang >= 90 - 1e-6 or ang < -90 + 1e-6:
            a, b = b, a
            ang = math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))
        text = "<>" if d.sigma_m is None else f"<> ±{d.sigma_m:.3f}"
        dim = msp.add_linear_dim(
            base=tuple(base),
            p1=tuple(a),
            p2=tuple(b),
            angle=ang,
            text=text,
            dimstyle="EZDXF",
            override=style,
            dxfattribs={"layer": "DIMENSIONS"},
        )
        dim.render()
    # Title block under the drawing.
    ext = sheet.extent()
    x0, y_top = float(ext[0, 0]), float(ext[0, 1]) - 12 * mm
    width = max(float(ext[1, 0] - ext[0, 0]), 230 * mm)
    rows = [
        ("title", sheet.title),
        ("project", sheet.project or "-"),
        ("date", sheet.date),
        ("scale", f"1:{scale} on A3"),
        ("units", "metres; ± is 1-sigma"),
        *list(sheet.table),
    ]
    th = 3.0 * mm
    height = (len(rows) + 1) * 1.6 * th
    msp.add_lwpolyline(
        [(x0, y_top), (x0 + width, y_top), (x0 + width, y_top - height), (x0, y_top - height)],
        close=True,
        dxfattribs={"layer": "TITLE"},
    )
    for i, (key, val) in enumerate(rows):
        y = y_top - (i + 1) * 1.6 * th
        msp.add_text(key, height=th, dxfattribs={"layer": "TITLE"}).set_placement((x0 + 2 * mm, y))
        msp.add_text(val, height=th, dxfattribs={"layer": "TITLE"}).set_placement((x0 + 60 * mm, y))
    if sheet.arrow is not None:
        v, what = sheet.arrow
        c = np.array([x0 + width - 20 * mm, y_top - height / 2])
        tip, tail = c + v * 8 * mm, c - v * 8 * mm
        n = _left(v) * 2 * mm
        msp.add_line(tuple(tail), tuple(tip), dxfattribs={"layer": "TITLE"})
        msp.add_solid(
            [tuple(tip), tuple(tip - v * 4 * mm + n), tuple(tip - v * 4 * mm - n)], dxfattribs={"layer": "TITLE"}
        )
        msp.add_text(what, height=th, dxfattribs={"layer": "TITLE"}).set_placement((float(c[0]) + 10 * mm, float(c[1])))
    # ezdxf writes $EXTMIN/$EXTMAX from the model space layout's own extents when it saves.
    box = appsettings.update_extents(doc)
    if box.has_data:
        msp.dxf.extmin, msp.dxf.extmax = box.extmin, box.extmax
        zoom.extents(msp, factor=1.05)
    tmp = path.with_name(f".{path.name}.tmp")
    doc.saveas(tmp)
    tmp.replace(path)
