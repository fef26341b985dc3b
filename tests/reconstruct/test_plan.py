"""The merge on a synthetic site: drawings parsed back, montage pixels where the camera says."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import ezdxf
import numpy as np
import pytest
from PIL import Image

from reconstruct.design import load_design
from reconstruct.errors import PlacementError
from reconstruct.geometry import views
from reconstruct.placement import load_placement, resolve
from reconstruct.plan import placed_meshes, plan
from reconstruct.render import Mesh, montage
from tests.conftest import SAMPLE
from tests.reconstruct.synthetic import H, W, make_scene, write_run_dir

GATE = SAMPLE / "design" / "gate.json"
PHOTO = (60, 170, 60)  # a green photo: no design colour is near it


@pytest.fixture()
def site_dir(tmp_path: Path) -> tuple[Path, object]:
    sc = make_scene(scale=0.6)
    images = tmp_path / "images"
    images.mkdir()
    for k in range(5):
        Image.new("RGB", (W, H), PHOTO).save(images / f"{k:04d}.jpg", quality=95)
    run = tmp_path / "run"
    write_run_dir(sc, run, images)
    A, B = np.array([-1.8, 1.0, 0.0]), np.array([1.8, 1.0, 0.0])
    (tmp_path / "placement.json").write_text(
        json.dumps({"image": "0002.jpg", "ground_points": [list(sc.pixel(2, A)), list(sc.pixel(2, B))]})
    )
    return tmp_path, sc


def svg_dims(path: Path) -> dict[str, float]:
    root = ET.parse(path).getroot()
    return {
        t.get("data-label"): float(t.get("data-value-m"))
        for t in root.iter("{http://www.w3.org/2000/svg}text")
        if t.get("class") == "dim"
    }


def test_plan_outputs_carry_the_placed_dimensions(site_dir: tuple[Path, object]) -> None:
    tmp, _ = site_dir
    out = tmp / "plan"
    res = plan(tmp / "run", GATE, tmp / "placement.json", out)
    for f in ("plan.glb", "plan.svg", "plan.dxf", "elevation.svg", "plan.json"):
        assert (out / f).is_file(), f
    assert res["placement"]["opening_m"] == pytest.approx(3.6, abs=1e-3)
    assert res["placement"]["position_m"][:2] == pytest.approx([0.0, 1.0], abs=1e-3)
    dims = svg_dims(out / "plan.svg")
    assert dims["overall width"] == pytest.approx(3.5, abs=1e-3)
    assert dims["opening on site"] == pytest.approx(3.6, abs=1e-3)
    assert dims["clear opening between posts"] == pytest.approx(3.26, abs=1e-3)
    # The only wall stands behind the gate, parallel to it: no post-to-wall along its axis.
    assert not [k for k in dims if k.startswith("post to")]
    assert {d["key"] for d in res["dimensions"]} >= {"overall_width", "clear_opening", "height", "ground_fall"}
    root = ET.parse(out / "plan.svg").getroot()
    assert any("Scale 1:" in (t.text or "") for t in root.iter("{http://www.w3.org/2000/svg}text"))
    ed = svg_dims(out / "elevation.svg")
    assert ed["overall width"] == pytest.approx(3.5, abs=1e-3)
    assert ed["height"] == pytest.approx(1.75, abs=1e-3)
    doc = ezdxf.readfile(out / "plan.dxf")
    measured = sorted(round(d.get_measurement(), 3) for d in doc.modelspace().query("DIMENSION"))
    assert 3.5 in measured and 3.6 in measured and 3.26 in measured


def test_montage_has_the_design_where_the_camera_sees_it(site_dir: tuple[Path, object]) -> None:
    tmp, _sc = site_dir
    out = tmp / "plan"
    res = plan(tmp / "run", GATE, tmp / "placement.json", out)
    made = {m["image"]: m for m in res["montages"]}
    assert all("file" in m for m in made.values()), made
    from reconstruct.site import load_site

    site = load_site(tmp / "run")
    v = views(site.reconstruction)["0002.jpg"]
    img = np.asarray(Image.open(out / "montage_0002.jpg").convert("RGB")).astype(int)
    # Centre of each post's front face (y = 1 - 0.06, facing the camera) at mid height.
    for x in (-1.69, 1.69):
        uv, _z = v.project(np.array([[x, 0.94, 0.9]]))
        u, w = int(uv[0, 0]), int(uv[0, 1])
        patch = img[w - 2 : w + 3, u - 2 : u + 3]
        assert np.abs(patch - PHOTO).mean() > 40, f"no design pixels at post x={x}"
        assert np.ptp(patch.mean(axis=(0, 1))) < 20  # grey-ish: the post's paint, not the photo
    # Far from the design, the photo is untouched (up to JPEG noise).
    assert np.abs(img[:40, :40] - PHOTO).mean() < 3


def test_plan_finds_the_photos_from_the_run_folder(
    site_dir: tuple[Path, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reconstruct` records images_dir relative to the run folder: every montage is still drawn
    when plan runs from another working directory (it used to look there, and skip them all)."""
    tmp, _ = site_dir
    info = json.loads((tmp / "run" / "site.json").read_text())
    info["images_dir"] = "../images"
    (tmp / "run" / "site.json").write_text(json.dumps(info))
    (tmp / "elsewhere" / "images").mkdir(parents=True)  # "../images" from the working directory: empty
    (tmp / "elsewhere" / "cwd").mkdir()
    monkeypatch.chdir(tmp / "elsewhere" / "cwd")
    res = plan(tmp / "run", GATE, tmp / "placement.json", tmp / "plan")
    assert sorted(m["image"] for m in res["montages"] if "file" in m) == [f"{k:04d}.jpg" for k in range(5)]


def test_site_surfaces_in_front_occlude_the_design(site_dir: tuple[Path, object]) -> None:
    tmp, _sc = site_dir
    from reconstruct.site import load_site

    site = load_site(tmp / "run")
    v = views(site.reconstruction)["0002.jpg"]
    design = load_design(GATE)
    spec = load_placement(tmp / "placement.json")
    meshes = placed_meshes(design, resolve(spec, design, views(site.reconstruction)))
    # A 1 m wide, 3 m high panel standing between the camera and the left post.
    x0, x1, y = -2.3, -1.3, 0.5
    wall = Mesh(
        np.array([[x0, y, 0], [x1, y, 0], [x1, y, 3], [x0, y, 3]], float),
        np.array([[0, 1, 2], [0, 2, 3]]),
        (1, 1, 1, 1),
    )
    photo = np.full((H, W, 3), PHOTO, np.uint8)
    img, mask = montage(photo, v, meshes, occluders=[wall], shadow_strength=0.0)
    for x, hidden in ((-1.69, True), (1.69, False)):
        uv, _ = v.project(np.array([[x, 0.94, 0.9]]))
        u, w = int(uv[0, 0]), int(uv[0, 1])
        assert (mask[w, u] < 10) == hidden, f"post at x={x}"
        assert (np.abs(img[w, u].astype(int) - PHOTO).max() < 3) == hidden


def test_placement_off_the_ground_is_refused(site_dir: tuple[Path, object]) -> None:
    tmp, _ = site_dir
    (tmp / "sky.json").write_text(json.dumps({"image": "0000.jpg", "ground_points": [[100, 5], [300, 5]]}))
    with pytest.raises(PlacementError, match="not on the ground"):
        plan(tmp / "run", GATE, tmp / "sky.json", tmp / "plan")


def test_plan_command_writes_every_promised_file(
    site_dir: tuple[Path, object], capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    tmp, _ = site_dir
    out = tmp / "plan"
    assert main(["plan", str(tmp / "run"), "--design", str(GATE), "--placement", str(tmp / "placement.json"),
                 "--out", str(out)]) == 0  # fmt: skip
    # DESIGN.md's fixed interface: plan.glb, plan.svg, plan.dxf, montage_<image>.jpg and report.html.
    for f in ("plan.glb", "plan.svg", "plan.dxf", "report.html"):
        assert (out / f).is_file(), f
    montages = sorted(p.name for p in out.glob("montage_*.jpg"))
    assert montages
    html = (out / "report.html").read_text()
    # Self-contained: every montage, both drawings, the 3D plan and the viewer are embedded.
    assert html.count("src='data:image/jpeg;base64,") == len(montages)
    assert html.count("src='data:image/svg+xml;base64,") == 2
    assert "data:model/gltf-binary;base64," in html and "3.600 m" in html  # the 3D plan and the opening
    assert "<script src=" not in html and html.count("customElements.define") >= 1
    assert "Privacy" not in html  # no privacy gate ran in this command: the page claims none
    # The annex links only what is published (the API serves some files, not the folder).
    from reconstruct.report import plan_report, write_report_html

    res = json.loads((out / "plan.json").read_text())
    write_report_html(plan_report({}, res), out / "r2.html", published=["plan.glb"])
    html2 = (out / "r2.html").read_text()
    assert "href='plan.glb'" in html2 and "href='plan.dxf'" not in html2 and "href='plan.dxf'" in html
    # A file where the output folder should be: a clear error, no traceback.
    (tmp / "taken").write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        main(["plan", str(tmp / "run"), "--design", str(GATE), "--placement", str(tmp / "placement.json"),
              "--out", str(tmp / "taken")])  # fmt: skip
