"""The plan files a job publishes through the API, and their media types (the worker stores
them, the API serves and documents them)."""

from __future__ import annotations

from pathlib import PurePath

# What the API hands back, besides one montage_<photo>.jpg per photo; the site model and raw
# surfaces stay internal.
OUTPUTS = ("plan.glb", "plan.svg", "plan.dxf", "elevation.svg", "report.html", "report.json")
# The site model a finished job keeps (sealed) for the next job on the same photos; stored as a
# plan file of that job so that erasure, export and incident scope cover it, never listed or served.
SITE_MODEL = ".site-model.tar"
SITE_MODEL_FILES = ("model", "site.json", "points.ply", "surface.ply", ".surface-glb.ply")
MEDIA_TYPES = {
    ".glb": "model/gltf-binary",
    ".svg": "image/svg+xml",
    ".dxf": "image/vnd.dxf",
    ".jpg": "image/jpeg",
    ".html": "text/html",
    ".json": "application/json",
}


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(PurePath(name).suffix.lower(), "application/octet-stream")
