#!/usr/bin/env python3
"""Build sample_data/ from ../shared/data and a generated COVER-style design.

Run from the repository root: ``.venv/bin/python scripts/make_sample_data.py``. Deterministic.

- photos/: Strecha fountain-P11, downscaled 2x to 1536x1024, plus one photo with faces and one
  with a licence plate, so the demo shows the privacy gate at work. The fountain photos get one
  EXIF tag, FocalLengthIn35mmFormat, computed from the dataset's K.txt, as a phone would write it.
- reference.json: the fountain's reference segment, with pixel coordinates halved (exact under
  the corner-origin pixel convention of DESIGN.md §3.3).
- design/gate.glb + design/gate.json: a double swing gate, 3.5 m x 1.6 m, modelled in mm.
- placement.json: where the gate posts stand, clicked in one photo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "sample_data"
FACTOR = 2


def photos() -> None:
    src = SHARED / "sfm" / "strecha-fountain-P11"
    dst = OUT / "photos"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    k = np.loadtxt(src / "images" / "K.txt")[:3]
    for p in sorted((src / "images").glob("*.jpg")):
        im = Image.open(p)
        w, h = im.size
        small = im.resize((w // FACTOR, h // FACTOR), Image.Resampling.LANCZOS)
        exif = Image.Exif()
        sub = exif.get_ifd(0x8769)
        sub[0xA405] = round(float(k[0, 0]) / w * 36.0)  # FocalLengthIn35mmFormat
        small.save(dst / p.name, "JPEG", quality=88, exif=exif.tobytes())
    # People and a car, as a designer's photos often catch them. Copied unchanged, metadata too.
    shutil.copy(SHARED / "faces" / "dlib-pascal" / "2008_002470.jpg", dst / "street_people.jpg")
    shutil.copy(SHARED / "plates" / "eu" / "eu1.jpg", dst / "street_car.jpg")
    ref = json.loads((src / "reference.json").read_text())
    for s in ref["segments"]:
        s["a"] = [round(v / FACTOR, 3) for v in s["a"]]
        s["b"] = [round(v / FACTOR, 3) for v in s["b"]]
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    checks = json.loads((src / "checks.json").read_text())
    for s in checks["segments"]:
        s["a"] = [round(v / FACTOR, 3) for v in s["a"]]
        s["b"] = [round(v / FACTOR, 3) for v in s["b"]]
    (OUT / "checks.json").write_text(json.dumps(checks, indent=1) + "\n")


def _linear(srgb: tuple[int, int, int]) -> list[float]:
    """glTF's baseColorFactor is linear; paint charts give sRGB."""
    c = np.asarray(srgb, float) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return [*(round(float(v), 5) for v in lin), 1.0]


ANTHRACITE = _linear((56, 62, 66))  # RAL 7016
GREY = _linear((120, 124, 128))  # RAL 7037-ish posts


def _box(size_mm: tuple[float, float, float], centre_mm: tuple[float, float, float]) -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=size_mm)
    m.apply_translation(centre_mm)
    return m


def gate() -> None:
    """Double swing gate: 2 posts, 2 leaves, each a frame with vertical bars. Units: mm, +Z up,
    front +Y, anchor at ground level midway between the posts."""
    width, height, post = 3500.0, 1600.0, 120.0
    post_h = height + 150.0
    gap, tube, bar = 20.0, 60.0, 25.0
    parts_posts = [_box((post, post, post_h), (sx * (width / 2 - post / 2), 0, post_h / 2)) for sx in (-1, 1)]
    inner = width - 2 * post
    leaf_w = (inner - 3 * gap) / 2
    z0, z1 = 60.0, height  # ground clearance
    leaves = []
    for sx in (-1, 1):
        x_in = sx * gap / 2
        x_out = sx * (gap / 2 + leaf_w)
        cx = (x_in + x_out) / 2
        leaves += [
            _box((leaf_w, tube, tube), (cx, 0, z0 + tube / 2)),
            _box((leaf_w, tube, tube), (cx, 0, z1 - tube / 2)),
            _box((leaf_w, tube, tube), (cx, 0, z0 + (z1 - z0) * 0.55)),
            _box((tube, tube, z1 - z0), (x_in + sx * tube / 2, 0, (z0 + z1) / 2)),
            _box((tube, tube, z1 - z0), (x_out - sx * tube / 2, 0, (z0 + z1) / 2)),
        ]
        n_bars = int((leaf_w - 2 * tube) // 120)
        span = leaf_w - 2 * tube
        for i in range(n_bars):
            bx = min(x_in, x_out) + tube + span * (i + 0.5) / n_bars
            leaves.append(_box((bar, bar, z1 - z0 - 2 * tube), (bx, 0, (z0 + z1) / 2)))
    posts_mesh = trimesh.util.concatenate(parts_posts)
    leaves_mesh = trimesh.util.concatenate(leaves)
    posts_mesh.visual = trimesh.visual.TextureVisuals(
        material=trimesh.visual.material.PBRMaterial(
            name="post", baseColorFactor=GREY, metallicFactor=0.3, roughnessFactor=0.6
        )
    )
    leaves_mesh.visual = trimesh.visual.TextureVisuals(
        material=trimesh.visual.material.PBRMaterial(
            name="leaf", baseColorFactor=ANTHRACITE, metallicFactor=0.4, roughnessFactor=0.5
        )
    )
    scene = trimesh.Scene()
    scene.add_geometry(posts_mesh, node_name="posts", geom_name="posts")
    scene.add_geometry(leaves_mesh, node_name="leaves", geom_name="leaves")
    d = OUT / "design"
    d.mkdir(parents=True, exist_ok=True)
    (d / "gate.glb").write_bytes(scene.export(file_type="glb"))
    descriptor = {
        "name": "Double swing gate 3500 x 1600",
        "file": "gate.glb",
        "units": "mm",
        "up": "+Z",
        "front": "+Y",
        "anchor": [0.0, 0.0, 0.0],
        "width_axis": "+X",
        "scalable": False,
    }
    (d / "gate.json").write_text(json.dumps(descriptor, indent=1) + "\n")


if __name__ == "__main__":
    photos()
    gate()
    print("sample_data written")
