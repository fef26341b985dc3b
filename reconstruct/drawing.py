"""Dimensioned drawings of the placed design: top view (SVG + DXF) and front elevation (SVG).

Drawings are built once as a small list of primitives in site metres (:class:`Sheet`), then
written to SVG (paper millimetres at a stated scale) and to DXF (model space in metres, true
DIMENSION entities via ezdxf so CAD users can measure and re-dimension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import trimesh

PAPER_SCALES = (20, 50, 100, 200, 500)
MAX_PAPER_MM = (380.0, 260.0)  # A3 landscape, less margins


@dataclass
class Dim:
    a: np.ndarray  # 2D, metres
    b: np.ndarray
    offset: float  # metres, to the left of a->b
    label: str  # e.g. "width"
    value_m: float


@dataclass
class Sheet:
    title: str
    polys: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (N x 2, layer)
    lines: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    dims: list[Dim] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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


def _hulls_xy(vertices: np.ndarray, faces: np.ndarray) -> list[np.ndarray]:
    """One 2D convex outline per connected component of a mesh, projected onto XY."""
    out = []
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    for comp in mesh.split(only_watertight=False):
        xy = np.asarray(comp.vertices)[:, :2]
        if len(xy) < 3:
            continue
        try:
            import cv2

            hull = cv2.convexHull(xy.astype(np.float32)).reshape(-1, 2).astype(float)
        except Exception:
            continue
        if len(hull) >= 3:
            out.append(hull)
    return out


def _wall_segments(
    points: np.ndarray, facades: list[dict[str, Any]], tol: float = 0.05
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each facade plane's trace on the ground, over the extent of the points on it."""
    segs: list[tuple[np.ndarray, np.ndarray]] = []
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
        on = np.abs(points @ np.array([nx, ny, nz]) - d) < tol
        if on.sum() < 20:
            continue
        p = points[on][:, :2]
        direc = np.array([-ny, nx]) / np.linalg.norm(n2)
        s = p @ direc
        foot = n2 * d / (n2 @ n2)
        lo, hi = np.percentile(s, [1, 99])
        base = foot - (foot @ direc) * direc
        segs.append((base + lo * direc, base + hi * direc))
    return segs


def _point_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    s = float(np.clip((p - a) @ ab / (ab @ ab + 1e-12), 0, 1))
    return a + s * ab


def top_view(
    design_world: list[tuple[np.ndarray, np.ndarray]],
    placement: dict[str, Any],
    site_points: np.ndarray,
    facades: list[dict[str, Any]],
    *,
    design_name: str,
    opening: tuple[np.ndarray, np.ndarray] | None = None,
) -> Sheet:
    """The plan: site points and walls, the design's footprint, and its dimensions."""
    sheet = Sheet(title=f"Top view: {design_name}")
    allv = np.vstack([v for v, _ in design_world])
    centre = allv.mean(axis=0)[:2]
    # Site context within a radius of the design.
    r = max(6.0, 2.0 * float(np.ptp(allv[:, :2], axis=0).max()))
    near = np.linalg.norm(site_points[:, :2] - centre, axis=1) < r
    base = float(placement["position_m"][2])  # the ground under the design (z = 0 unless it slopes)
    ctx = site_points[near & (site_points[:, 2] > base + 0.1)]
    if len(ctx) > 6000:
        ctx = ctx[np.random.default_rng(0).choice(len(ctx), 6000, replace=False)]
    sheet.points = ctx[:, :2]
    walls = [
        (a, b)
        for a, b in _wall_segments(site_points, facades)
        if np.linalg.norm(_point_segment(centre, a, b) - centre) < r
    ]
    for a, b in walls:
        sheet.lines.append((a, b, "WALLS"))
    for v, f in design_world:
        for hull in _hulls_xy(v, f):
            sheet.polys.append((hull, "DESIGN"))
    # Width dimension along the design's own X axis, in front of it.
    yaw = math.radians(placement["rotation_deg"])
    ax = np.array([math.cos(yaw), math.sin(yaw)])
    s = (allv[:, :2] - centre) @ ax
    a, b = centre + s.min() * ax, centre + s.max() * ax
    perp = (allv[:, :2] - centre) @ _left(ax)
    # Dimension lines go in front of the design (its +Y, towards the photographer), clear of the site.
    front = float(perp.max())
    sheet.dims.append(Dim(a, b, offset=front + 0.5, label="design width", value_m=float(s.max() - s.min())))
    if opening is not None:
        oa, ob = opening
        sheet.dims.append(
            Dim(
                oa[:2],
                ob[:2],
                offset=front + 1.0,
                label="opening",
                value_m=float(np.linalg.norm(ob[:2] - oa[:2])),
            )
        )
    if walls:
        feet = [(_point_segment(centre, a, b), a, b) for a, b in walls]
        foot, _, _ = min(feet, key=lambda f: float(np.linalg.norm(f[0] - centre)))
        dist = float(np.linalg.norm(foot - centre))
        if dist > 0.05:
            sheet.dims.append(Dim(centre, foot, offset=0.0, label="to nearest wall", value_m=dist))
    return sheet


def elevation(
    design_world: list[tuple[np.ndarray, np.ndarray]],
    placement: dict[str, Any],
    site_points: np.ndarray,
    *,
    design_name: str,
) -> Sheet:
    """Front view: looking at the design's front, X along its width, up is +Z."""
    yaw = math.radians(placement["rotation_deg"])
    ax = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    fr = np.array([-math.sin(yaw), math.cos(yaw), 0.0])
    origin = np.asarray(placement["position_m"], float)

    def to2(v: np.ndarray) -> np.ndarray:  # heights from the design's base, on the ground
        return np.column_stack([(v - origin) @ ax, v[:, 2] - origin[2]])

    sheet = Sheet(title=f"Front elevation: {design_name}")
    allv = np.vstack([v for v, _ in design_world])
    for v, f in design_world:
        for hull in _hulls_xy(to3(to2(v)), f):
            sheet.polys.append((hull, "DESIGN"))
    xs = to2(allv)
    # Site behind the design, within 8 m, as context.
    rel = site_points - origin
    depth = rel @ -fr
    keep = (depth > 0) & (depth < 8) & (np.abs(rel @ ax) < 8) & (rel[:, 2] > -0.5)
    ctx = to2(site_points[keep])
    if len(ctx) > 6000:
        ctx = ctx[np.random.default_rng(0).choice(len(ctx), 6000, replace=False)]
    sheet.points = ctx
    x0, x1 = float(xs[:, 0].min()), float(xs[:, 0].max())
    sheet.lines.append((np.array([min(x0, -4.0), 0.0]), np.array([max(x1, 4.0), 0.0]), "GROUND"))
    sheet.dims.append(Dim(np.array([x0, 0.0]), np.array([x1, 0.0]), offset=-0.4, label="width", value_m=x1 - x0))
    zmax = float(xs[:, 1].max())
    sheet.dims.append(Dim(np.array([x1, 0.0]), np.array([x1, zmax]), offset=-0.4, label="height", value_m=zmax))
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


def write_svg(sheet: Sheet, path: Path, *, subtitle: str = "") -> int:
    """Write the sheet to SVG at a standard scale; returns the scale denominator."""
    scale = choose_scale(sheet)
    ext = sheet.extent()
    margin, head = 15.0, 22.0
    k = 1000.0 / scale  # paper mm per metre
    w = (ext[1, 0] - ext[0, 0]) * k + 2 * margin
    h = (ext[1, 1] - ext[0, 1]) * k + 2 * margin + head

    def P(p: np.ndarray) -> tuple[float, float]:
        return (margin + (p[0] - ext[0, 0]) * k, head + margin + (ext[1, 1] - p[1]) * k)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.1f}mm" height="{h:.1f}mm" '
        f'viewBox="0 0 {w:.2f} {h:.2f}" font-family="Helvetica, Arial, sans-serif">',
        f'<rect x="0" y="0" width="{w:.2f}" height="{h:.2f}" fill="white"/>',
        f'<text x="{margin}" y="8" font-size="4.2" font-weight="bold">{escape(sheet.title)}</text>',
        f'<text x="{margin}" y="14" font-size="3" data-scale="1:{scale}">Scale 1:{scale} '
        f"(on paper at {w:.0f} x {h:.0f} mm) - dimensions in metres{escape(subtitle)}</text>",
    ]
    if len(sheet.points):
        out.append('<g id="site-points" fill="#9aa4ad">')
        for p in sheet.points:
            x, y = P(p)
            out.append(f'<circle cx="{x:.2f}" cy="{y:.2f}" r="0.25"/>')
        out.append("</g>")
    for a, b, layer in sheet.lines:
        (x0, y0), (x1, y1) = P(a), P(b)
        sw = 1.2 if layer == "WALLS" else 0.5
        out.append(
            f'<line class="{layer.lower()}" x1="{x0:.2f}" y1="{y0:.2f}" x2="{x1:.2f}" y2="{y1:.2f}" '
            f'stroke="#2b2f33" stroke-width="{sw}"/>'
        )
    out.append('<g id="design" fill="#3a6ea5" fill-opacity="0.55" stroke="#1d3f66" stroke-width="0.25">')
    for poly, _ in sheet.polys:
        pts = " ".join(f"{x:.2f},{y:.2f}" for x, y in (P(p) for p in poly))
        out.append(f'<polygon points="{pts}"/>')
    out.append("</g>")
    out.append('<g id="dimensions" stroke="#c0392b" fill="#c0392b" stroke-width="0.3" font-size="3">')
    for d in sheet.dims:
        n = _left(d.b - d.a) * d.offset
        a2, b2 = d.a + n, d.b + n
        (x0, y0), (x1, y1) = P(a2), P(b2)
        (ea, fa), (eb, fb) = P(d.a), P(d.b)
        if d.offset != 0:
            out.append(f'<line x1="{ea:.2f}" y1="{fa:.2f}" x2="{x0:.2f}" y2="{y0:.2f}" stroke-dasharray="1,1"/>')
            out.append(f'<line x1="{eb:.2f}" y1="{fb:.2f}" x2="{x1:.2f}" y2="{y1:.2f}" stroke-dasharray="1,1"/>')
        out.append(f'<line x1="{x0:.2f}" y1="{y0:.2f}" x2="{x1:.2f}" y2="{y1:.2f}"/>')
        for cx, cy in ((x0, y0), (x1, y1)):
            out.append(f'<circle cx="{cx:.2f}" cy="{cy:.2f}" r="0.6"/>')
        ang = math.degrees(math.atan2(y1 - y0, x1 - x0))
        if ang > 90 or ang < -90:
            ang += 180
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        out.append(
            f'<text class="dim" data-label="{escape(d.label)}" data-value-m="{d.value_m:.4f}" '
            f'x="{mx:.2f}" y="{my - 1.2:.2f}" text-anchor="middle" stroke="none" '
            f'transform="rotate({ang:.2f} {mx:.2f} {my:.2f})">{escape(d.label)} {d.value_m:.3f} m</text>'
        )
    out.append("</g>")
    # Scale bar: 1 m.
    bx, by = margin, h - 5
    out.append(
        f'<g id="scale-bar"><rect x="{bx:.2f}" y="{by - 1.5:.2f}" width="{k:.2f}" height="1.5" fill="black"/>'
        f'<text x="{bx + k + 2:.2f}" y="{by:.2f}" font-size="3">1 m</text></g>'
    )
    out.append("</svg>")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(out))
    tmp.replace(path)
    return scale


def write_dxf(sheet: Sheet, path: Path) -> None:
    """The same sheet as DXF: model space in metres, layers, real DIMENSION entities."""
    import ezdxf
    from ezdxf import units

    doc = ezdxf.new("R2010", setup=True)
    doc.units = units.M
    for name, color in (("SITE", 8), ("WALLS", 7), ("DESIGN", 5), ("DIMENSIONS", 1), ("GROUND", 7)):
        doc.layers.add(name, color=color)
    msp = doc.modelspace()
    for p in sheet.points[:: max(1, len(sheet.points) // 3000)]:
        msp.add_point((float(p[0]), float(p[1])), dxfattribs={"layer": "SITE"})
    for a, b, layer in sheet.lines:
        msp.add_line(tuple(a), tuple(b), dxfattribs={"layer": layer})
    for poly, layer in sheet.polys:
        msp.add_lwpolyline([tuple(p) for p in poly], close=True, dxfattribs={"layer": layer})
    for d in sheet.dims:
        dim = msp.add_aligned_dim(
            p1=tuple(d.a),
            p2=tuple(d.b),
            distance=d.offset if d.offset else 0.3,
            dimstyle="EZDXF",
            override={"dimdec": 3, "dimtxt": 0.12},
            dxfattribs={"layer": "DIMENSIONS"},
        )
        dim.render()
    tmp = path.with_name(f".{path.name}.tmp")
    doc.saveas(tmp)
    tmp.replace(path)
