"""A seeded synthetic site with exact answers: ground (z = 0) and a wall (y = 5), metres, +Z up.

The reconstruction is built in an arbitrary *model* frame (a similarity of the truth), the way
SfM returns it, with exact, noise-free observations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

W, H, F = 1600, 1200, 1100.0


@dataclass
class Scene:
    rec: pycolmap.Reconstruction  # model frame
    truth_points: np.ndarray
    model_from_truth: tuple[float, np.ndarray, np.ndarray]  # s, R, t
    cams_truth: list[tuple[np.ndarray, np.ndarray]]  # (R world->cam, t), truth frame

    def to_model(self, X: np.ndarray) -> np.ndarray:
        s, R, t = self.model_from_truth
        return np.asarray(s * (R @ np.asarray(X, float).T).T + t)

    def pixel(self, image_index: int, X: np.ndarray) -> tuple[float, float]:
        R, t = self.cams_truth[image_index]
        xc = R @ X + t
        return (F * xc[0] / xc[2] + W / 2, F * xc[1] / xc[2] + H / 2)


def look_at(C: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = target - C
    z = z / np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.vstack([x, y, z])
    return R, -R @ C


def make_scene(seed: int = 0, scale: float = 0.37, n_cams: int = 5, target_z: float = 1.0) -> Scene:
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.linspace(-4, 4, 33), np.linspace(-1.5, 4.9, 27))
    ground = np.column_stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)])
    wx, wz = np.meshgrid(np.linspace(-4, 4, 41), np.linspace(0.05, 3.0, 21))
    wall = np.column_stack([wx.ravel(), np.full(wx.size, 5.0), wz.ravel()])
    pts = np.vstack([ground, wall]) + rng.normal(0, 1e-9, (len(ground) + len(wall), 3))
    Rm = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
    tm = rng.normal(size=3) * 3
    cams = []
    for k in range(n_cams):
        C = np.array([-2.0 + 4.0 * k / max(1, n_cams - 1), -4.0, 1.6 + 0.05 * k])
        cams.append(look_at(C, np.array([0.0, 5.0, target_z])))
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2], camera_id=1)
    rec.add_camera_with_trivial_rig(cam)
    tracks: dict[int, list[tuple[int, int]]] = {}
    for k, (R, t) in enumerate(cams):
        xc = (R @ pts.T).T + t
        uv = np.column_stack([F * xc[:, 0] / xc[:, 2] + W / 2, F * xc[:, 1] / xc[:, 2] + H / 2])
        ok = (xc[:, 2] > 0.1) & (uv[:, 0] > 0) & (uv[:, 0] < W) & (uv[:, 1] > 0) & (uv[:, 1] < H)
        idx = np.nonzero(ok)[0]
        img = pycolmap.Image(name=f"{k:04d}.jpg", keypoints=uv[idx], camera_id=1, image_id=k + 1)
        # Pose in the model frame: x_cam = R (Rm^T (Xm - tm) / s) + t
        Rmod = R @ Rm.T
        tmod = t * scale - Rmod @ tm
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(pycolmap.Rotation3d(Rmod), tmod))
        for j, p in enumerate(idx):
            tracks.setdefault(int(p), []).append((k + 1, j))
    for p, obs in tracks.items():
        if len(obs) < 2:
            continue
        track = pycolmap.Track()
        for image_id, j in obs:
            track.add_element(image_id, j)
        Xm = scale * Rm @ pts[p] + tm
        pid = rec.add_point3D(Xm, track, np.array([128, 128, 128], np.uint8))
        for image_id, j in obs:
            rec.image(image_id).set_point3D_for_point2D(j, pid)
    return Scene(rec, pts, (scale, Rm, tm), cams)


def write_run_dir(scene: Scene, run_dir: Path, images_dir: Path | None = None) -> None:
    """A RUN_DIR for the synthetic site in its *true* frame (as `reconstruct` would leave it)."""
    s, R, t = scene.model_from_truth
    rec = pycolmap.Reconstruction(scene.rec)
    # truth = R^T (model - t) / s
    rec.transform(pycolmap.Sim3d(1.0 / s, pycolmap.Rotation3d(R.T), -(R.T @ t) / s))
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    rec.write_text(str(run_dir / "model"))
    info = {
        "scale_sigma_rel": 0.001,
        "facades": [{"plane": [0.0, 1.0, 0.0, 5.0], "inliers": 800}],
        "images_dir": str(images_dir) if images_dir else "images",
    }
    (run_dir / "site.json").write_text(json.dumps(info))


def texture(seed: int = 1, px_per_m: int = 200) -> tuple[np.ndarray, float]:
    """A random blotchy texture covering [-6, 6] x [-3, 7] m, and its pixels per metre."""
    import cv2

    rng = np.random.default_rng(seed)
    tex = rng.random((10 * px_per_m, 12 * px_per_m)).astype(np.float32)
    tex = cv2.GaussianBlur(tex, (0, 0), 2.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    return (tex * 220 + 20).astype(np.float32), float(px_per_m)


def render_textured(
    scene: Scene, k: int, *, box: tuple[np.ndarray, np.ndarray] | None = None, sky_above: float | None = None
) -> np.ndarray:
    """Photo k of the synthetic site: every pixel's ray meets the ground (z = 0) or the wall
    (y = 5), textured by their in-plane coordinates. Exact geometry, no renderer needed.
    ``box``: an axis-aligned box (lower, upper corner) standing in front of the wall, such as a
    step, textured on its faces. ``sky_above``: the wall ends at this height, with sky above."""
    import cv2

    tex, ppm = texture()
    R, t = scene.cams_truth[k]
    C = -R.T @ t
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d = np.stack([(u - W / 2) / F, (v - H / 2) / F, np.ones_like(u)], axis=-1) @ R  # rows: R^T d
    with np.errstate(divide="ignore", invalid="ignore"):
        s_wall = (5.0 - C[1]) / d[..., 1]
        s_ground = -C[2] / d[..., 2]
    s_wall = np.where(s_wall > 0, s_wall, np.inf)
    if sky_above is not None:
        s_wall = np.where(C[2] + s_wall * d[..., 2] <= sky_above, s_wall, np.inf)
    s_ground = np.where(s_ground > 0, s_ground, np.inf)
    wall = s_wall < s_ground
    s = np.minimum(s_wall, s_ground)
    X = C + d * np.where(np.isfinite(s), s, 0)[..., None]
    a = np.where(wall, X[..., 0], X[..., 0])
    b = np.where(wall, X[..., 2], X[..., 1])
    # Wall and ground use different parts of the texture so they do not repeat each other.
    mx = ((a + 6.0) * ppm).astype(np.float32)
    my = (np.where(wall, b + 3.0, 7.0 - b) * ppm).astype(np.float32)
    if box is not None:
        lo, hi = (np.asarray(c, float) for c in box)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (lo - C) / d
            t2 = (hi - C) / d
        tn = np.nanmax(np.minimum(t1, t2), axis=-1)
        tf = np.nanmin(np.maximum(t1, t2), axis=-1)
        hit = (tn <= tf) & (tn > 0) & (tn < s)
        axis = np.argmax(np.minimum(t1, t2), axis=-1)  # the face entered: 0 x-side, 1 front/back, 2 top
        Xb = C + d * np.where(hit, tn, 0)[..., None]
        ba = np.where(axis == 0, Xb[..., 1], Xb[..., 0])
        bb = np.where(axis == 2, Xb[..., 1], Xb[..., 2])
        # The box's faces take yet other parts of the texture (offset per face).
        mx = np.where(hit, ((ba + 1.5 + 2.0 * axis) * ppm), mx).astype(np.float32)
        my = np.where(hit, ((bb + 5.5) * ppm), my).astype(np.float32)
        s = np.where(hit, tn, s)
    img = cv2.remap(tex, mx, my, cv2.INTER_LINEAR, borderValue=128)
    img[~np.isfinite(s)] = 200  # sky
    return np.clip(img, 0, 255).astype(np.uint8)


def truth_frame(scene: Scene) -> pycolmap.Reconstruction:
    """The reconstruction moved into the true frame (metres, ground z = 0)."""
    s, R, t = scene.model_from_truth
    rec = pycolmap.Reconstruction(scene.rec)
    rec.transform(pycolmap.Sim3d(1.0 / s, pycolmap.Rotation3d(R.T), -(R.T @ t) / s))
    return rec
