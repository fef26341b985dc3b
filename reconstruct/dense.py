"""A dense surface of the site, for measuring and for montage occlusion.

CPU path (default): every placed photo is paired with the neighbour that shares most points at
a useful baseline; the pair is rectified from the estimated poses (``cv2.stereoRectify``),
matched with semi-global block matching (``cv2.StereoSGBM``, disparity range taken from the
sparse points), and the resulting depth maps are fused in a truncated signed distance volume
(open3d ``ScalableTSDFVolume``), from which a triangle mesh is extracted. Fusion averages the
pairs' noise and drops what the views disagree on.

GPU path (``backend="patchmatch"``): pycolmap's PatchMatch stereo and fusion, when pycolmap was
built with CUDA; the same output file.

OpenCV and open3d put pixel centres at integer coordinates; COLMAP at +0.5. The intrinsics are
shifted by half a pixel on the way in.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import open3d as _o3d
import pycolmap
from pydantic import BaseModel, ConfigDict, Field

from reconstruct.geometry import View, views

# open3d's bundled stubs reject valid calls (str paths, numpy arrays): use it untyped.
o3d: Any = _o3d

log = logging.getLogger(__name__)


class DenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Build the dense surface at all.")
    backend: Literal["auto", "sgbm", "patchmatch"] = Field(
        default="auto", description="auto: PatchMatch where pycolmap has CUDA, else SGBM on CPU."
    )
    max_side: int = Field(default=960, ge=256, description="Long side of the photos used for stereo.")
    voxel_m: float | None = Field(default=None, gt=0, description="TSDF voxel; default: scene size / 500.")
    min_baseline_ratio: float = Field(default=0.04, gt=0, description="Pair baseline / depth, at least.")
    max_baseline_ratio: float = Field(default=0.6, gt=0, description="Pair baseline / depth, at most.")
    max_triangles: int = Field(default=400_000, ge=1000, description="Decimate the mesh above this.")


def _opencv_K(v: View, s: float) -> np.ndarray:
    K = v.K.astype(np.float64).copy()
    K[:2] *= s
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    return K


def _dist(v: View) -> np.ndarray:
    p = np.asarray(v.camera.params, float)
    model = v.camera.model_name
    if model in ("SIMPLE_RADIAL", "RADIAL"):
        k1 = p[3]
        k2 = p[4] if model == "RADIAL" else 0.0
        return np.array([k1, k2, 0.0, 0.0, 0.0])
    return np.zeros(5)


def _shared(rec: pycolmap.Reconstruction) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    names = {i: img.name for i, img in rec.images.items()}
    for p in rec.points3D.values():
        ids = sorted({e.image_id for e in p.track.elements})
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                key = (names[ids[a]], names[ids[b]])
                counts[key] = counts.get(key, 0) + 1
    return counts


def _median_depth(rec: pycolmap.Reconstruction, v: View) -> float:
    img = rec.find_image_with_name(v.name)
    pts = np.array([rec.points3D[p.point3D_id].xyz for p in img.points2D if p.has_point3D()])
    if not len(pts):
        return math.nan
    return float(np.median((v.R @ pts.T).T[:, 2] + v.t[2]))


def choose_pairs(rec: pycolmap.Reconstruction, vs: dict[str, View], cfg: DenseConfig) -> list[tuple[str, str]]:
    """For each photo, the best partner: most shared points at a usable, mostly horizontal baseline."""
    shared = _shared(rec)
    pairs: set[tuple[str, str]] = set()
    for a, va in vs.items():
        z = _median_depth(rec, va)
        best, best_score = None, 0.0
        for b, vb in vs.items():
            if a == b:
                continue
            n = shared.get((a, b), shared.get((b, a), 0))
            base = vb.centre - va.centre
            ratio = float(np.linalg.norm(base)) / z if z > 0 else 0.0
            if n < 30 or not cfg.min_baseline_ratio <= ratio <= cfg.max_baseline_ratio:
                continue
            local = va.R @ base  # the partner's offset in a's camera frame
            if abs(local[0]) < abs(local[1]):  # SGBM needs a horizontal baseline
                continue
            score = n * min(1.0, ratio / 0.15)
            if score > best_score:
                best, best_score = b, score
        if best is not None:
            pairs.add(tuple(sorted((a, best))))  # type: ignore[arg-type]
    return sorted(pairs)


def _load_gray_rgb(path: Path, s: float) -> tuple[np.ndarray, np.ndarray]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path.name}")
    if s != 1.0:
        bgr = cv2.resize(bgr, (round(bgr.shape[1] * s), round(bgr.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pair_depth(
    rec: pycolmap.Reconstruction, left: View, right: View, image_dir: Path, cfg: DenseConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Depth map (rectified left camera), its colour, intrinsics and world->camera extrinsic."""
    s = min(1.0, cfg.max_side / max(left.width, left.height))
    size = (round(left.width * s), round(left.height * s))
    K1, K2 = _opencv_K(left, s), _opencv_K(right, s)
    R = right.R @ left.R.T
    T = (right.t - R @ left.t).reshape(3, 1)
    R1, R2, P1, P2, Q, _, _ = cv2.stereoRectify(K1, _dist(left), K2, _dist(right), size, R, T, flags=0, alpha=0)
    if abs(P2[1, 3]) > abs(P2[0, 3]):
        return None  # vertical rectification: not for SGBM
    g1, c1 = _load_gray_rgb(image_dir / left.name, s)
    g2, _ = _load_gray_rgb(image_dir / right.name, s)
    m1 = cv2.initUndistortRectifyMap(K1, _dist(left), R1, P1, size, cv2.CV_32FC1)
    m2 = cv2.initUndistortRectifyMap(K2, _dist(right), R2, P2, size, cv2.CV_32FC1)
    r1 = cv2.remap(g1, m1[0], m1[1], cv2.INTER_LINEAR)
    r2 = cv2.remap(g2, m2[0], m2[1], cv2.INTER_LINEAR)
    rc = cv2.remap(c1, m1[0], m1[1], cv2.INTER_LINEAR)
    # Disparity range from the sparse points both photos see.
    img_l = rec.find_image_with_name(left.name)
    pts = np.array([rec.points3D[p.point3D_id].xyz for p in img_l.points2D if p.has_point3D()])
    xl = (left.R @ pts.T).T + left.t
    ul = (P1[:3, :3] @ (R1 @ xl.T)).T
    # P1 and P2 both project points given in the rectified *left* camera frame.
    ur = (P2[:3, :3] @ (R1 @ xl.T)).T + P2[:3, 3]
    ok = (ul[:, 2] > 0) & (ur[:, 2] > 0)
    if ok.sum() < 30:
        return None
    d = ul[ok, 0] / ul[ok, 2] - ur[ok, 0] / ur[ok, 2]
    lo, hi = np.percentile(d, [1, 99])
    log.debug("pair: sparse disparities %.1f..%.1f", lo, hi)
    span = hi - lo
    min_d = math.floor(lo - 0.15 * span - 4)
    num = int(math.ceil((hi - lo + 0.3 * span + 8) / 16.0) * 16)
    num = max(16, min(num, 384))
    block = 5
    if min_d < -size[0] or min_d + num >= size[0] - block:
        # The sparse disparities do not fit the rectified image (a wide or oblique baseline):
        # SGBM would search outside it (OpenCV then asks for a negative-sized buffer).
        log.debug("pair skipped: disparity range %d..%d does not fit %d px", min_d, min_d + num, size[0])
        return None
    sgbm = cv2.StereoSGBM.create(
        minDisparity=min_d,
        numDisparities=num,
        blockSize=block,
        P1=8 * block * block,
        P2=32 * block * block,
        disp12MaxDiff=1,
        uniquenessRatio=10,
        speckleWindowSize=100,
        speckleRange=2,
        mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
    )
    disp = sgbm.compute(r1, r2).astype(np.float32) / 16.0
    valid = disp > min_d
    xyz = cv2.reprojectImageTo3D(disp, Q)
    depth = np.where(valid, xyz[:, :, 2], 0.0).astype(np.float32)
    zs = xl[ok, 2]
    depth[(depth < 0.5 * zs.min()) | (depth > 2.0 * zs.max())] = 0.0
    Kr = P1[:3, :3].copy()
    ext = np.eye(4)
    ext[:3, :3] = R1 @ left.R
    ext[:3, 3] = R1 @ left.t
    return depth, rc, Kr, ext


def dense_surface(
    rec: pycolmap.Reconstruction, image_dir: Path, out_ply: Path, config: DenseConfig | None = None
) -> dict[str, Any]:
    """Build the site's dense mesh into ``out_ply``; returns what was done, for site.json."""
    cfg = config or DenseConfig()
    t0 = time.perf_counter()
    backend = cfg.backend
    if backend == "auto":
        backend = "patchmatch" if pycolmap.has_cuda else "sgbm"
    if backend == "patchmatch":
        return _patchmatch(rec, image_dir, out_ply, t0)
    vs = views(rec)
    pts = np.array([p.xyz for p in rec.points3D.values()])
    extent = float(np.linalg.norm(np.percentile(pts, 95, axis=0) - np.percentile(pts, 5, axis=0)))
    voxel = cfg.voxel_m or max(0.005, extent / 500.0)
    # open3d's tensor voxel-block grid: sparse, so memory follows the surface, not the scene's
    # bounding box. (The legacy ScalableTSDFVolume of open3d 0.20 returned empty meshes here.)
    o3c: Any = o3d.core

    grid = o3d.t.geometry.VoxelBlockGrid(
        attr_names=("tsdf", "weight", "color"),
        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
        attr_channels=((1), (1), (3)),
        voxel_size=voxel,
        block_resolution=8,
        block_count=40000,
    )
    pairs = choose_pairs(rec, vs, cfg)
    used = skipped = 0
    for a, b in pairs:
        va, vb = vs[a], vs[b]
        # Left is the one whose partner sits to its right (+x in its camera frame).
        left, right = (va, vb) if (va.R @ (vb.centre - va.centre))[0] > 0 else (vb, va)
        # One pair that cannot be matched (a baseline SGBM cannot search, a depth map with
        # nothing valid in it) is skipped, never the end of the reconstruction: the sparse model
        # is whole without it.
        try:
            res = pair_depth(rec, left, right, image_dir, cfg)
            if res is None or not (res[0] > 0).any():
                skipped += 1
                continue
            depth, colour, K, ext = res
            far = float(depth.max() + 1.0)
            dt = o3d.t.geometry.Image(np.ascontiguousarray(depth))
            ct = o3d.t.geometry.Image(np.ascontiguousarray(colour.astype(np.float32)))
            Kt = o3c.Tensor(K.astype(np.float64))
            Et = o3c.Tensor(ext.astype(np.float64))
            blocks = grid.compute_unique_block_coordinates(dt, Kt, Et, 1.0, far, trunc_voxel_multiplier=4.0)
            grid.integrate(blocks, dt, ct, Kt, Kt, Et, 1.0, far, trunc_voxel_multiplier=4.0)
        except (cv2.error, RuntimeError, ValueError) as exc:
            log.warning("dense: a stereo pair was skipped (%s)", type(exc).__name__)
            skipped += 1
            continue
        used += 1
    info: dict[str, Any] = {"backend": "sgbm+tsdf", "pairs": used, "pairs_skipped": skipped, "voxel_m": round(voxel, 4)}
    try:
        # Where several pairs overlap, keep only what at least two of them saw.
        mesh = grid.extract_triangle_mesh(weight_threshold=1.5 if used >= 3 else 0.5).to_legacy() if used else None
    except RuntimeError:  # nothing fused ("no block is touched")
        mesh = None
    if mesh is None or not len(mesh.triangles):
        # No surface: the site keeps its sparse model, and the plan works from it (as with the
        # dense stage switched off); site.json says why.
        out_ply.unlink(missing_ok=True)
        info.update(triangles=0, seconds=round(time.perf_counter() - t0, 2), note="no stereo pair gave a surface")
        log.warning("dense surface: none (%d pairs tried, none usable)", len(pairs))
        return info
    if mesh.has_vertex_colors():
        mesh.vertex_colors = o3d.utility.Vector3dVector(np.clip(np.asarray(mesh.vertex_colors) / 255.0, 0, 1))
    if len(mesh.triangles):
        # Small floating pieces are matching noise.
        labels, counts, _ = mesh.cluster_connected_triangles()
        labels_a, counts_a = np.asarray(labels), np.asarray(counts)
        mesh.remove_triangles_by_mask(counts_a[labels_a] < max(50, 0.002 * len(labels_a)))
        mesh.remove_unreferenced_vertices()
        if len(mesh.triangles) > cfg.max_triangles:
            mesh = mesh.simplify_quadric_decimation(cfg.max_triangles)
    tmp = out_ply.with_name(f".tmp-{out_ply.name}")
    if not o3d.io.write_triangle_mesh(str(tmp), mesh):
        raise OSError("the dense surface could not be written")
    tmp.replace(out_ply)
    info.update(triangles=len(mesh.triangles), seconds=round(time.perf_counter() - t0, 2))
    log.info("dense surface: %s", info)
    return info


def _patchmatch(rec: pycolmap.Reconstruction, image_dir: Path, out_ply: Path, t0: float) -> dict[str, Any]:
    """PatchMatch stereo + fusion + Poisson meshing with pycolmap's CUDA build."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="mvs-", dir=out_ply.parent))
    try:
        pycolmap.undistort_images(str(work), str(_write_model(rec, work / "sparse_in")), str(image_dir))
        pycolmap.patch_match_stereo(str(work))
        pycolmap.stereo_fusion(str(work / "fused.ply"), str(work))
        pycolmap.poisson_meshing(str(work / "fused.ply"), str(out_ply))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"backend": "patchmatch", "seconds": round(time.perf_counter() - t0, 2)}


def _write_model(rec: pycolmap.Reconstruction, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rec.write(str(path))
    return path


def load_surface(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices and faces of a saved surface, or None when there is none."""
    if not path.is_file():
        return None
    mesh = o3d.io.read_triangle_mesh(str(path))
    if not len(mesh.triangles):
        return None
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def transform_surface(path: Path, R: np.ndarray, t: np.ndarray) -> None:
    """Apply X -> R X + t to a saved surface, in place (atomically)."""
    mesh = o3d.io.read_triangle_mesh(str(path))
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    mesh.transform(T)
    tmp = path.with_name(f".tmp-{path.name}")
    if not o3d.io.write_triangle_mesh(str(tmp), mesh):
        raise OSError("the dense surface could not be written")
    tmp.replace(path)


def load_surface_coloured(path: Path, *, max_triangles: int) -> Any:
    """The saved surface as a vertex-coloured ``trimesh.Trimesh`` (decimated), or None."""
    import trimesh

    if not path.is_file():
        return None
    mesh = o3d.io.read_triangle_mesh(str(path))
    if not len(mesh.triangles):
        return None
    if len(mesh.triangles) > max_triangles:
        mesh = mesh.simplify_quadric_decimation(max_triangles)
    colours = None
    if mesh.has_vertex_colors():
        c = (np.clip(np.asarray(mesh.vertex_colors), 0, 1) * 255).astype(np.uint8)
        colours = np.column_stack([c, np.full(len(c), 255, np.uint8)])
    return trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.triangles), vertex_colors=colours, process=False)
