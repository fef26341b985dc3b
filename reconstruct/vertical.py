"""Gravity's direction from the straight vertical edges in the photos.

Building corners, door frames, posts and window edges are plumb. A straight image segment and
its camera centre span a plane (the segment's *interpretation plane*); when the segment is the
image of a vertical edge, that plane contains the vertical. So the vertical is the direction
orthogonal to the planes' normals of every vertical segment: the vertical vanishing point, found
jointly over all registered photos (in world coordinates, with the cameras from SfM).

Segments come from OpenCV's LSD on a reduced grey copy of each photo, and only those within
``max_image_angle_deg`` of where the cameras' up prior says a vertical should run are kept;
RANSAC over pairs of planes then rejects the rest (roof edges and horizontal lines receding
from the camera look steep too), and the inliers are refined by least squares.

Why this and not the cameras or the ground: people pitch their phones up at a house, so the
cameras' mean up is off by that pitch (10 degrees on the Sceaux set); a ground plane may not
be found (lawns, gravel, a sparse model) or may slope (a driveway). Edges are in nearly every
photo of a built site, and they give gravity, which is what a gate's posts follow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from reconstruct.geometry import View

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerticalConfig:
    max_side_px: int = 1000  # photos are read reduced to about this size (JPEG DCT scaling)
    min_length_frac: float = 0.04  # of the reduced image's diagonal
    max_image_angle_deg: float = 25.0  # from the prior's vertical at the segment
    max_prior_angle_deg: float = 35.0  # a result further than this from the prior is refused
    inlier_deg: float = 0.75  # angle between the vertical and a segment's plane
    min_segments: int = 12
    min_images: int = 2
    min_share: float = 0.3  # of the steep segments' weight that must agree
    max_rival: float = 0.5  # a second direction this strong makes the answer ambiguous
    rotation_error_deg: float = 0.5  # of one photo's SfM rotation, shared by its segments
    max_sigma_deg: float = 1.0  # refused when less certain than this
    max_images: int = 24  # evenly chosen among the registered photos
    iterations: int = 600
    seed: int = 0


@dataclass(frozen=True)
class VerticalEstimate:
    up: np.ndarray  # unit vector, world frame of the views it was found with
    segments: int  # inlier segments
    images: int  # photos with at least one inlier
    sigma_deg: float  # 1-sigma angular uncertainty (least squares over the inliers)
    prior_angle_deg: float  # angle to the prior it started from

    def describe(self) -> str:
        return (
            f"vertical edges in the photos ({self.segments} segments in {self.images} photos, "
            f"+-{self.sigma_deg:.2f} deg)"
        )


_REDUCED = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def _read_reduced(path: Path, max_side: int) -> tuple[np.ndarray, int] | None:
    """Grey image read at 1/1, 1/2, 1/4 or 1/8 size (JPEG DCT scaling), and the factor.

    The pixels as stored: the model's cameras were built from them, whatever the EXIF says."""
    try:
        with Image.open(path) as im:
            side = max(im.size)
    except OSError:
        return None
    factor = 1
    while factor < 8 and side / (2 * factor) >= max_side:
        factor *= 2
    img = cv2.imread(str(path), _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
    return (img, factor) if img is not None else None


def segment_normals(
    segments_px: np.ndarray, view: View, prior_up: np.ndarray, *, max_image_angle_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """World-frame unit normals of the interpretation planes of near-vertical segments, and their
    lengths in pixels. ``segments_px``: N x 4 (x1, y1, x2, y2) in full-size pixels."""
    if len(segments_px) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    p1, p2 = segments_px[:, :2], segments_px[:, 2:]
    # Distortion removed: normalised image coordinates of both ends.
    x1 = np.asarray(view.camera.cam_from_img(np.ascontiguousarray(p1, dtype=np.float64)))
    x2 = np.asarray(view.camera.cam_from_img(np.ascontiguousarray(p2, dtype=np.float64)))
    h1 = np.column_stack([x1, np.ones(len(x1))])
    h2 = np.column_stack([x2, np.ones(len(x2))])
    n_cam = np.cross(h1, h2)
    norm = np.linalg.norm(n_cam, axis=1)
    ok = norm > 1e-12
    # Where a vertical through the segment's middle would run, per the prior (in the image).
    up_cam = view.R @ prior_up
    mid = (h1 + h2) / 2
    step = mid + 0.05 * up_cam[None, :] * np.linalg.norm(mid, axis=1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        exp_dir = step[:, :2] / step[:, 2:3] - mid[:, :2] / mid[:, 2:3]
    seg_dir = x2 - x1
    cosang = np.abs(np.sum(exp_dir * seg_dir, axis=1)) / (
        np.linalg.norm(exp_dir, axis=1) * np.linalg.norm(seg_dir, axis=1) + 1e-15
    )
    ok &= np.isfinite(cosang) & (cosang >= math.cos(math.radians(max_image_angle_deg))) & (step[:, 2] > 0)
    n_world = (view.R.T @ (n_cam[ok] / norm[ok, None]).T).T
    lengths = np.linalg.norm(p2[ok] - p1[ok], axis=1)
    return n_world, lengths


def detect_segments(path: Path, view: View, cfg: VerticalConfig) -> np.ndarray:
    """LSD segments of one photo, in full-size pixels (N x 4)."""
    read = _read_reduced(path, cfg.max_side_px)
    if read is None:
        return np.zeros((0, 4))
    img, factor = read
    h, w = img.shape[:2]
    if abs(w * factor - view.width) > 0.1 * view.width or abs(h * factor - view.height) > 0.1 * view.height:
        return np.zeros((0, 4))  # not the photo the camera was built from (another size or a crop)
    lsd = cv2.createLineSegmentDetector()
    lines = lsd.detect(img)[0]
    if lines is None:
        return np.zeros((0, 4))
    seg = lines.reshape(-1, 4).astype(np.float64)
    diag = math.hypot(*img.shape[:2])
    keep = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]) >= cfg.min_length_frac * diag
    seg = seg[keep]
    sx = view.width / img.shape[1]
    sy = view.height / img.shape[0]
    return np.column_stack([(seg[:, 0] + 0.5) * sx - 0.5, (seg[:, 1] + 0.5) * sy - 0.5,
                            (seg[:, 2] + 0.5) * sx - 0.5, (seg[:, 3] + 0.5) * sy - 0.5])  # fmt: skip


@dataclass(frozen=True)
class DirectionFit:
    up: np.ndarray
    inliers: np.ndarray  # mask over the planes
    sigma_deg: float  # least squares over the inliers
    share: float  # of the planes' total weight held by the inliers
    rival: float  # the strongest other direction's support, relative to this one's


def _ransac_direction(
    normals: np.ndarray,
    weights: np.ndarray,
    prior_up: np.ndarray,
    sin_tol: float,
    cos_prior: float,
    iterations: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float] | None:
    """The direction within the prior's cone orthogonal to the most plane weight, and that weight."""
    n = len(normals)
    if n < 2:
        return None
    best_score, best_u = -1.0, None
    for _ in range(iterations):
        i, j = rng.choice(n, 2, replace=False)
        u = np.cross(normals[i], normals[j])
        nu = np.linalg.norm(u)
        if nu < 0.05:  # nearly the same plane: no direction
            continue
        u /= nu
        if u @ prior_up < 0:
            u = -u
        if u @ prior_up < cos_prior:
            continue
        score = float(weights[np.abs(normals @ u) < sin_tol].sum())
        if score > best_score:
            best_score, best_u = score, u
    return None if best_u is None else (best_u, best_score)


def vertical_from_normals(
    normals: np.ndarray,
    weights: np.ndarray,
    prior_up: np.ndarray,
    *,
    inlier_deg: float,
    max_prior_angle_deg: float,
    iterations: int = 600,
    seed: int = 0,
) -> DirectionFit | None:
    """The direction orthogonal to most planes (RANSAC over pairs, then least squares), with
    what it takes to judge it: its share of all the planes, and how strong the runner-up is (a
    roof's seams, a row of leaning trees, or clutter with no direction at all)."""
    rng = np.random.default_rng(seed)
    sin_tol = math.sin(math.radians(inlier_deg))
    cos_prior = math.cos(math.radians(max_prior_angle_deg))
    found = _ransac_direction(normals, weights, prior_up, sin_tol, cos_prior, iterations, rng)
    if found is None:
        return None
    u = found[0]
    for _ in range(3):
        inl = np.abs(normals @ u) < sin_tol
        if inl.sum() < 2:
            return None
        w = weights[inl] / weights[inl].sum()
        _, evecs = np.linalg.eigh((normals[inl] * w[:, None]).T @ normals[inl])
        u = evecs[:, 0] * (1 if evecs[:, 0] @ prior_up >= 0 else -1)
    if u @ prior_up < cos_prior:  # least squares drifted out of the cone RANSAC searched
        return None
    inl = np.abs(normals @ u) < sin_tol
    k = int(inl.sum())
    if k < 2:
        return None
    w = weights[inl] / weights[inl].sum()
    evals = np.linalg.eigvalsh((normals[inl] * w[:, None]).T @ normals[inl])
    # Least-squares spread: residual angles around u, and how well the planes pin u down in
    # both directions orthogonal to it (all planes through one line leave u free: large sigma).
    resid = normals[inl] @ u
    s_res = math.sqrt(float(np.mean(resid**2)) + 1e-12)
    sigma = math.degrees(s_res / math.sqrt(max(k * float(evals[1]), 1e-12)))
    score = float(weights[inl].sum())
    # The runner-up, among the planes that are not this direction's (nor near it).
    rest = np.abs(normals @ u) >= 3 * sin_tol
    other = _ransac_direction(normals[rest], weights[rest], prior_up, sin_tol, cos_prior, iterations, rng)
    rival = 0.0 if other is None else other[1] / max(score, 1e-12)
    return DirectionFit(u, inl, sigma, score / max(float(weights.sum()), 1e-12), rival)


def vertical_from_lines(
    image_dir: Path, vs: list[View], prior_up: np.ndarray, cfg: VerticalConfig | None = None
) -> VerticalEstimate | None:
    """Gravity's up from the photos' vertical edges, or None when they do not decide it."""
    cfg = cfg or VerticalConfig()
    if not vs:
        return None
    chosen = vs
    if len(vs) > cfg.max_images:
        idx = np.linspace(0, len(vs) - 1, cfg.max_images).round().astype(int)
        chosen = [vs[i] for i in sorted(set(idx.tolist()))]
    normals, weights, owner = [], [], []
    for k, v in enumerate(chosen):
        try:
            seg = detect_segments(image_dir / v.name, v, cfg)
        except cv2.error:
            continue
        n_w, ln = segment_normals(seg, v, prior_up, max_image_angle_deg=cfg.max_image_angle_deg)
        normals.append(n_w)
        # Length counts, up to a tenth of the photo's diagonal: a few long roof seams must not
        # outweigh many posts and frames.
        weights.append(np.minimum(ln, 0.1 * math.hypot(v.width, v.height)))
        owner.append(np.full(len(ln), k))
    if not normals:
        return None
    nn, ww, oo = np.vstack(normals), np.concatenate(weights), np.concatenate(owner)
    if len(nn) < cfg.min_segments:
        log.info("vertical: %d candidate segments, too few", len(nn))
        return None
    fit = vertical_from_normals(
        nn,
        ww,
        prior_up,
        inlier_deg=cfg.inlier_deg,
        max_prior_angle_deg=cfg.max_prior_angle_deg,
        iterations=cfg.iterations,
        seed=cfg.seed,
    )
    if fit is None:
        return None
    up, inl = fit.up, fit.inliers
    images = len(set(oo[inl].tolist()))
    # The least-squares sigma trusts every segment as independent; a photo's segments share its
    # camera's rotation error (about half a degree from SfM), so the photos count, not segments.
    sigma = max(fit.sigma_deg, cfg.rotation_error_deg / math.sqrt(max(images, 1)))
    est = VerticalEstimate(
        up=up,
        segments=int(inl.sum()),
        images=images,
        sigma_deg=round(sigma, 3),
        prior_angle_deg=round(math.degrees(math.acos(min(1.0, float(up @ prior_up)))), 2),
    )
    why = None
    if est.segments < cfg.min_segments or images < cfg.min_images:
        why = f"{est.segments} segments in {images} photos"
    elif fit.share < cfg.min_share:
        why = f"only {100 * fit.share:.0f} % of the steep segments agree (no dominant vertical)"
    elif fit.rival > cfg.max_rival:
        why = f"a second family of steep lines is {100 * fit.rival:.0f} % as strong (a roof, leaning trees?)"
    elif est.sigma_deg > cfg.max_sigma_deg:
        why = f"sigma {est.sigma_deg:.2f} deg"
    if why is not None:
        log.info("vertical: not decided: %s", why)
        return None
    log.info("vertical: %s, %.1f deg from the cameras' prior", est.describe(), est.prior_angle_deg)
    return est
