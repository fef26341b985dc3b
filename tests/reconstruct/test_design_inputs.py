"""Design import in every format COVER exports, and the bad inputs the issue lists: each is
loaded with the right size in metres, or refused with a message that says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from reconstruct.design import MAX_TRIANGLES, load_design
from reconstruct.errors import DesignError, PlacementError
from reconstruct.plan import plan
from tests.reconstruct.test_plan import GATE, site_dir  # noqa: F401 - the fixture

GATE_MM = (3500.0, 100.0, 1600.0)


def write_design(d: Path, fmt: str, mesh: trimesh.Trimesh, **descriptor: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    data = mesh.export(file_type=fmt)
    (d / f"gate.{fmt}").write_bytes(data.encode() if isinstance(data, str) else data)
    desc = {"name": "gate", "file": f"gate.{fmt}", **descriptor}
    (d / "gate.json").write_text(json.dumps(desc))
    return d / "gate.json"


def gate_box() -> trimesh.Trimesh:
    b = trimesh.creation.box(extents=GATE_MM)
    b.apply_translation((0, 0, GATE_MM[2] / 2))  # standing on z = 0
    return b


@pytest.mark.parametrize("fmt", ["glb", "obj", "stl", "ply", "dae"])
def test_every_format_loads_in_metres(tmp_path: Path, fmt: str) -> None:
    up = "+Y" if fmt == "glb" else "+Z"
    mesh = gate_box()
    if fmt == "glb":  # glTF is +Y up: turn the Z-up box so the descriptor's +Y up is right
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, (1, 0, 0)))
    design = load_design(write_design(tmp_path, fmt, mesh, units="mm", up=up, front="-Y" if up == "+Z" else "+Z"))
    v = np.vstack([p.vertices for p in design.parts])
    ext = v.max(0) - v.min(0)
    assert np.allclose(sorted(ext), sorted(np.array(GATE_MM) / 1000), atol=1e-3), (fmt, ext)
    assert v[:, 2].min() == pytest.approx(0.0, abs=1e-3) and ext[2] == pytest.approx(1.6, abs=1e-3)


def test_units_guessed_with_a_warning(tmp_path: Path) -> None:
    design = load_design(write_design(tmp_path, "stl", gate_box()))
    assert any("units not declared" in w for w in design.warnings)
    v = np.vstack([p.vertices for p in design.parts])
    assert (v.max(0) - v.min(0)).max() == pytest.approx(3.5, abs=1e-3)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "cannot be read|holds no"),
        ("nan", "non-finite"),
        ("huge", "expected 0.05-100 m"),
        ("tiny", "expected 0.05-100 m"),
        ("outside", "outside its folder"),
        ("url", "outside its folder|cannot be read"),
        ("missing_file", "does not exist"),
    ],
)
def test_bad_designs_are_refused_with_a_reason(tmp_path: Path, case: str, message: str) -> None:
    import re

    d = tmp_path / "design"
    if case == "empty":
        d.mkdir()
        (d / "gate.stl").write_bytes(b"")
        (d / "gate.json").write_text(json.dumps({"file": "gate.stl", "units": "mm"}))
        path = d / "gate.json"
    elif case == "nan":
        m = gate_box()
        v = m.vertices.copy()
        v[0, 0] = np.nan
        path = write_design(d, "ply", trimesh.Trimesh(v, m.faces, process=False), units="mm")
    elif case == "huge":
        path = write_design(d, "stl", gate_box(), units="m")  # 3.5 km
    elif case == "tiny":
        path = write_design(d, "stl", trimesh.creation.box(extents=(3.5, 0.1, 1.6)), units="mm")  # 3.5 mm
    elif case in ("outside", "url"):
        d.mkdir()
        ref = "./sub/../../secret.mtl" if case == "outside" else "http://example.com/x.mtl"
        (d / "gate.obj").write_text(f"mtllib {ref}\nv 0 0 0\nv 3500 0 0\nv 0 0 1600\nf 1 2 3\n")
        (d / "gate.json").write_text(json.dumps({"file": "gate.obj", "units": "mm"}))
        path = d / "gate.json"
    else:
        d.mkdir()
        (d / "gate.json").write_text(json.dumps({"file": "nope.glb", "units": "mm"}))
        path = d / "gate.json"
    with pytest.raises(DesignError) as exc:
        load_design(path)
    assert re.search(message, str(exc.value)), str(exc.value)


def test_a_mesh_over_the_triangle_limit_is_refused_saying_so(tmp_path: Path) -> None:
    n = MAX_TRIANGLES + 10
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 3500, (n + 2, 3)).astype(np.float32)
    f = np.stack([np.arange(n), np.arange(n) + 1, np.arange(n) + 2], axis=1)
    path = write_design(tmp_path, "ply", trimesh.Trimesh(v, f, process=False), units="mm")
    with pytest.raises(DesignError, match=f"limit is {MAX_TRIANGLES}"):
        load_design(path)


def test_a_design_wider_than_the_opening_warns_and_still_renders(site_dir, tmp_path: Path) -> None:  # noqa: F811
    root, _ = site_dir
    wide = write_design(tmp_path / "wide", "stl", trimesh.creation.box(extents=(5000, 100, 1600)), units="mm")
    res = plan(root / "run", wide, root / "placement.json", root / "out")
    assert any("wider than the opening" in w for w in res["placement"]["warnings"])
    assert any("file" in m for m in res["montages"])


def test_photos_that_do_not_see_the_design_get_no_montage_and_a_reason(site_dir) -> None:  # noqa: F811
    root, _ = site_dir
    # Put the design far off to one side: some cameras cannot see it.
    (root / "far.json").write_text(json.dumps({"site": {"position": [40.0, -30.0], "rotation_deg": 0}}))
    res = plan(root / "run", GATE, root / "far.json", root / "out")
    unseen = [m for m in res["montages"] if "file" not in m]
    assert unseen and all(m.get("skipped") for m in unseen)
    for m in unseen:
        assert not (root / "out" / f"montage_{m['image']}").exists()


def test_a_placement_point_outside_the_photo_is_refused(site_dir) -> None:  # noqa: F811
    root, _ = site_dir
    (root / "out.json").write_text(json.dumps({"image": "0002.jpg", "ground_points": [[-500, 10], [99999, 20]]}))
    with pytest.raises(PlacementError):
        plan(root / "run", GATE, root / "out.json", root / "out")


def test_obj_with_mtl_and_texture_keeps_its_texture_in_the_plan(site_dir, tmp_path: Path) -> None:  # noqa: F811
    """An OBJ + MTL + texture: the montage uses the texture's colour, plan.glb carries the texture."""
    from PIL import Image

    d = tmp_path / "textured"
    d.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "red.png")  # a red gate
    (d / "gate.mtl").write_text("newmtl paint\nKd 1 1 1\nmap_Kd red.png\n")
    box = trimesh.creation.box(extents=GATE_MM)
    box.apply_translation((0, 0, GATE_MM[2] / 2))
    lines = ["mtllib gate.mtl", "usemtl paint"]
    lines += [f"v {x} {y} {z}" for x, y, z in box.vertices]
    lines += [f"vt {u} {v}" for u, v in np.random.default_rng(0).uniform(0, 1, (len(box.vertices), 2))]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in box.faces]
    (d / "gate.obj").write_text("\n".join(lines) + "\n")
    (d / "gate.json").write_text(json.dumps({"file": "gate.obj", "units": "mm", "up": "+Z", "front": "-Y"}))
    design = load_design(d / "gate.json")
    r, g, b, _ = design.parts[0].color
    assert r > 0.6 and g < 0.25 and b < 0.25, design.parts[0].color
    assert design.parts[0].texture is not None
    root, _ = site_dir
    plan(root / "run", d / "gate.json", root / "placement.json", root / "out")
    scene = trimesh.load(root / "out" / "plan.glb", force="scene")
    mats = [g.visual.material for n, g in scene.geometry.items() if n.startswith("design")]
    assert any(getattr(m, "baseColorTexture", None) is not None for m in mats)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_the_stage_files_are_refused_naming_the_file(tmp_path: Path, number: str) -> None:
    """Python's json reads NaN, Infinity and 1e400 (as inf): a NaN placement ran a plan into NaN
    drawings. Every file the stage CLIs read refuses them with the file's name."""
    from reconstruct.errors import PlacementError, ScaleReferenceError
    from reconstruct.placement import load_placement
    from reconstruct.reference import load_reference, load_segments

    (tmp_path / "placement.json").write_text(f'{{"image": "a.jpg", "ground_points": [[{number}, 1], [2, 3]]}}')
    with pytest.raises(PlacementError, match=r"placement\.json is invalid"):
        load_placement(tmp_path / "placement.json")
    seg = f'{{"segments": [{{"image": "a.jpg", "a": [0, 0], "b": [100, 0], "length_m": {number}}}]}}'
    (tmp_path / "ref.json").write_text(seg)
    with pytest.raises(ScaleReferenceError, match=r"ref\.json is invalid"):
        load_reference(tmp_path / "ref.json")
    (tmp_path / "seg.json").write_text(seg.replace('"length_m"', '"x"').replace('"a": [0, 0]', f'"a": [{number}, 0]'))
    with pytest.raises(ValueError, match=r"seg\.json is invalid"):
        load_segments(tmp_path / "seg.json")
