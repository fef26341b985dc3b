"""Multi-view refinement of a clicked pixel: find the same point in every photo that sees it and
triangulate it from all of them, with a 3D covariance.

A designer clicks a point (a reference endpoint, a placement's ground point, a ``measure``
endpoint) in one photo. The surface lift (``geometry.lift_pixel``, ``SurfaceLifter``) answers from
that photo alone: a plane fitted to the sparse points nearby, or the dense mesh. It is biased
wherever the surface is not one plane around the click (a step's edge, a door frame, a post) and
its error goes straight into the scale. A photogrammetrist instead finds the point in the other
photos and intersects the rays. That is done here:

1. **Template.** A patch around the click in the clicked photo, sampled on a grid of about 1 px
   at 12 MP (the grid spacing follows the photo's diagonal), refused when it has no texture
   (sky, a plain wall: nothing to match, and a match there would be a guess).
2. **Sweep along the ray.** Each hypothesis is a depth on the clicked pixel's ray; the patch is
   warped into every other photo through the local surface's plane at that depth (the plane's
   normal from the surface lift, else facing the camera), so the search follows the epipolar line
   with the patch's perspective foreshortening. The depth steps make about half a pixel in that
   photo. Normalised cross-correlation scores each depth; the best one must pass ``min_ncc`` and
   be unambiguous (no other peak as good more than 3 px away: repeated bricks and bars).
3. **Free 2D refinement** around the best depth's pixel, sub-pixel by a parabola, so the
   observation is not forced onto the epipolar line of a pose that may itself be slightly off;
   then a **cycle check**: the other photo's patch, matched back into the clicked photo, must land
   within ``max_cycle_px`` of the click.
4. **Occlusion.** Where the dense surface is at hand, a photo whose line of sight to the point
   hits the surface well before it does not see it and is skipped.
5. **Robust triangulation** of every accepted observation (the click included) by weighted
   Gauss-Newton on the reprojection error, through the cameras' distortion; the worst observation
   beyond ``max_residual_px`` is dropped until all agree. Each observation's pixel sigma grows as
   its correlation falls. The covariance is the inverse normal matrix, inflated by the residuals'
   chi-square when there are more observations than unknowns; the caller adds the bundle
   adjustment's pose term and the click term.

Fewer than two photos that agree means no multi-view point: the caller falls back to the surface
lift and says why. Nothing here knows Ray, HTTP or the database.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from reconstruct.geometry import Lifted, View, rays, sigma_along

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiViewConfig:
    """Tuned on the synthetic scenes and fountain-P11's own checks (docs/reconstruct.md says which
    scenes were held out)."""

    patch_radius: int = 8  # the template is (2r+1)^2 samples (tuning: docs/reconstruct.md)
    check_radius: int = 5  # a second, smaller patch: where its point differs, the click is on a depth edge
    patch_step_diag: float = 1.0 / 3000  # sample spacing as a share of the photo's diagonal (>= 1 px)
    depth_range_rel: float = 0.35  # search +-35 % of the first lift's depth (or 3 of its sigmas, if wider)
    epipolar_step_px: float = 0.5  # depth steps make about this much in the other photo
    min_ncc: float = 0.7  # a photo's best match must correlate at least this well
    ambiguity_margin: float = 0.04  # a second peak within this much of the best, > 3 px away: ambiguous
    min_texture: float = 2.5  # grey-level standard deviation of the template below which nothing is matched
    shift_px: float = 2.0  # the free 2D refinement searches this far around the epipolar match
    max_cycle_px: float = 1.0  # the match, brought back, must land this near the click
    max_residual_px: float = 2.0  # an observation further off the triangulated point is dropped
    min_angle_deg: float = 1.5  # rays closer than this to the clicked one add no depth
    max_angle_deg: float = 50.0  # beyond this the patch looks too different to trust a match
    max_views: int = 12  # the best-correlating photos kept
    match_sigma_px: float = 0.3  # pixel sigma of a perfect (ncc = 1) match
    ncc_sigma_gain: float = 2.0  # sigma grows by this factor as ncc falls from 1 to min_ncc


@dataclass
class Refined:
    """A clicked point triangulated from several photos, or the reason it was not."""

    xyz: np.ndarray | None
    cov: np.ndarray | None  # 3x3, model units squared, from the observations alone
    views: int = 0  # photos the point was triangulated from, the clicked one included
    photos: list[str] = field(default_factory=list)
    reason: str | None = None
    residual_px: float | None = None  # RMS reprojection residual of the kept observations
    max_angle_deg: float | None = None  # widest angle between the kept rays at the point
    rejected: dict[str, str] = field(default_factory=dict)  # photo -> why its match was not used
    edge_gap: float | None = None  # where a smaller patch put the point elsewhere (a depth edge): how far
    # The kept observations (photo, pixel, pixel sigma), so the point can be triangulated again in
    # another version of the model (``covariance.held_intrinsics``).
    observations: list[tuple[str, np.ndarray, float]] = field(default_factory=list)


class PhotoSet:
    """Grey photos by name, read once from a folder. ``get`` answers None for a photo that is not
    there or does not match its camera's size (then nothing is matched in it)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._cache: dict[str, np.ndarray | None] = {}

    def get(self, view: View) -> np.ndarray | None:
        if view.name not in self._cache:
            img = None
            if self.folder is not None:
                path = self.folder / view.name
                if path.is_file():
                    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
                    raw = cv2.imread(str(path), flags)
                    if raw is not None and raw.shape[:2] == (view.height, view.width):
                        img = raw.astype(np.float32)
                    elif raw is not None:
                        log.warning("a photo's size differs from its camera; it is not matched in")
            self._cache[view.name] = img
        return self._cache[view.name]


def _sample(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples at pixel positions ``uv`` (..., 2) in COLMAP's convention (pixel centres at
    +0.5); NaN outside the photo."""
    shape = uv.shape[:-1]
    flat = uv.reshape(-1, 2)
    n = len(flat)
    cols = 1024  # remap's maps must stay under 32k rows and columns
    rows = max(1, -(-n // cols))
    mx = np.full(rows * cols, -10.0, np.float32)
    my = np.full(rows * cols, -10.0, np.float32)
    mx[:n] = flat[:, 0] - 0.5
    my[:n] = flat[:, 1] - 0.5
    out = cv2.remap(
        img, mx.reshape(rows, cols), my.reshape(rows, cols), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    h, w = img.shape[:2]
    inside = (flat[:, 0] >= 0.5) & (flat[:, 0] <= w - 0.5) & (flat[:, 1] >= 0.5) & (flat[:, 1] <= h - 0.5)
    vals = out.reshape(-1)[:n].astype(np.float64)
    vals[~inside] = np.nan
    return vals.reshape(shape)


def _ncc(rows: np.ndarray, tmpl: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted normalised cross-correlation of each row of ``rows`` (M x N) with ``tmpl`` (N); -1
    where a row holds NaN (outside the photo) or is flat. Centre-weighted: at an edge (a step, a
    post) the far side of the patch may lie on another surface, which the warp does not follow."""
    w = np.ones(tmpl.shape[-1]) if weights is None else weights
    w = w / w.sum()
    t = tmpl - float(w @ tmpl)
    t = t * np.sqrt(w)
    t = t / (np.linalg.norm(t) + 1e-12)
    r = (rows - (rows @ w)[:, None]) * np.sqrt(w)
    norm = np.linalg.norm(r, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r @ t) / norm
    return np.asarray(np.where(np.isfinite(out) & (norm > 1e-6), out, -1.0))


def _second_peak(curve: np.ndarray, best: int) -> float:
    """The highest value of ``curve`` outside the lobe around ``best`` (the main peak's slopes down
    to the first minimum either side): a broad peak is not ambiguous, a second peak is."""
    # Wiggles of a noisy slope (a rise of up to 0.02 that falls again) do not end the lobe.
    lo = best
    while lo > 0 and curve[lo - 1] <= min(curve[lo : best + 1].min() + 0.02, curve[best]):
        lo -= 1
    hi = best
    while hi < len(curve) - 1 and curve[hi + 1] <= min(curve[best : hi + 1].min() + 0.02, curve[best]):
        hi += 1
    rest = np.concatenate([curve[:lo], curve[hi + 1 :]])
    return float(rest.max()) if len(rest) else -1.0


def _parabola(y_m: float, y_0: float, y_p: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through three equally spaced samples."""
    den = y_m - 2 * y_0 + y_p
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (y_m - y_p) / den, -0.5, 0.5))


def _refine_2d(
    img: np.ndarray, base: np.ndarray, tmpl: np.ndarray, radius: float, weights: np.ndarray
) -> tuple[np.ndarray, float]:
    """The sub-pixel shift (2,) of sample positions ``base`` (N x 2) in ``img`` within ``radius``
    that best matches ``tmpl``, and its correlation: a 0.5 px grid, then a 0.125 px grid around
    its best, then a parabola through the finest samples (a parabola on the coarse grid alone is
    biased by up to a tenth of a pixel)."""
    centre = np.zeros(2)
    best = -1.0
    for half, step in ((radius, 0.5), (0.5, 0.125)):
        steps = np.arange(-half, half + 1e-9, step)
        gx, gy = np.meshgrid(steps, steps)
        shifts = centre + np.column_stack([gx.ravel(), gy.ravel()])
        vals = _sample(img, base[None, :, :] + shifts[:, None, :])
        scores = _ncc(vals, tmpl, weights).reshape(gx.shape)
        iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
        best = float(scores[iy, ix])
        dx = dy = 0.0
        if 0 < ix < scores.shape[1] - 1:
            dx = _parabola(scores[iy, ix - 1], best, scores[iy, ix + 1])
        if 0 < iy < scores.shape[0] - 1:
            dy = _parabola(scores[iy - 1, ix], best, scores[iy + 1, ix])
        centre = centre + np.array([steps[ix] + step * dx, steps[iy] + step * dy])
    return centre, best


def _triangulate(
    obs: list[tuple[View, np.ndarray, float]], X0: np.ndarray, max_residual_px: float
) -> tuple[np.ndarray, np.ndarray, list[int], float] | None:
    """Weighted Gauss-Newton on the reprojection error from ``X0``; drops the worst observation
    beyond ``max_residual_px`` (and 3 of its sigmas) until all agree. Returns the point, its
    covariance, the kept indices and the RMS residual in pixels."""
    keep = list(range(len(obs)))
    X = np.asarray(X0, float).copy()
    while len(keep) >= 2:
        for _ in range(10):
            r, J = _residuals(obs, keep, X)
            w = np.repeat([1.0 / obs[k][2] ** 2 for k in keep], 2)
            JtW = J.T * w
            try:
                dx = np.linalg.solve(JtW @ J + 1e-12 * np.eye(3), -JtW @ r)
            except np.linalg.LinAlgError:
                return None
            X = X + dx
            if np.linalg.norm(dx) < 1e-9 * (1 + np.linalg.norm(X)):
                break
        r, J = _residuals(obs, keep, X)
        res = np.hypot(r[0::2], r[1::2])
        limits = np.array([max(max_residual_px, 3 * obs[k][2]) for k in keep])
        worst = int(np.argmax(res / limits))
        if res[worst] > limits[worst]:
            del keep[worst]
            continue
        w = np.repeat([1.0 / obs[k][2] ** 2 for k in keep], 2)
        try:
            cov = np.linalg.inv((J.T * w) @ J)
        except np.linalg.LinAlgError:
            return None
        dof = 2 * len(keep) - 3
        if dof > 0:  # the residuals' own scatter, where it says the sigmas were too small
            chi2 = float(np.sum(w * r**2)) / dof
            cov = cov * max(1.0, chi2)
        return X, cov, keep, float(np.sqrt(np.mean(res**2)))
    return None


def _residuals(
    obs: list[tuple[View, np.ndarray, float]], keep: list[int], X: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reprojection residuals (2m) and their Jacobian (2m x 3) by central differences."""
    h = 1e-6 * (1.0 + float(np.linalg.norm(X)))
    pts = np.vstack([X, X + np.diag([h, h, h]), X - np.diag([h, h, h])])  # 7 x 3
    r = np.zeros(2 * len(keep))
    J = np.zeros((2 * len(keep), 3))
    for i, k in enumerate(keep):
        view, uv, _ = obs[k]
        p, _ = view.project(pts)
        r[2 * i : 2 * i + 2] = p[0] - uv
        J[2 * i : 2 * i + 2] = ((p[1:4] - p[4:7]) / (2 * h)).T
    return r, J


@dataclass
class _Template:
    """The clicked patch: sample positions, grey values, weights, rays and the search range."""

    ref: View
    img: np.ndarray
    P: np.ndarray  # N x 2 sample positions in the clicked photo
    values: np.ndarray  # N
    weights: np.ndarray  # N, centre-weighted
    C: np.ndarray
    D: np.ndarray  # N x 3 sample rays
    d0: np.ndarray  # the clicked ray
    normals: list[np.ndarray]  # surface normals tried for the warp
    s_lo: float
    s_hi: float
    centre: int  # index of the clicked sample
    coarse: np.ndarray  # mask of the samples the coarse sweep uses (every other row and column)


def _match(t: _Template, view: View, img: np.ndarray, cfg: MultiViewConfig) -> tuple[np.ndarray, float, float] | str:
    """Find the template in one other photo: (pixel, correlation, depth on the clicked ray), or why not."""
    ends, zs = view.project(np.vstack([t.C + t.s_lo * t.d0, t.C + t.s_hi * t.d0]))
    if (zs <= 0).any():
        return "the search range passes behind this camera"
    length = float(np.linalg.norm(ends[1] - ends[0]))
    # Coarse to fine: the sweep runs with every other sample of the patch at twice the step, then
    # the full patch at the fine step around the coarse peak (about 7x fewer samples in all).
    m = int(np.clip(math.ceil(length / (2 * cfg.epipolar_step_px)), 8, 1200))
    inv = np.linspace(1.0 / t.s_hi, 1.0 / t.s_lo, m)  # uniform in inverse depth: even pixel steps
    sub = t.coarse
    best_any: tuple[float, int, np.ndarray, np.ndarray, np.ndarray] | None = None
    for n in t.normals:
        a = float(n @ t.d0) / (t.D @ n)  # depth on the clicked ray -> ray parameter of each sample
        if not (a > 0).all():
            continue
        Q = t.C + ((1.0 / inv)[:, None, None] * a[None, sub, None]) * t.D[None, sub, :]  # m x n x 3
        uvj, z = view.project(Q.reshape(-1, 3))
        uvj = uvj.reshape(m, -1, 2)
        vals = _sample(img, uvj)
        vals[(z.reshape(m, -1) <= 0)] = np.nan
        ncc = _ncc(vals, t.values[sub], t.weights[sub])
        k = int(np.argmax(ncc))
        if best_any is None or ncc[k] > best_any[0]:
            best_any = (float(ncc[k]), k, ncc, uvj, a)
    if best_any is None:
        return "sees the surface edge-on"
    score, best, ncc, uvj, a = best_any
    if score < cfg.min_ncc - 0.1:
        return f"no match (best correlation {score:.2f})"
    if _second_peak(ncc, best) > score - cfg.ambiguity_margin:
        return "ambiguous (repeated texture along the line of search)"
    # Fine: the full patch, half the step, two coarse steps either side of the peak.
    lo_i, hi_i = max(0, best - 2), min(m - 1, best + 2)
    fine = np.linspace(inv[lo_i], inv[hi_i], 2 * (hi_i - lo_i) + 1)
    Q = t.C + ((1.0 / fine)[:, None, None] * a[None, :, None]) * t.D[None, :, :]
    uvf, zf = view.project(Q.reshape(-1, 3))
    vals = _sample(img, uvf.reshape(len(fine), -1, 2))
    vals[(zf.reshape(len(fine), -1) <= 0)] = np.nan
    nf = _ncc(vals, t.values, t.weights)
    bf = int(np.argmax(nf))
    if nf[bf] < cfg.min_ncc:
        return f"no match (best correlation {nf[bf]:.2f})"
    frac = _parabola(nf[bf - 1], nf[bf], nf[bf + 1]) if 0 < bf < len(fine) - 1 else 0.0
    step_inv = (fine[1] - fine[0]) if len(fine) > 1 else 0.0
    s_b = 1.0 / (fine[bf] + frac * step_inv)
    base, _ = view.project(t.C + (s_b * a)[:, None] * t.D)
    shift, score = _refine_2d(img, base, t.values, cfg.shift_px, t.weights)
    if score < cfg.min_ncc:
        return f"no match (best correlation {score:.2f})"
    # Cycle: the other photo's patch, matched back into the clicked photo, lands on the click.
    back = _sample(img, base + shift)
    if not np.isfinite(back).all():
        return "the match runs off the photo"
    cyc, _ = _refine_2d(t.img, t.P, back, cfg.shift_px, t.weights)
    if float(np.hypot(*cyc)) > cfg.max_cycle_px:
        return "the match does not lead back to the click"
    return base[t.centre] + shift, score, s_b


def _refine_once(
    ref: View,
    uv: tuple[float, float],
    first: Lifted | None,
    others: list[View],
    photos: PhotoSet,
    *,
    config: MultiViewConfig | None = None,
    occluded: Callable[[View, np.ndarray], bool] | None = None,
    depth_range: tuple[float, float] | None = None,
) -> Refined:
    """One pass of :func:`refine_point` with the configured patch."""
    cfg = config or MultiViewConfig()
    img_ref = photos.get(ref)
    if img_ref is None:
        return Refined(None, None, reason="the photo is not at hand to match in")
    diag = math.hypot(ref.width, ref.height)
    step = max(1.0, diag * cfg.patch_step_diag)
    g = np.arange(-cfg.patch_radius, cfg.patch_radius + 1)
    gx, gy = np.meshgrid(g, g)
    weights = np.exp(-(gx**2 + gy**2).ravel() / (2.0 * (0.6 * cfg.patch_radius) ** 2))
    P = np.asarray(uv, float) + np.column_stack([gx.ravel(), gy.ravel()]) * step
    values = _sample(img_ref, P)
    if not np.isfinite(values).all():
        return Refined(None, None, reason="too near the photo's edge to match")
    if float(values.std()) < cfg.min_texture:
        return Refined(None, None, reason="no texture here to match (sky or a plain surface)")
    C = ref.centre
    d0 = rays(ref, np.asarray([uv], float))[0]
    # The warp's plane: the surface lift's normal where there is one, and one facing the camera
    # (a post, a door frame or a step's riser the lift's plane does not describe); per photo the
    # better of the two is used.
    normals = [-d0]
    if first is not None and first.normal is not None:
        n = np.asarray(first.normal, float)
        n = -n if n @ d0 > 0 else n
        if abs(float(n @ d0)) >= 0.15 and float(n @ -d0) < 0.995:
            normals.insert(0, n)
    if first is not None and first.xyz is not None:
        s0 = float((np.asarray(first.xyz) - C) @ d0)
        half = min(0.6 * s0, max(cfg.depth_range_rel * s0, 3.0 * float(first.sigma)))
        s_lo, s_hi = s0 - half, s0 + half
    elif depth_range is not None:
        s_lo, s_hi = depth_range
        s0 = math.sqrt(max(s_lo, 1e-9) * s_hi)
    else:
        return Refined(None, None, reason="no depth to start the search from")
    s_lo = max(s_lo, 0.05 * s_hi)
    coarse = ((gx % 2 == 0) & (gy % 2 == 0)).ravel()
    t = _Template(ref, img_ref, P, values, weights, C, rays(ref, P), d0, normals, s_lo, s_hi, len(P) // 2, coarse)
    X0 = C + s0 * d0

    obs: list[tuple[View, np.ndarray, float]] = [(ref, np.asarray(uv, float), cfg.match_sigma_px)]
    scores: list[float] = [1.0]
    depths: list[float] = [s0]
    rejected: dict[str, str] = {}
    cos_min, cos_max = math.cos(math.radians(cfg.min_angle_deg)), math.cos(math.radians(cfg.max_angle_deg))
    for view in others:
        if view.name == ref.name:
            continue
        to_j = view.centre - X0
        cang = float((C - X0) @ to_j) / (float(np.linalg.norm(C - X0) * np.linalg.norm(to_j)) + 1e-12)
        if cang > cos_min:
            rejected[view.name] = "too close to the clicked photo's viewpoint"
            continue
        if cang < cos_max:
            rejected[view.name] = "sees the point from too different a side"
            continue
        img = photos.get(view)
        if img is None:
            rejected[view.name] = "photo not at hand"
            continue
        got = _match(t, view, img, cfg)
        if isinstance(got, str):
            rejected[view.name] = got
            continue
        uv_j, score, s_b = got
        if occluded is not None and occluded(view, C + s_b * d0):
            rejected[view.name] = "hidden behind the surface"
            continue
        frac = (1.0 - score) / max(1e-6, 1.0 - cfg.min_ncc)
        obs.append((view, uv_j, cfg.match_sigma_px * (1.0 + cfg.ncc_sigma_gain * frac)))
        scores.append(score)
        depths.append(s_b)

    if len(obs) > cfg.max_views:
        order = np.argsort(scores[1:])[::-1][: cfg.max_views - 1] + 1
        for k in set(range(1, len(obs))) - set(order.tolist()):
            rejected[obs[k][0].name] = "not among the best matches"
        obs = [obs[0]] + [obs[k] for k in sorted(order.tolist())]
        depths = [depths[0]] + [depths[k] for k in sorted(order.tolist())]
    if len(obs) < 2:
        return Refined(None, None, 1, [ref.name], "found in no other photo", rejected=rejected)
    X_start = C + float(np.median(depths[1:])) * d0
    tri = _triangulate(obs, X_start, cfg.max_residual_px)
    if tri is None:
        return Refined(None, None, 1, [ref.name], "the matches do not meet in one point", rejected=rejected)
    X, cov, keep, rms = tri
    if 0 not in keep:
        return Refined(None, None, 1, [ref.name], "the matches do not meet the clicked ray", rejected=rejected)
    for k in set(range(len(obs))) - set(keep):
        rejected[obs[k][0].name] = "its match disagrees with the others"
    kept = [obs[k][0] for k in keep]
    dirs = np.array([(v.centre - X) / np.linalg.norm(v.centre - X) for v in kept])
    angle = float(np.degrees(np.arccos(np.clip((dirs @ dirs.T).min(), -1.0, 1.0))))
    if angle < cfg.min_angle_deg:
        return Refined(None, None, 1, [ref.name], "the photos that see it stand too close together", rejected=rejected)
    if float((X - C) @ d0) <= 0:
        return Refined(None, None, 1, [ref.name], "the matches meet behind the camera", rejected=rejected)
    kept_obs = [(obs[k][0].name, np.asarray(obs[k][1], float), float(obs[k][2])) for k in keep]
    return Refined(X, cov, len(keep), [v.name for v in kept], None, rms, angle, rejected, observations=kept_obs)


def retriangulate(
    obs: list[tuple[str, np.ndarray, float]], views: dict[str, View], X0: np.ndarray
) -> np.ndarray | None:
    """The point the same observations give with other cameras (``views``, by photo name); None
    where a photo is missing there or the rays do not meet."""
    if any(name not in views for name, _, _ in obs) or len(obs) < 2:
        return None
    got = _triangulate([(views[name], uv, sig) for name, uv, sig in obs], X0, math.inf)
    return None if got is None else got[0]


def refine_point(
    ref: View,
    uv: tuple[float, float],
    first: Lifted | None,
    others: list[View],
    photos: PhotoSet,
    *,
    config: MultiViewConfig | None = None,
    occluded: Callable[[View, np.ndarray], bool] | None = None,
    depth_range: tuple[float, float] | None = None,
) -> Refined:
    """Triangulate the point clicked at ``uv`` in ``ref`` from every photo in ``others`` that sees
    it. ``first`` is the surface lift (its depth and normal start the search); without it the
    whole ``depth_range`` (model units along the ray) is searched with a patch facing the camera.

    The point is found twice, with the full patch and a smaller one (``check_radius``). On a depth
    edge (a rim, a moulding, a post against the wall behind) the two patches are dominated by
    different surfaces and land apart; the covariance then grows by their gap, so the sigma says
    what the photos cannot decide (on fountain-P11's checks such clicks were 2-6 cm off with a
    sigma of 5 mm before)."""
    cfg = config or MultiViewConfig()
    kw = {"occluded": occluded, "depth_range": depth_range}
    main = _refine_once(ref, uv, first, others, photos, config=cfg, **kw)  # type: ignore[arg-type]
    if main.xyz is None or main.cov is None or cfg.check_radius <= 0:
        return main
    small = _refine_once(ref, uv, first, others, photos, config=replace(cfg, patch_radius=cfg.check_radius), **kw)  # type: ignore[arg-type]
    if small.xyz is not None:
        gap = np.asarray(small.xyz) - np.asarray(main.xyz)
        dist = float(np.linalg.norm(gap))
        if dist > 3.0 * max(sigma_along(main.cov, gap), 1e-12):
            main.cov = main.cov + np.outer(gap, gap)
            main.edge_gap = dist
    return main
