"""report.html as the designer's client gets it: saved alone, opened from file:// with the network
off in headless Chromium, every image shows; the client page comes first, the annex is collapsed,
photos are numbered and never named."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconstruct.plan import plan
from reconstruct.report import plan_report, write_report_html
from tests.browser import assert_viewer_loaded, open_page
from tests.conftest import SAMPLE
from tests.reconstruct.synthetic import H, W, make_scene, write_run_dir

GATE = SAMPLE / "design" / "gate.json"

CHECK_IMAGES = """<script>window.addEventListener('load',()=>{const im=[...document.images];
const bad=im.filter(i=>!(i.complete&&i.naturalWidth>0));
console.log('images '+im.length+' broken '+bad.length);
console.log('annex open '+document.querySelector('details.annex').open);});</script></body>"""


@pytest.fixture()
def planned(tmp_path: Path) -> Path:
    sc = make_scene(scale=0.6)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(40, 200, (H, W, 3), dtype=np.uint8)).save(images / f"{k:04d}.jpg")
    write_run_dir(sc, tmp_path / "run", images)
    A, B = np.array([-1.8, 1.0, 0.0]), np.array([1.8, 1.0, 0.0])
    (tmp_path / "placement.json").write_text(
        json.dumps({"image": "0002.jpg", "ground_points": [list(sc.pixel(2, A)), list(sc.pixel(2, B))]})
    )
    out = tmp_path / "plan"
    res = plan(tmp_path / "run", GATE, tmp_path / "placement.json", out)
    info = json.loads((tmp_path / "run" / "site.json").read_text())
    info["unregistered_images"] = ["client-street_car.jpg"]
    write_report_html(plan_report(info, res), out / "report.html", published=[], company="Atelier Nord")
    return out


@pytest.mark.slow
def test_report_saved_alone_shows_every_image_offline(planned: Path, tmp_path: Path) -> None:
    html = (planned / "report.html").read_text(encoding="utf-8")
    # The client page first: company and date, the montages, the plan, the key dimensions.
    body = html[html.index("<body>") :]
    order = [body.index(s) for s in ("Atelier Nord", "Photo 3", "Plan (top view)", "Key dimensions", "annex")]
    assert order == sorted(order)
    assert re.search(r"clear opening between posts</td><td class='num'>3\.260 m</td><td>as designed", html)
    assert re.search(r"opening on site</td><td class='num'>3\.600 m</td><td>± 0\.0\d\d m", html)
    # Numbered, never named; the technical part is in a collapsed <details>.
    assert "0002.jpg" not in html and "street_car" not in html and "photo 6 (" in html
    assert "<details class='annex'>" in html and "<details class='annex' open" not in html
    assert html.index("photos not placed") > html.index("<details class='annex'>")
    assert "src='montage_" not in html and "src='plan.svg'" not in html and "<script src=" not in html
    # Saved alone in an empty folder, opened from file:// with the network off.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "report.html").write_text(html.replace("</body>", CHECK_IMAGES), encoding="utf-8")
    console, tail = open_page(alone / "report.html", tmp_path, shot=tmp_path / "report.png")
    n_images = 2 + len(list(planned.glob("montage_*.jpg")))  # montages, plan and elevation
    assert any(f"images {n_images} broken 0" in ln for ln in console), (console, tail)
    assert any("annex open false" in ln for ln in console), console
    assert_viewer_loaded(console, tail)
    shutil.rmtree(alone)
