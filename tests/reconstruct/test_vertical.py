"""Gravity from the photos' vertical edges, on synthetic photos whose answer is exact."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest

from reconstruct.geometry import views
from reconstruct.orient import camera_up, orient
from reconstruct.placement import lift_to_ground
from reconstruct.vertical import VerticalEstimate, vertical_from_lines, vertical_from_normals
from tests.reconstruct.synthetic import H, W, make_scene


def _deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(a @ b)) / float(np.linalg.norm(a) * np.linalg.norm(b)))))


def _draw_site(sc, out: Path, *, lines: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Photos of the synthetic site: posts (vertical) and rails (horizontal) on the wall y = 5,
    and kerb lines on the ground running away from the cameras, drawn through the true cameras."""
    segs = []
    if lines:
        for x in np.arange(-3.5, 3.6, 0.5):
            segs.append(((x, 5.0, 0.0), (x, 5.0, 3.0)))
        for z in (0.4, 1.2, 2.2):
            segs.append(((-4.0, 5.0, z), (4.0, 5.0, z)))
        for x in (-1.5, 1.5):  # receding lines: steep in the photo, not vertical
            segs.append(((x, -1.0, 0.0), (x, 4.9, 0.0)))
    out.mkdir(parents=True, exist_ok=True)
    for k in range(len(sc.cams_truth)):
        img = np.full((H, W), 235, np.uint8)
        for a, b in segs:
            pa = [round(v * 16) for v in sc.pixel(k, np.array(a))]  # 1/16 px: shift=4
            pb = [round(v * 16) for v in sc.pixel(k, np.array(b))]
            cv2.line(img, pa, pb, 30, 4, cv2.LINE_AA, shift=4)
        cv2.imwrite(str(out / f"{k:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def test_normals_orthogonal_to_a_direction_are_found_among_outliers() -> None:
    rng = np.random.default_rng(3)
    up = np.array([0.1, -0.2, 1.0])
    up /= np.linalg.norm(up)
    good = np.cross(up, rng.normal(size=(80, 3)))
    good /= np.linalg.norm(good, axis=1)[:, None]
    bad = rng.normal(size=(60, 3))
    bad /= np.linalg.norm(bad, axis=1)[:, None]
    normals = np.vstack([good, bad])
    fit = vertical_from_normals(
        normals, np.ones(len(normals)), np.array([0.0, 0.0, 1.0]), inlier_deg=0.5, max_prior_angle_deg=35
    )
    assert fit is not None
    assert _deg(fit.up, up) < 0.05 and fit.up @ up > 0  # a few random planes fall inside the tolerance
    assert fit.inliers[:80].all() and fit.inliers[80:].sum() < 6
    assert fit.sigma_deg < 0.01
    assert fit.share > 0.55 and fit.rival < 0.15


def test_clutter_and_a_rival_family_leave_the_vertical_undecided() -> None:
    """Clutter with no direction, or a second strong family (a steep roof's seams, leaning trees),
    must not become gravity with a tiny sigma: the fit reports its share and its rival."""
    rng = np.random.default_rng(5)
    z = np.array([0.0, 0.0, 1.0])

    def family(direction: np.ndarray, n: int) -> np.ndarray:
        d = direction / np.linalg.norm(direction)
        out = np.cross(d, rng.normal(size=(n, 3)))
        return out / np.linalg.norm(out, axis=1)[:, None]

    clutter = rng.normal(size=(200, 3))
    clutter /= np.linalg.norm(clutter, axis=1)[:, None]
    fit = vertical_from_normals(clutter, np.ones(200), z, inlier_deg=0.75, max_prior_angle_deg=35)
    assert fit is None or fit.share < 0.3
    seams = family(np.array([0.0, np.sin(0.35), np.cos(0.35)]), 40)  # 20 degrees off plumb
    posts = family(z, 50)
    both = np.vstack([posts, seams])
    fit = vertical_from_normals(both, np.ones(len(both)), z, inlier_deg=0.75, max_prior_angle_deg=35)
    assert fit is not None and fit.rival > 0.5


def test_pitched_cameras_get_gravity_from_the_edges(tmp_path: Path) -> None:
    # Every photo looks up at the wall's top: the cameras' mean up is off by their pitch.
    sc = make_scene(scale=0.6, target_z=3.2)
    truth_up = sc.to_model(np.array([0.0, 0.0, 1.0])) - sc.to_model(np.zeros(3))
    truth_up /= np.linalg.norm(truth_up)
    vs = list(views(sc.rec).values())
    prior = camera_up(vs)
    assert _deg(prior, truth_up) > 7.0
    _draw_site(sc, tmp_path)
    est = vertical_from_lines(tmp_path, vs, prior)
    assert est is not None
    assert _deg(est.up, truth_up) < 0.1
    assert est.images == len(vs) and est.segments >= 15 * len(vs) // 2
    assert est.prior_angle_deg > 7.0
    # And orient uses it: +Z is gravity, the level ground is found near it and is z = 0.
    pts = np.array([p.xyz for p in sc.rec.points3D.values()])
    ori = orient(pts, vs, vertical=est)
    assert ori.ground["found"] and ori.ground["slope_deg"] == 0.0
    assert _deg(ori.R[2], truth_up) < 0.1
    assert "vertical edges" in ori.up_source and "ground level" in ori.up_source
    ground_truth = np.array([X for X in sc.truth_points if abs(X[2]) < 1e-6])
    z = (ori.R @ sc.to_model(ground_truth).T).T[:, 2] + ori.t[2]
    assert np.abs(z).max() < 0.6 * 0.01  # mm over the 8 m site (0.1 deg), in model units
    # Where no ground is seen (a lawn, gravel, a sparse model), the edges still give gravity,
    # and the ground is put 1.5 m below the cameras; the cameras alone tilt the site by the pitch.
    wall_only = sc.to_model(np.array([X for X in sc.truth_points if X[2] > 0.5]))
    ori = orient(wall_only, vs, vertical=est)
    assert not ori.ground["found"] and _deg(ori.R[2], truth_up) < 0.1
    cam_z = np.array([(ori.R @ v.centre + ori.t)[2] for v in vs])
    assert np.median(cam_z) == pytest.approx(1.5, abs=1e-6)
    assert _deg(orient(wall_only, vs).R[2], truth_up) > 7.0


def test_photos_without_edges_give_no_vertical(tmp_path: Path) -> None:
    sc = make_scene(scale=0.6)
    vs = list(views(sc.rec).values())
    _draw_site(sc, tmp_path, lines=False)
    assert vertical_from_lines(tmp_path, vs, camera_up(vs)) is None
    # Photos that are not the ones the cameras were built from are not read as if they were.
    for f in tmp_path.iterdir():
        cv2.imwrite(str(f), np.full((300, 400), 128, np.uint8))
    assert vertical_from_lines(tmp_path, vs, camera_up(vs)) is None


def test_a_sloping_ground_keeps_gravity_up_and_placement_lands_on_the_slope() -> None:
    sc = make_scene(scale=1.0)
    rng = np.random.default_rng(1)
    slope = math.radians(6.0)  # a driveway rising 10.5 % towards the wall
    gx, gy = rng.uniform(-4, 4, 3000), rng.uniform(-1.5, 4.9, 3000)
    ground = np.column_stack([gx, gy, gy * math.tan(slope)])
    wx, wz = rng.uniform(-4, 4, 1500), rng.uniform(0.6, 3.0, 1500)
    wall = np.column_stack([wx, np.full(1500, 5.0), wz])
    pts_truth = np.vstack([ground, wall])
    pts = sc.to_model(pts_truth)
    vs = list(views(sc.rec).values())
    truth_up = sc.to_model(np.array([0.0, 0.0, 1.0])) - sc.to_model(np.zeros(3))
    truth_up /= np.linalg.norm(truth_up)
    est = VerticalEstimate(up=truth_up, segments=100, images=5, sigma_deg=0.1, prior_angle_deg=4.0)
    ori = orient(pts, vs, vertical=est)
    assert ori.ground["found"]
    assert ori.ground["slope_deg"] == pytest.approx(6.0, abs=0.1)
    assert _deg(ori.R[2], truth_up) < 1e-6  # gravity, not the slope's normal
    assert "slopes 6.0 deg" in ori.up_source, ori.up_source
    n = np.asarray(ori.ground["plane"][:3])
    assert _deg(n, np.array([0.0, 0.0, 1.0])) == pytest.approx(6.0, abs=0.1)
    # The facade stays vertical in the site frame.
    assert all(abs(f["plane"][2]) < 0.01 for f in ori.facades)
    # A click on the ground lands on the sloping plane, not on a level one through the origin.
    rec = pycolmap.Reconstruction(sc.rec)
    rec.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(ori.R), ori.t))
    v = views(rec)["0002.jpg"]
    X_true = np.array([0.7, 4.0, 4.0 * math.tan(slope)])
    uv = sc.pixel(2, X_true)
    got = lift_to_ground(v, uv, ground=ori.ground["plane"])
    want = ori.R @ sc.to_model(X_true) + ori.t
    assert np.linalg.norm(got - want) < 0.02  # the plane is a RANSAC fit of the noisy ground
    level = lift_to_ground(v, uv)
    assert np.linalg.norm(level - want) > 0.3


def test_a_design_on_a_slope_is_drawn_and_shaded_from_its_own_ground() -> None:
    """On a sloping site the design's base is not at z = 0: the elevation measures from the
    base, the montage's shadow lies at its height, and a cross-fall is warned about."""
    from reconstruct.design import load_design
    from reconstruct.drawing import elevation
    from reconstruct.placement import PlacementSpec, resolve
    from reconstruct.plan import placed_meshes
    from reconstruct.render import default_light, shadow_meshes
    from tests.conftest import SAMPLE

    sc = make_scene(scale=1.0)
    s, Rm, tm = sc.model_from_truth
    rec = pycolmap.Reconstruction(sc.rec)
    rec.transform(pycolmap.Sim3d(1.0 / s, pycolmap.Rotation3d(Rm.T), -(Rm.T @ tm) / s))  # the true frame
    vs = views(rec)
    slope = math.tan(math.radians(6.0))
    plane = [0.0, -slope / math.hypot(1, slope), 1 / math.hypot(1, slope), 0.0]  # z = slope * y
    A, B = np.array([-1.8, 3.0, 3.0 * slope]), np.array([1.8, 3.0, 3.0 * slope])
    spec = PlacementSpec.model_validate({"image": "0002.jpg", "ground_points": [sc.pixel(2, A), sc.pixel(2, B)]})
    design = load_design(SAMPLE / "design" / "gate.json")
    pl = resolve(spec, design, vs, ground=plane)
    assert pl.t[2] == pytest.approx(3.0 * slope, abs=1e-6) and pl.opening_m == pytest.approx(3.6, abs=1e-6)
    assert not pl.warnings  # level across the opening (the slope runs towards the wall)
    meshes = placed_meshes(design, pl)
    world = [(m.vertices, m.faces) for m in meshes]
    elev = elevation(world, pl.to_json(), np.zeros((0, 3)), design_name="gate")
    dims = {d.label: d.value_m for d in elev.dims}
    assert dims["height"] == pytest.approx(1.75, abs=1e-3)  # the gate's own height, not 1.75 + 0.31
    light = default_light(vs["0002.jpg"])
    shadow = shadow_meshes(meshes, light, float(pl.t[2]))
    assert min(float(m.vertices[:, 2].min()) for m in shadow) == pytest.approx(pl.t[2] + 0.002, abs=1e-6)
    # Across a cross-fall the designer is told.
    A2, B2 = np.array([-1.8, 1.0, 1.0 * slope]), np.array([1.8, 4.0, 4.0 * slope])
    spec2 = PlacementSpec.model_validate({"image": "0002.jpg", "ground_points": [sc.pixel(2, A2), sc.pixel(2, B2)]})
    assert any("falls 32 cm across the opening" in w for w in resolve(spec2, design, vs, ground=plane).warnings)
