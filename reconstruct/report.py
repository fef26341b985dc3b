"""report.html: one self-contained page a designer opens, saves or mails, and shows a client.

The page opens with what the client sees: the montages large, the plan, the 3D view, the key
dimensions with their uncertainty, the date and the designer's company. Photos are numbered,
never named. The technical part (scale, model, privacy, photos not placed and why, timings)
is a collapsed annex. Every image, the 3D model and the viewer's script are embedded, so the
page saved alone (from the API or the CLI) shows everything, offline.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Collection
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

ASSETS = Path(__file__).resolve().parent / "assets"
VIEWER_JS = "model-viewer.min.js"

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#1f2328;padding:0 16px}
header{display:flex;justify-content:space-between;align-items:baseline;border-bottom:2px solid #1f2328}
header .company{font-size:18px;font-weight:bold} header .date{color:#57606a}
h1{font-size:26px;margin:18px 0 4px} h2{font-size:18px;margin-top:30px;border-bottom:1px solid #d0d7de}
.sub{color:#57606a} table{border-collapse:collapse;margin:8px 0}
td,th{padding:5px 12px;border:1px solid #d0d7de;text-align:left} td.num{text-align:right;white-space:nowrap}
th{background:#f6f8fa} figure{margin:0 0 18px} figure img{width:100%;border:1px solid #d0d7de;display:block}
figcaption{font-size:13px;color:#57606a;margin-top:4px}
img.drawing{width:100%;border:1px solid #d0d7de;background:white} .warn{color:#9a6700}
model-viewer{width:100%;height:560px;background:#eef1f4;border:1px solid #d0d7de}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px}
details.annex{margin-top:36px;border-top:2px solid #d0d7de;padding-top:8px}
details.annex summary{font-size:18px;font-weight:bold;cursor:pointer}
"""


def _row(*cells: Any, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{escape(str(c))}</{tag}>" for c in cells) + "</tr>"


SITE_KEYS = (
    "scale",
    "scale_sigma_rel",
    "scale_source",
    "ground_plane",
    "up_source",
    "registered_images",
    "unregistered_images",
    "num_points",
    "mean_reprojection_error_px",
    "choices",
    "timings",
)


def plan_report(site_info: dict[str, Any], plan_result: dict[str, Any]) -> dict[str, Any]:
    """The report of a plan made from a RUN_DIR (``siteplan plan``): no job, no privacy gate run."""
    timings = {f"plan: {k.removesuffix('_s')}": v for k, v in plan_result.get("timings", {}).items()}
    return {
        "site": {k: site_info.get(k) for k in SITE_KEYS},
        "plan": plan_result,
        "timings_s": timings,
    }


def _href(name: str) -> str:
    """A file name as a relative link: URL-quoted (a photo named 'IMG #2' must not end at '#'),
    then HTML-escaped."""
    return escape(quote(name))


def _viewer_inline() -> str:
    """model-viewer's script, fit to sit inside a <script> element: it holds no '</script' (which
    would end the element early) and no '<script' (after its '<!--' that would swallow ours)."""
    js = (ASSETS / "model-viewer-umd.min.js").read_text(encoding="utf-8")
    low = js.lower()
    if "</script" in low or "<script" in low:
        raise ValueError("model-viewer's script cannot be inlined as it is")
    return js


def _data_uri(path: Path, media: str) -> str:
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"


def photo_numbers(site: dict[str, Any], plan: dict[str, Any]) -> dict[str, int]:
    """Each photo's number on the page (1, 2, ...): the photos in name order. Names are not shown
    (they may be a client's, or an upload's id)."""
    names = set(site.get("registered_images") or []) | set(site.get("unregistered_images") or [])
    names |= {m["image"] for m in plan.get("montages", [])}
    return {n: i + 1 for i, n in enumerate(sorted(names))}


def _dimension_rows(plan: dict[str, Any], site: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, value, uncertainty) from plan.json's one list of dimensions."""
    rows = []
    for d in plan.get("dimensions", []):
        if "key" not in d:  # a plan.json from before the fabrication dimensions
            sig = d["value_m"] * (site.get("scale_sigma_rel") or 0.0)
            rows.append((d["label"], f"{d['value_m']:.3f} m", f"± {sig:.3f} m (scale only)"))
            continue
        unc = "as designed" if d["sigma_m"] is None else f"± {d['sigma_m']:.3f} m"
        label = d["label"] + (f" ({d['note'].split(';')[-1].strip()})" if d["key"] == "ground_fall" else "")
        rows.append((label, f"{d['value_m']:.3f} m", unc))
    return rows


def write_report_html(
    report: dict[str, Any],
    path: Path,
    *,
    published: Collection[str] | None = None,
    company: str | None = None,
) -> None:
    """report.html from a report dict (report.json's content; ``job`` and ``privacy`` optional).

    Self-contained: montages, drawings, the 3D model and the viewer's script are embedded, so the
    page works saved alone. ``published``: the files the annex may link (the API serves only
    some); by default those present beside it. ``company``: the designer's business name (a
    policy field: the tenant's label, or the CLI's --company), else ``report['designer']``."""

    def linkable(name: str) -> bool:
        return name in published if published is not None else (path.parent / name).exists()

    folder = path.parent
    plan = report["plan"]
    site = report["site"]
    priv = report.get("privacy")
    job = report.get("job")
    pl = plan["placement"]
    design = plan["design"]
    scale = site.get("scale")
    company = company if company is not None else (report.get("designer") or {}).get("company", "")
    date = report.get("date") or dt.datetime.now(dt.UTC).strftime("%d %B %Y")
    numbers = photo_numbers(site, plan)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(design['name'])}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
        f"<header><span class='company'>{escape(company or '')}</span>"
        f"<span class='date'>{escape(date)}</span></header>",
        f"<h1>{escape(design['name'])}</h1>",
        "<p class='sub'>Photomontages of the design on your site, its plan and its key dimensions.</p>",
    ]
    mont = [m for m in plan["montages"] if "file" in m and (folder / m["file"]).is_file()]
    # The designer's best view (the photo the placement was clicked on, else the design's largest
    # share) full width, the others two by two.
    mont.sort(key=lambda m: (m["image"] != plan.get("placement_image"), -float(m.get("design_share", 0))))
    for i, m in enumerate(mont):
        n = numbers.get(m["image"], 0)
        if i == 1:
            parts.append("<div class='pair'>")
        parts.append(
            f"<figure><img class='montage' src='{_data_uri(folder / m['file'], 'image/jpeg')}' "
            f"alt='photomontage, photo {n}'><figcaption>Photo {n}</figcaption></figure>"
        )
    if len(mont) > 1:
        parts.append("</div>")
    for name, title in (("plan.svg", "Plan (top view)"), ("elevation.svg", "Front elevation")):
        if (folder / name).is_file():
            parts.append(
                f"<h2>{title}</h2><img class='drawing' src='{_data_uri(folder / name, 'image/svg+xml')}' "
                f"alt='{escape(title.lower())}'>"
            )
    parts.append("<h2>Key dimensions</h2><table>" + _row("what", "size", "uncertainty (1-sigma)", head=True))
    for what, value, unc in _dimension_rows(plan, site):
        parts.append(f"<tr><td>{escape(what)}</td><td class='num'>{escape(value)}</td><td>{escape(unc)}</td></tr>")
    parts.append(
        "</table><p class='sub'>Site dimensions are measured from the photos; ± is one standard "
        "deviation (about two in three measurements fall within it).</p>"
    )
    glb = folder / "plan.glb"
    if glb.is_file():
        # Inlined as data URIs (the viewer's script too): browsers refuse to fetch a file:// URL
        # from a file:// page, and a page saved alone has nothing beside it.
        viewer = f"<script>{_viewer_inline()}</script>"
        # Look at the design from the photographers' side (glTF is Y-up: site (x, y, z) -> (x, z, -y)).
        px, py, _ = pl["position_m"]
        target = f"{px:.2f}m {design['height_m'] / 2:.2f}m {-py:.2f}m"
        orbit = max(6.0, 2.5 * design["width_m"])
        parts.append(
            "<h2>3D view</h2>"
            f"{viewer}"
            f"<model-viewer id='plan3d' loading='eager' src='{_data_uri(glb, 'model/gltf-binary')}' camera-controls "
            f"camera-target='{target}' camera-orbit='0deg 70deg {orbit:.1f}m' "
            "shadow-intensity='0.6' exposure='1.0' alt='3D plan: the site and the design'></model-viewer>"
            "<p class='sub'>Drag to turn, scroll to zoom.</p>"
            "<script>const mv=document.getElementById('plan3d');"
            "mv.addEventListener('load',()=>{document.body.dataset.model='loaded';console.log('plan3d loaded')});"
            "mv.addEventListener('error',e=>{document.body.dataset.model='error';console.error('plan3d failed')});"
            "</script>"
        )
    # The technical annex, collapsed.
    parts.append("<details class='annex'><summary>Technical annex</summary>")
    warnings = pl.get("warnings", []) + design.get("warnings", [])
    if warnings:
        parts.append("<h2>For the designer</h2>")
        parts += [f"<p class='warn'>{escape(w)}</p>" for w in warnings]
    parts.append("<h2>Design</h2><table>")
    parts.append(
        _row("size (w x d x h)", f"{design['width_m']:.3f} x {design['depth_m']:.3f} x {design['height_m']:.3f} m")
    )
    parts.append(_row("triangles", design.get("triangles", "")))
    parts.append(_row("placement", pl.get("form", "")))
    parts.append("</table>")
    parts.append("<h2>Scale and model</h2><table>")
    if job is not None:
        parts.append(_row("job", job["id"][:8]))
        parts.append(_row("pipeline version", job["pipeline_version"]))
    if report.get("reused_site"):
        parts.append(_row("site model", "reused from an earlier job on the same photos and reference"))
    if site.get("scale_source") is not None:
        parts.append(_row("scale source", site["scale_source"]))
    if site.get("scale_sigma_rel") is not None:
        parts.append(_row("scale uncertainty (1-sigma)", f"{100 * site['scale_sigma_rel']:.2f} %"))
    for w in (scale or {}).get("warnings", []):
        parts.append(_row("warning", w))
    if site.get("up_source") is not None:
        parts.append(_row("up direction", site["up_source"]))
    slope = (site.get("ground_plane") or {}).get("slope_deg")
    if slope is not None and slope > 3.0:
        parts.append(_row("ground slope", f"{slope:.1f} deg"))
    if site.get("registered_images") is not None:
        parts.append(_row("photos placed", f"{len(site['registered_images'])}"))
    if site.get("unregistered_images"):
        nums = ", ".join(f"photo {numbers[n]}" for n in sorted(site["unregistered_images"]) if n in numbers)
        parts.append(_row("photos not placed", f"{nums} (the model could not place them; no montage)"))
    if site.get("num_points") is not None:
        parts.append(_row("points", site["num_points"]))
    if site.get("mean_reprojection_error_px") is not None:
        parts.append(_row("mean reprojection error", f"{site['mean_reprojection_error_px']:.2f} px"))
    parts.append(_row("occlusion", plan.get("occlusion", "")))
    parts.append("</table>")
    skipped = [m for m in plan["montages"] if "file" not in m]
    if skipped:
        parts.append("<h2>Photos without a montage</h2><table>")
        for m in skipped:
            parts.append(_row(f"photo {numbers.get(m['image'], 0)}", m["skipped"]))
        parts.append("</table>")
    if priv is not None:
        parts.append("<h2>Privacy</h2><table>")
        parts.append(_row("photos anonymised", f"{priv['anonymised']} of {priv['photos']}"))
        parts.append(_row("faces blurred", priv["faces_blurred"]))
        parts.append(_row("licence plates blurred", priv["plates_blurred"]))
        parts.append(_row("photos refused by the privacy gate", len(priv["errors"])))
        details = (
            " details per photo in <a href='photos/report.json'>photos/report.json</a>."
            if linkable("photos/report.json")
            else ""
        )
        parts.append(
            "</table><p class='sub'>All metadata was dropped except focal length and image size;" + details + "</p>"
        )
    parts.append("<h2>Files</h2><ul>")
    files = [
        ("plan.glb", "3D plan (glTF binary: site points, design, cameras)"),
        ("plan.dxf", "top view for CAD (metres)"),
        ("plan.svg", "top view"),
        ("elevation.svg", "front elevation"),
        ("model/", "COLMAP model (metres, +Z up)"),
        ("site.json", "site facts"),
        ("report.json", "this report as data"),
        ("plan.json", "the plan as data"),
    ]
    for f, what in files:
        if linkable(f):
            parts.append(f"<li><a href='{_href(f)}'>{escape(f)}</a>: {escape(what)}</li>")
    parts.append("</ul><h2>Timings</h2><table>")
    for k, v in report["timings_s"].items():
        parts.append(_row(k, f"{v:.1f} s"))
    parts.append("</table></details></body></html>")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")  # the page says utf-8, whatever the locale
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
