"""Drawings checked the way their users read them, on a synthetic site with exact answers.

The site: level-ish ground (z = 0.01 x, so the ground falls 3.5 cm across a 3.5 m gate), a wall
at x = 2.5 (its plane is a facade), a hedge of points at x = -2.2, and the sample gate (3.5 m
overall, posts 0.12 m, so a 3.26 m clear opening, 1.75 m high) placed at (0, 1) facing -Y.
Seen from the front (from -Y), the gate's -X end is on the right.

- DXF: what CAD shows is the text ezdxf's drawing add-on renders out of each DIMENSION's block;
  it must be the measurement in $INSUNITS (metres), upright; the auditor finds nothing; extents,
  title block and every layer hold what their names say.
- SVG: every text's box (measured with the font a browser here uses for Helvetica) is inside
  the viewBox and crosses no line and no other text; the title is the topmost text.
"""

from __future__ import annotations

import math
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import ezdxf
import numpy as np
import pytest
from ezdxf.entities import Dimension, MText
from PIL import ImageFont

from reconstruct.design import load_design
from reconstruct.drawing import elevation, fabrication_dimensions, top_view, write_dxf, write_svg
from reconstruct.placement import Placement
from reconstruct.plan import placed_meshes
from tests.conftest import SAMPLE

SVG = "{http://www.w3.org/2000/svg}"
GATE = SAMPLE / "design" / "gate.json"


def synthetic_site() -> tuple[np.ndarray, list[dict[str, object]]]:
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.linspace(-4, 4, 81), np.linspace(-3, 5, 81))
    ground = np.column_stack([gx.ravel(), gy.ravel(), 0.01 * gx.ravel()])
    wy, wz = np.meshgrid(np.linspace(-3, 5, 60), np.linspace(0.1, 2.5, 20))
    wall = np.column_stack([np.full(wy.size, 2.5), wy.ravel(), wz.ravel()])
    hy, hz = np.meshgrid(np.linspace(0.5, 1.5, 12), np.linspace(0.3, 1.2, 8))
    hedge = np.column_stack([-2.2 + rng.uniform(-0.01, 0.01, hy.size), hy.ravel(), hz.ravel()])
    pts = np.vstack([ground, wall, hedge])
    return pts, [{"plane": [1.0, 0.0, 0.0, 2.5], "inliers": len(wall)}]


@pytest.fixture()
def sheets(tmp_path: Path) -> tuple[Path, dict[str, dict[str, object]]]:
    pts, facades = synthetic_site()
    design = load_design(GATE)
    pl = Placement(np.eye(3), np.array([0.0, 1.0, 0.0]), 1.0, 3.5, 0.03, "site", [])
    world = [(m.vertices, m.faces) for m in placed_meshes(design, pl)]
    pj = pl.to_json()
    opening = (np.array([-1.75, 1.0, 0.0]), np.array([1.75, 1.0, 0.0]))
    ms = fabrication_dimensions(
        world, pj, pts, facades, scale_sigma_rel=0.005, opening=opening, ground_plane=(0.0, 0.0, 1.0, 0.0)
    )
    top = top_view(world, pj, pts, facades, design_name="Gate", measures=ms, project="P-1")
    scale = write_svg(top, tmp_path / "plan.svg")
    write_dxf(top, tmp_path / "plan.dxf", scale=scale)
    write_svg(elevation(world, pj, pts, design_name="Gate", measures=ms), tmp_path / "elevation.svg")
    return tmp_path, {m.key: m.to_json() for m in ms}


def test_fabrication_dimensions_are_the_exact_ones(sheets: tuple[Path, dict[str, dict[str, object]]]) -> None:
    _, m = sheets
    assert m["overall_width"]["value_m"] == pytest.approx(3.5, abs=1e-3)
    assert m["clear_opening"]["value_m"] == pytest.approx(3.26, abs=1e-3)
    assert m["height"]["value_m"] == pytest.approx(1.75, abs=1e-3)
    assert m["site_opening"]["value_m"] == pytest.approx(3.5, abs=1e-3) and m["site_opening"]["sigma_m"] == 0.03
    # From the posts' outer faces (x = +-1.75), not from the gate's centre.
    assert m["post_to_wall_left"]["value_m"] == pytest.approx(0.75, abs=0.01)
    assert m["post_to_obstacle_right"]["value_m"] == pytest.approx(0.45, abs=0.02)
    assert m["ground_fall"]["value_m"] == pytest.approx(0.035, abs=0.005)
    assert "lower at the right" in str(m["ground_fall"]["note"])
    for k in ("post_to_wall_left", "post_to_obstacle_right", "ground_fall", "site_opening"):
        s = m[k]["sigma_m"]
        assert isinstance(s, float) and 0.0 < s < 0.1, k  # each site number carries its +-
    for k in ("overall_width", "clear_opening", "height"):
        assert m[k]["sigma_m"] is None and m[k]["source"] == "design"


def _displayed_dimension_texts(doc: ezdxf.document.Drawing) -> list[tuple[str, float]]:
    """Render the model space with ezdxf's drawing add-on, as a viewer does, and collect each
    text it draws with its angle (degrees)."""
    from ezdxf.addons.drawing import Frontend, RenderContext, layout, svg

    backend = svg.SVGBackend()
    fe = Frontend(RenderContext(doc), backend)
    seen: list[tuple[str, float]] = []
    orig = fe.pipeline.draw_text

    def record(text, transform, properties, cap_height, dxftype=None):  # type: ignore[no-untyped-def]
        ux = transform.ux
        seen.append((text, math.degrees(math.atan2(ux.y, ux.x))))
        return orig(text, transform, properties, cap_height, dxftype)

    fe.pipeline.draw_text = record
    fe.draw_layout(doc.modelspace())
    assert backend.get_string(layout.Page(0, 0)).startswith("<?xml")
    return seen


def test_cad_reads_the_measurements_in_metres_upright(sheets: tuple[Path, dict[str, dict[str, object]]]) -> None:
    tmp, m = sheets
    doc = ezdxf.readfile(tmp / "plan.dxf")
    auditor = doc.audit()
    assert not auditor.errors and not auditor.fixes
    assert doc.header["$INSUNITS"] == 6  # metres
    # What each DIMENSION displays is the MTEXT in its geometry block: the measurement, in metres.
    shown = {}
    for d in doc.modelspace().query("DIMENSION"):
        texts = [e.plain_text() for e in doc.blocks.get(d.dxf.geometry) if isinstance(e, MText)]
        assert len(texts) == 1
        number = float(texts[0].split()[0])
        assert isinstance(d, Dimension)
        assert number == pytest.approx(d.get_measurement(), abs=6e-4), texts  # DIMLFAC 1: no "350"
        shown[round(number, 3)] = texts[0]
    for key in ("overall_width", "clear_opening", "site_opening", "post_to_wall_left", "post_to_obstacle_right"):
        v = float(m[key]["value_m"])  # type: ignore[arg-type]
        assert round(v, 3) in shown, (key, shown)
        if m[key]["sigma_m"] is not None:
            assert f"±{float(m[key]['sigma_m']):.3f}" in shown[round(v, 3)]  # type: ignore[arg-type]
    rendered = _displayed_dimension_texts(doc)
    for text in shown.values():
        hits = [a for t, a in rendered if t.strip() == text.strip()]
        assert hits, (text, rendered[:20])
        assert all(-90 < a <= 90 for a in hits), (text, hits)  # readable from the bottom or the right
    assert "3.500" in shown[3.5] and not any(t.startswith("350") for t in shown.values())
    # Zoom extents works: the header holds the drawing's real extents.
    lo, hi = doc.header["$EXTMIN"], doc.header["$EXTMAX"]
    assert -20 < lo[0] < hi[0] < 20 and -20 < lo[1] < hi[1] < 20
    # Layers hold what their names say; the title block says project, date, scale and units.
    layers: dict[str, list[str]] = {}
    for e in doc.modelspace():
        layers.setdefault(e.dxf.layer, []).append(e.dxftype())
    assert set(layers) >= {"SITE", "GROUND", "WALLS", "DESIGN", "DIMENSIONS", "TITLE"}
    assert set(layers["GROUND"]) == {"POINT"} and set(layers["DIMENSIONS"]) == {"DIMENSION"}
    title = " ".join(e.dxf.text for e in doc.modelspace().query("TEXT[layer=='TITLE']"))
    for word in ("P-1", "1:", "metres", "date", "facade"):
        assert word in title, word


def _font() -> ImageFont.FreeTypeFont:
    path = subprocess.run(["fc-match", "Helvetica", "--format=%{file}"], capture_output=True, text=True).stdout
    assert path, "fontconfig finds no font for Helvetica"
    return ImageFont.truetype(path, 100)


def _boxes(root: ET.Element, font: ImageFont.FreeTypeFont) -> list[tuple[str, np.ndarray]]:
    """Each text's box on the sheet (4 corners, user units), from its real glyph extents."""
    out = []
    for t in root.iter(f"{SVG}text"):
        size = float(t.get("font-size") or _inherited_size(root, t))
        x, y = float(t.get("x", 0)), float(t.get("y", 0))
        x0, y0, x1, y1 = font.getbbox(t.text or "", anchor="ls")  # baseline-left origin, pixels at 100
        k = size / 100.0
        anchor = t.get("text-anchor", "start")
        shift = {"start": 0.0, "middle": -(x1 - x0) * k / 2, "end": -(x1 - x0) * k}[anchor]
        c = np.array(
            [[x0 * k + shift, y0 * k], [x1 * k + shift, y0 * k], [x1 * k + shift, y1 * k], [x0 * k + shift, y1 * k]]
        )
        ang = 0.0
        m = re.match(r"rotate\(([-\d.]+) ([-\d.]+) ([-\d.]+)\)", t.get("transform", ""))
        if m:
            ang = math.radians(float(m.group(1)))
        R = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        out.append((t.text or "", c @ R.T + np.array([x, y])))
    return out


def _inherited_size(root: ET.Element, t: ET.Element) -> str:
    parents = {c: p for p in root.iter() for c in p}
    p = parents.get(t)
    while p is not None:
        if p.get("font-size"):
            return str(p.get("font-size"))
        p = parents.get(p)
    return "16"


def _segments(root: ET.Element) -> list[np.ndarray]:
    segs = []
    for ln in root.iter(f"{SVG}line"):
        segs.append(
            np.array(
                [[float(ln.get(k + "1", 0)), float(ln.get(k.replace("x", "y") + "1", 0))] for k in ("x",)]
                + [[float(ln.get("x2", 0)), float(ln.get("y2", 0))]]
            )
        )
    for pg in root.iter(f"{SVG}polygon"):
        p = np.array([[float(v) for v in xy.split(",")] for xy in (pg.get("points") or "").split()])
        segs += [np.array([p[i], p[(i + 1) % len(p)]]) for i in range(len(p))]
    for r in root.iter(f"{SVG}rect"):
        if r.get("fill") == "white":
            continue  # the page itself
        x, y, w, h = (float(r.get(k, 0)) for k in ("x", "y", "width", "height"))
        c = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
        segs += [np.array([c[i], c[(i + 1) % 4]]) for i in range(4)]
    return segs


def _overlap(p: np.ndarray, q: np.ndarray) -> bool:
    for poly in (p, q):
        for i in range(len(poly)):
            e = poly[(i + 1) % len(poly)] - poly[i]
            n = np.array([-e[1], e[0]])
            if not n.any():
                continue
            a, b = p @ n, q @ n
            if a.max() <= b.min() + 1e-6 or b.max() <= a.min() + 1e-6:
                return False
    return True


def check_sheet_reads_cleanly(path: Path) -> None:
    root = ET.parse(path).getroot()
    vb = [float(v) for v in (root.get("viewBox") or "").split()]
    font = _font()
    boxes = _boxes(root, font)
    segs = _segments(root)
    assert boxes and segs
    for text, box in boxes:
        assert (box[:, 0] >= vb[0]).all() and (box[:, 0] <= vb[2]).all(), f"{path.name}: '{text}' off the page"
        assert (box[:, 1] >= vb[1]).all() and (box[:, 1] <= vb[3]).all(), f"{path.name}: '{text}' off the page"
        for s in segs:
            assert not _overlap(box, s), f"{path.name}: '{text}' lies over a line {s.round(1).tolist()}"
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            assert not _overlap(a, b), f"{path.name}: '{ta}' overlaps '{tb}'"
    # The title is on top: no text and no point above it.
    title_bottom = max(b[:, 1].max() for t, b in boxes if t.startswith(("Top view", "Front elevation")))
    assert all(b[:, 1].min() >= title_bottom - 1e-6 for t, b in boxes if not t.startswith(("Top", "Front", "Scale")))
    for c in root.iter(f"{SVG}circle"):
        cx, cy = float(c.get("cx", 0)), float(c.get("cy", 0))
        assert vb[0] <= cx <= vb[2] and title_bottom < cy <= vb[3], f"{path.name}: a site point off the sheet"


def test_svg_text_crosses_no_line_and_stays_on_the_page(sheets: tuple[Path, dict[str, dict[str, object]]]) -> None:
    tmp, _ = sheets
    for name in ("plan.svg", "elevation.svg"):
        check_sheet_reads_cleanly(tmp / name)
    root = ET.parse(tmp / "plan.svg").getroot()
    dims = {t.get("data-key"): t.text for t in root.iter(f"{SVG}text") if t.get("class") == "dim"}
    assert dims["post_to_wall_left"] is not None and "0.750 ±" in dims["post_to_wall_left"]
    assert dims["clear_opening"] == "clear 3.260"
