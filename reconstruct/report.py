"""report.html: one offline page a designer can open from the folder and show a client."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Collection
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

ASSETS = Path(__file__).resolve().parent / "assets"
VIEWER_JS = "model-viewer.min.js"

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#1f2328}
h1{font-size:22px;margin-bottom:2px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d0d7de}
.sub{color:#57606a} table{border-collapse:collapse;margin:8px 0}
td,th{padding:4px 10px;border:1px solid #d0d7de;text-align:left}
th{background:#f6f8fa} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
figure{margin:0} figure img{width:100%;border:1px solid #d0d7de} figcaption{font-size:12px;color:#57606a}
img.drawing{max-width:100%;border:1px solid #d0d7de;background:white} .warn{color:#9a6700}
model-viewer{width:100%;height:560px;background:#eef1f4;border:1px solid #d0d7de}
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


def write_report_html(report: dict[str, Any], path: Path, *, published: Collection[str] | None = None) -> None:
    """report.html from a report dict (report.json's content; ``job`` and ``privacy`` optional).
    ``published``: the files the page may link besides montages (the API serves only some);
    by default those present beside it. Where the viewer's script is not among them, the page
    carries it inline (1.1 MB), so that a report saved alone still shows its 3D plan."""

    def linkable(name: str) -> bool:
        return name in published if published is not None else (path.parent / name).exists()

    plan = report["plan"]
    site = report["site"]
    priv = report.get("privacy")
    job = report.get("job")
    pl = plan["placement"]
    design = plan["design"]
    scale = site.get("scale")
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Site plan</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(design['name'])} on site</h1>",
    ]
    if job is not None:
        parts.append(
            f"<div class='sub'>Project {escape(job['project'][:8])} - pipeline {escape(job['pipeline_version'])}</div>"
        )
    mont = [m for m in plan["montages"] if "file" in m]
    parts.append("<h2>Photomontages</h2><div class='grid'>")
    for m in mont:
        parts.append(
            f"<figure><a href='{_href(m['file'])}'><img src='{_href(m['file'])}' "
            f"alt='montage {escape(m['image'])}'></a><figcaption>{escape(m['image'])}</figcaption></figure>"
        )
    parts.append("</div>")
    skipped = [m for m in plan["montages"] if "file" not in m]
    if skipped:
        parts.append(
            "<p class='sub'>No montage for: "
            + "; ".join(f"{escape(m['image'])} ({escape(m['skipped'])})" for m in skipped)
            + "</p>"
        )
    glb = path.parent / "plan.glb"
    if glb.is_file():
        # Inlined as a data URI: browsers refuse to fetch a file:// URL from a file:// page, and the
        # report must work offline from its folder.
        if published is None or VIEWER_JS in published:
            shutil.copyfile(ASSETS / "model-viewer-umd.min.js", path.parent / VIEWER_JS)
            viewer = f"<script src='{VIEWER_JS}'></script>"
        else:  # served alone (the API publishes no script file): the page carries the viewer itself
            viewer = f"<script>{_viewer_inline()}</script>"
        data = base64.b64encode(glb.read_bytes()).decode()
        # Look at the design from the photographers' side (glTF is Y-up: site (x, y, z) -> (x, z, -y)).
        px, py, _ = pl["position_m"]
        target = f"{px:.2f}m {design['height_m'] / 2:.2f}m {-py:.2f}m"
        orbit = max(6.0, 2.5 * design["width_m"])
        parts.append(
            "<h2>3D plan</h2>"
            f"{viewer}"
            f"<model-viewer id='plan3d' src='data:model/gltf-binary;base64,{data}' camera-controls "
            f"camera-target='{target}' camera-orbit='0deg 70deg {orbit:.1f}m' "
            "shadow-intensity='0.6' exposure='1.0' alt='3D plan: the site and the design'></model-viewer>"
            "<p class='sub'>Drag to turn, scroll to zoom. The same model: <a href='plan.glb'>plan.glb</a>.</p>"
            "<script>const mv=document.getElementById('plan3d');"
            "mv.addEventListener('load',()=>{document.body.dataset.model='loaded';console.log('plan3d loaded')});"
            "mv.addEventListener('error',e=>{document.body.dataset.model='error';console.error('plan3d failed')});"
            "</script>"
        )
    parts.append("<h2>Plan (top view)</h2><img class='drawing' src='plan.svg' alt='top view'>")
    parts.append("<h2>Front elevation</h2><img class='drawing' src='elevation.svg' alt='front elevation'>")
    parts.append("<h2>Measurements</h2><table>" + _row("what", "value", "1-sigma", head=True))
    for d in plan["dimensions"]:
        sig = ""
        if d["label"] == "opening" and pl.get("opening_sigma_m") is not None:
            sig = f"{pl['opening_sigma_m']:.3f} m"
        elif d["label"] != "design width":
            sig = f"{d['value_m'] * (site.get('scale_sigma_rel') or 0.0):.3f} m (scale only)"
        parts.append(_row(d["label"], f"{d['value_m']:.3f} m", sig))
    parts.append(_row("design", f"{design['width_m']:.3f} x {design['depth_m']:.3f} x {design['height_m']:.3f} m", ""))
    parts.append("</table>")
    for w in pl.get("warnings", []) + design.get("warnings", []):
        parts.append(f"<p class='warn'>{escape(w)}</p>")
    parts.append("<h2>Scale and model</h2><table>")
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
        parts.append(_row("photos not placed", ", ".join(site["unregistered_images"])))
    if site.get("num_points") is not None:
        parts.append(_row("points", site["num_points"]))
    if site.get("mean_reprojection_error_px") is not None:
        parts.append(_row("mean reprojection error", f"{site['mean_reprojection_error_px']:.2f} px"))
    parts.append("</table>")
    if priv is not None:
        parts.append("<h2>Privacy</h2><table>")
        parts.append(_row("photos anonymised", f"{priv['anonymised']} of {priv['photos']}"))
        parts.append(_row("faces blurred", priv["faces_blurred"]))
        parts.append(_row("licence plates blurred", priv["plates_blurred"]))
        for e in priv["errors"]:
            parts.append(_row(f"refused: {e['input']}", e["error"]))
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
            parts.append(f"<li><a href='{f}'>{f}</a>: {escape(what)}</li>")
    parts.append("</ul><h2>Timings</h2><table>")
    for k, v in report["timings_s"].items():
        parts.append(_row(k, f"{v:.1f} s"))
    parts.append("</table></body></html>")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")  # the page says utf-8, whatever the locale
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
