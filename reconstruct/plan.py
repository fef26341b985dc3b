"""The plan stage: a site (RUN_DIR) + a design + a placement -> PLAN_DIR.

Writes ``plan.glb``, ``plan.svg``, ``plan.dxf``, ``elevation.svg``, ``montage_<image>.jpg`` for
every photo that sees the design, and ``plan.json`` (what the report shows).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from PIL import Image

from reconstruct.clicks import ClickLifter
from reconstruct.dense import load_surface, load_surface_coloured
from reconstruct.design import Design, describe, load_design
from reconstruct.drawing import elevation, fabrication_dimensions, top_view, write_dxf, write_svg
from reconstruct.errors import ReconstructionError
from reconstruct.geometry import View, views
from reconstruct.placement import FLAT_GROUND, Placement, load_placement, resolve
from reconstruct.render import Mesh, montage
from reconstruct.site import Site, load_site

log = logging.getLogger(__name__)

MIN_VISIBLE_SHARE = 0.002  # of the photo's pixels, for a montage to be worth making


def placed_meshes(design: Design, placement: Placement) -> list[Mesh]:
    return [
        Mesh(placement.apply(p.vertices), p.faces, p.color, p.texture, p.metallic, p.roughness) for p in design.parts
    ]


def push_back(vertices: np.ndarray, centre: np.ndarray, *, metres: float = 0.05, share: float = 0.01) -> np.ndarray:
    """The site surface moved away from the camera by a margin (5 cm or 1 % of the range), so its
    noise does not cut into a design that stands on it or against it."""
    d = vertices - centre
    r = np.linalg.norm(d, axis=1, keepdims=True)
    return np.asarray(centre + d * (1.0 + np.maximum(metres, share * r) / np.maximum(r, 1e-9)))


def _atomic_save_jpeg(rgb: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(tmp, "JPEG", quality=90)
    tmp.replace(path)


GLB_SURFACE = ".surface-glb.ply"  # the site surface decimated for plan.glb, kept beside surface.ply


def _glb_surface(run_dir: Path) -> Any:
    """The site surface for plan.glb: decimated to 150k triangles once (it took 3-7 s of every
    plan), then read back from a cache beside surface.ply while that is unchanged."""
    src, cache = run_dir / "surface.ply", run_dir / GLB_SURFACE
    if not src.is_file():
        return None
    if cache.is_file() and cache.stat().st_mtime >= src.stat().st_mtime:
        got = load_surface_coloured(cache, max_triangles=150_000)
        if got is not None:
            return got
    surface = load_surface_coloured(src, max_triangles=150_000)
    if surface is not None:
        tmp = run_dir / f".{GLB_SURFACE}.tmp"
        try:
            tmp.write_bytes(surface.export(file_type="ply"))
            tmp.replace(cache)
        except OSError:  # a read-only run folder: no cache, the same surface
            tmp.unlink(missing_ok=True)
    return surface


def write_glb(site: Site, meshes: list[Mesh], vs: dict[str, View], path: Path) -> None:
    """Site points (vertex colours), the design with its materials, and camera frusta.

    Geometry is in site coordinates (metres, +Z up); the root node turns it to glTF's +Y up, so
    any viewer shows it upright.
    """
    scene = trimesh.Scene()
    rec = site.reconstruction
    pts = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)
    cols = np.array([np.append(p.color, 255) for p in rec.points3D.values()], dtype=np.uint8).reshape(-1, 4)
    if len(pts) > 20:
        # Stray far points would make viewers frame an empty scene: keep the site's robust extent.
        lo, hi = np.percentile(pts, 2, axis=0), np.percentile(pts, 98, axis=0)
        pad = 0.25 * (hi - lo)
        keep = np.all((pts >= lo - pad) & (pts <= hi + pad), axis=1)
        pts, cols = pts[keep], cols[keep]
    if len(pts):
        scene.add_geometry(trimesh.PointCloud(pts, colors=cols), node_name="site_points", geom_name="site_points")
    surface = _glb_surface(site.run_dir)
    if surface is not None:
        scene.add_geometry(surface, node_name="site_surface", geom_name="site_surface")
    for i, m in enumerate(meshes):
        mesh = trimesh.Trimesh(m.vertices, m.faces, process=False)
        if m.texture is not None:  # the design's own material and texture, UVs as imported
            mesh.visual = trimesh.visual.TextureVisuals(uv=m.texture.uv, material=m.texture.material)
        else:
            mesh.visual = trimesh.visual.TextureVisuals(
                material=trimesh.visual.material.PBRMaterial(
                    baseColorFactor=[int(255 * c) for c in m.color], metallicFactor=0.3, roughnessFactor=0.6
                )
            )
        scene.add_geometry(mesh, node_name=f"design_{i}", geom_name=f"design_{i}")
    for name, v in vs.items():
        s = 0.25
        corners = np.array(
            [
                [-s * v.width / v.K[0, 0] / 2, -s * v.height / v.K[1, 1] / 2, s],
                [s * v.width / v.K[0, 0] / 2, -s * v.height / v.K[1, 1] / 2, s],
                [s * v.width / v.K[0, 0] / 2, s * v.height / v.K[1, 1] / 2, s],
                [-s * v.width / v.K[0, 0] / 2, s * v.height / v.K[1, 1] / 2, s],
            ]
        )
        world = (v.R.T @ corners.T).T + v.centre
        C = v.centre
        verts = np.vstack([C, world])
        faces = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1]])
        fr = trimesh.Trimesh(verts, faces, process=False)
        fr.visual = trimesh.visual.TextureVisuals(
            material=trimesh.visual.material.PBRMaterial(
                baseColorFactor=[230, 120, 30, 160], alphaMode="BLEND", doubleSided=True
            )
        )
        scene.add_geometry(fr, node_name=f"camera_{name}", geom_name=f"camera_{name}")
    zup_to_yup = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])
    scene.apply_transform(zup_to_yup)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(scene.export(file_type="glb"))
    tmp.replace(path)


def _click_lifter(site: Site, photos: Path) -> ClickLifter:
    """The placement's clicks are triangulated from the photos (the local ground) like every
    other click; without the photos at hand they fall back to the surface and the ground plane."""
    return ClickLifter(
        site.reconstruction, photos if photos.is_dir() else None, surface_path=site.run_dir / "surface.ply"
    )


def plan(
    run_dir: Path,
    design_path: Path,
    placement_path: Path,
    out_dir: Path,
    *,
    images_dir: Path | None = None,
    montage_images: list[str] | None = None,
    project: str = "",
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Merge the design into the site and write every plan output. Returns plan.json's content."""
    t0 = time.perf_counter()
    site = load_site(run_dir)
    design = load_design(design_path)
    spec = load_placement(placement_path)
    vs = views(site.reconstruction)
    if not vs:
        raise ReconstructionError("the site model has no registered photos")
    placement = resolve(
        spec,
        design,
        vs,
        scale_sigma_rel=float(site.info.get("scale_sigma_rel", 0.0)),
        ground=site.info.get("ground_plane", {}).get("plane", FLAT_GROUND),
        ground_found=bool(site.info.get("ground_plane", {}).get("found", True)),
        lifter=_click_lifter(site, images_dir or site.images_dir),
    )
    meshes = placed_meshes(design, placement)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    write_glb(site, meshes, vs, out_dir / "plan.glb")
    timings["glb_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pts = np.array([p.xyz for p in site.reconstruction.points3D.values()]).reshape(-1, 3)
    pj = placement.to_json()
    world = [(m.vertices, m.faces) for m in meshes]
    opening = None
    if spec.ground_points is not None and placement.opening_m is not None:
        half = placement.R[:, 0] * placement.opening_m / 2
        opening = (placement.t - half, placement.t + half)
    measures = fabrication_dimensions(
        world,
        pj,
        pts,
        site.info.get("facades", []),
        scale_sigma_rel=float(site.info.get("scale_sigma_rel", 0.0)),
        ground_plane=site.info.get("ground_plane", {}).get("plane", FLAT_GROUND),
        opening=opening,
    )
    top = top_view(
        world, pj, pts, site.info.get("facades", []), design_name=design.name, measures=measures, project=project
    )
    scale_top = write_svg(top, out_dir / "plan.svg")
    write_dxf(top, out_dir / "plan.dxf", scale=scale_top)
    elev = elevation(world, pj, pts, design_name=design.name, measures=measures, project=project)
    scale_elev = write_svg(elev, out_dir / "elevation.svg")
    timings["drawings_s"] = time.perf_counter() - t

    t = time.perf_counter()
    img_dir = images_dir or site.images_dir
    surface = load_surface(run_dir / "surface.ply")
    montages: list[dict[str, Any]] = []
    todo = [(n, v) for n, v in sorted(vs.items()) if montage_images is None or n in montage_images]
    for i, (name, v) in enumerate(todo):
        if progress is not None:
            progress(f"montage {i + 1}/{len(todo)}", i / max(1, len(todo)))
        entry: dict[str, Any] = {"image": name}
        src = img_dir / name
        if not src.is_file():
            entry["skipped"] = "the anonymised photo is not at hand"
            montages.append(entry)
            continue
        allv = np.vstack([m.vertices for m in meshes])
        uv, z = v.project(allv)
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < v.width) & (uv[:, 1] >= 0) & (uv[:, 1] < v.height)
        if not inside.any():
            entry["skipped"] = "the design is outside this photo"
            montages.append(entry)
            continue
        photo = np.asarray(Image.open(src).convert("RGB"))
        if photo.shape[:2] != (v.height, v.width):
            entry["skipped"] = "the photo's size differs from its camera's"
            montages.append(entry)
            continue
        occ = [Mesh(push_back(surface[0], v.centre), surface[1], (0, 0, 0, 0))] if surface else None
        img, mask = montage(photo, v, meshes, occluders=occ, ground_z=float(placement.t[2]))
        share = float((mask > 127).mean())
        if share < MIN_VISIBLE_SHARE:
            entry["skipped"] = f"the design covers only {100 * share:.2f} % of this photo"
            montages.append(entry)
            continue
        out_name = f"montage_{Path(name).stem}.jpg"
        _atomic_save_jpeg(img, out_dir / out_name)
        entry.update(file=out_name, design_share=round(share, 4))
        montages.append(entry)
    timings["montages_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "design": describe(design),
        "placement": pj,
        "drawings": {"plan.svg": f"1:{scale_top}", "elevation.svg": f"1:{scale_elev}", "plan.dxf": "metres"},
        "dimensions": [m.to_json() for m in measures],
        "montages": montages,
        "placement_image": spec.image,
        "occlusion": "dense site surface" if surface else "none (no dense surface)",
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    tmp = out_dir / ".plan.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_dir / "plan.json")
    log.info("plan: %d montages, drawings at 1:%d", sum(1 for m in montages if "file" in m), scale_top)
    return result
