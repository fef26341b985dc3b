"""Scale, orientation and measurement on a synthetic site with exact answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from reconstruct.errors import ScaleReferenceError
from reconstruct.geometry import lift_pixel, observations, views
from reconstruct.measure import measure
from reconstruct.orient import orient
from reconstruct.reference import ScaleReference, Segment, check_reference, load_reference
from reconstruct.scale import estimate_scale
from reconstruct.site import Site
from tests.reconstruct.synthetic import make_scene


def test_lifted_pixel_lands_on_the_true_surface() -> None:
    sc = make_scene()
    v = views(sc.rec)["0000.jpg"]
    ouv, oxyz = observations(sc.rec, "0000.jpg")
    X = np.array([0.33, 5.0, 1.27])  # on the wall, between grid points
    got = lift_pixel(v, sc.pixel(0, X), ouv, oxyz)
    assert got.xyz is not None
    assert np.allclose(got.xyz, sc.to_model(X), atol=1e-6)
    off = lift_pixel(v, (-5.0, 10.0), ouv, oxyz)
    assert off.xyz is None and "outside" in (off.reason or "")


def test_scale_from_one_segment_is_exact() -> None:
    sc = make_scene(scale=0.37)
    A, B = np.array([-2.1, 5.0, 0.4]), np.array([1.9, 5.0, 2.6])
    seg = Segment(image="0001.jpg", a=sc.pixel(1, A), b=sc.pixel(1, B), length_m=float(np.linalg.norm(A - B)))
    est = estimate_scale(sc.rec, ScaleReference(segments=[seg]))
    assert est.scale == pytest.approx(1 / 0.37, rel=1e-6)
    assert 1e-3 < est.sigma_rel < 5e-3  # a 1 px click at ~9 m on a ~4.9 m segment


def test_contradictory_references_are_reported_and_down_weighted() -> None:
    sc = make_scene(scale=0.5)
    A, B = np.array([-2.0, 5.0, 0.5]), np.array([2.0, 5.0, 0.5])
    C, D = np.array([-1.0, 0.0, 0.0]), np.array([1.5, 2.0, 0.0])
    true_ab, true_cd = float(np.linalg.norm(A - B)), float(np.linalg.norm(C - D))
    segs = [
        Segment(image="0000.jpg", a=sc.pixel(0, A), b=sc.pixel(0, B), length_m=true_ab),
        Segment(image="0002.jpg", a=sc.pixel(2, A), b=sc.pixel(2, B), length_m=true_ab),
        Segment(image="0003.jpg", a=sc.pixel(3, C), b=sc.pixel(3, D), length_m=true_cd * 1.10),  # 10 % off
    ]
    est = estimate_scale(sc.rec, ScaleReference(segments=segs))
    assert any("segment 2" in w for w in est.warnings)
    assert est.scale == pytest.approx(2.0, rel=0.01)


def test_orientation_puts_the_ground_at_z0_and_up_at_plus_z() -> None:
    sc = make_scene(scale=0.8)
    s_true = 1 / 0.8
    rec = pycolmap.Reconstruction(sc.rec)
    rec.transform(pycolmap.Sim3d(s_true, pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    pts = np.array([p.xyz for p in rec.points3D.values()])
    ori = orient(pts, list(views(rec).values()))
    assert ori.ground["found"]
    world = (ori.R @ pts.T).T + ori.t
    truth = np.array([sc.truth_points[0]])  # any ground point maps to z = 0
    g = (ori.R @ (s_true * sc.to_model(truth)).T).T + ori.t
    assert abs(g[0, 2]) < 1e-4
    # Heights are preserved exactly: the wall's top row is at z = 3.
    assert world[:, 2].max() == pytest.approx(3.0, abs=1e-4)
    assert world[:, 2].min() == pytest.approx(0.0, abs=1e-4)
    assert len(ori.facades) >= 1


def test_measure_answers_exactly_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    sc = make_scene(scale=1.0)
    site = Site(tmp_path, sc.rec, {"scale_sigma_rel": 0.002})
    A, B = np.array([-3.0, 5.0, 0.6]), np.array([2.5, 5.0, 2.2])
    segs = [
        Segment(image="0004.jpg", a=sc.pixel(4, A), b=sc.pixel(4, B)),
        Segment(image="0004.jpg", a=(10.0, 10.0), b=sc.pixel(4, B)),  # sky corner: no surface
        Segment(image="9999.jpg", a=(1.0, 1.0), b=(2.0, 2.0)),
    ]
    res = measure(site, segs)
    truth = float(np.linalg.norm(A - B))
    assert res[0]["length_m"] == pytest.approx(truth, abs=1e-3)
    # Scale (0.2 %) and a 1 px click at ~9 m range with f = 1100 px on each endpoint.
    click = 9.0 / 1100.0
    assert truth * 0.002 < res[0]["sigma_m"] < np.hypot(truth * 0.002, 4 * click)
    # The endpoints' covariance (surface fit, the bundle adjustment's pose term, the click) and
    # the scale are the two parts, and they add up.
    parts = res[0]["sigma_parts_m"]
    assert 0 < parts["endpoints"] < res[0]["sigma_m"]
    assert res[0]["sigma_m"] == pytest.approx(np.sqrt(sum(v**2 for v in parts.values())), abs=2e-4)
    # No photos at hand: each endpoint says it was lifted in its own photo only, and why.
    ends = res[0]["endpoints"]
    assert ends["a"]["lifted_on"] == "plane" and ends["a"]["views"] == 1
    assert "not at hand" in ends["a"]["reason"]
    assert res[1]["length_m"] is None and res[1]["reason"]
    assert res[2]["length_m"] is None and "not registered" in res[2]["reason"]


def test_reference_errors_name_the_problem(tmp_path: Path) -> None:
    ref = ScaleReference(segments=[Segment(image="a.jpg", a=(0, 0), b=(100, 0), length_m=1.0)])
    with pytest.raises(ScaleReferenceError, match=r"'a\.jpg'"):
        check_reference(ref, {"b.jpg"})
    # A zero length is refused when a Segment is made; check_reference still refuses one built
    # without validation.
    zero = ScaleReference(segments=[Segment.model_construct(image="a.jpg", a=(0, 0), b=(100, 0), length_m=0.0)])
    with pytest.raises(ScaleReferenceError, match="positive length_m"):
        check_reference(zero, {"a.jpg"})
    # Clicks outside the photo are refused before SfM runs (they failed after it).
    check_reference(ref, {"a.jpg"}, {"a.jpg": (100, 80)})
    off = ScaleReference(segments=[Segment(image="a.jpg", a=(10, 10), b=(130, 10), length_m=1.0)])
    with pytest.raises(ScaleReferenceError, match=r"point b \[130.0, 10.0\] lies outside its photo \(100 x 80"):
        check_reference(off, {"a.jpg"}, {"a.jpg": (100, 80)})
    (tmp_path / "r.json").write_text('{"segments": [{"image": "a.jpg", "a": [0, 0]}]}')
    with pytest.raises(ScaleReferenceError, match="invalid"):
        load_reference(tmp_path / "r.json")


def test_measure_falls_back_to_the_dense_surface_where_sparse_points_are_missing(tmp_path: Path) -> None:
    """A wall patch with no sparse points around the endpoint: the plane fit cannot answer, the ray
    cast at the dense surface can, and exactly (the surface here is the true wall and ground)."""
    import open3d as o3d

    sc = make_scene(scale=1.0)
    A, B = np.array([-2.5, 5.0, 1.5]), np.array([2.5, 5.0, 2.2])
    # Points in the model frame near A (in truth: within 1.2 m) are removed from the sparse model.
    A_m = sc.to_model(A[None])[0]
    gone = [pid for pid, p in sc.rec.points3D.items() if np.linalg.norm(p.xyz - A_m) < 1.2]
    assert gone
    for pid in gone:
        sc.rec.delete_point3D(pid)
    # The dense surface, in the model frame: the ground and the wall as two fine grids.
    verts, tris = [], []
    for corners in (
        [(-6, -2, 0), (6, -2, 0), (6, 5, 0), (-6, 5, 0)],
        [(-6, 5, 0), (6, 5, 0), (6, 5, 3.5), (-6, 5, 3.5)],
    ):
        c = np.array(corners, float)
        n = 40
        uu, vv = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
        P = c[0] + uu[..., None] * (c[1] - c[0]) + vv[..., None] * (c[3] - c[0])
        base = sum(len(v) for v in verts)
        verts.append(sc.to_model(P.reshape(-1, 3)))
        for i in range(n - 1):
            for j in range(n - 1):
                k = base + i * n + j
                tris += [[k, k + 1, k + n], [k + 1, k + n + 1, k + n]]
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.vstack(verts)), o3d.utility.Vector3iVector(np.array(tris))
    )
    site = Site(tmp_path, sc.rec, {"scale_sigma_rel": 0.002})
    seg = [Segment(image="0004.jpg", a=sc.pixel(4, A), b=sc.pixel(4, B))]
    # Without a surface: no answer, with the reason.
    assert measure(site, seg)[0]["length_m"] is None
    o3d.io.write_triangle_mesh(str(tmp_path / "surface.ply"), mesh)
    res = measure(site, seg)[0]
    assert res["lifted_on"] == {"a": "surface", "b": "plane"}
    assert res["length_m"] == pytest.approx(float(np.linalg.norm(A - B)), abs=2e-3)
    assert 0 < res["sigma_parts_m"]["endpoints"] < 0.05
