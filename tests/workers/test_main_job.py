"""The main job end to end, as `make demo` runs it, and its refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import assert_viewer_loaded, open_page
from tests.conftest import ROOT, SAMPLE, SHARED

SITEPLAN = [sys.executable, "-m", "cli.main"]


def run_cli(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SITEPLAN_DATA_DIR=str(tmp / "state"))
    return subprocess.run([*SITEPLAN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = run_cli(["demo", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[1/4] anonymise" in res.stdout and "stage times" in res.stdout
    for f in (
        "model/cameras.txt",
        "model/images.txt",
        "model/points3D.txt",
        "site.json",
        "plan.glb",
        "plan.svg",
        "plan.dxf",
        "montage_0000.jpg",
        "report.json",
        "report.html",
        "photos/report.json",
    ):
        assert (out / f).is_file(), f
    # Metric accuracy against the fountain's ground-truth cameras (centres in metres).
    ev = subprocess.run(
        [
            sys.executable,
            str(SHARED / "tools" / "eval_site.py"),
            str(SHARED / "data" / "sfm" / "strecha-fountain-P11"),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    score = json.loads(ev.stdout)
    assert score["registered"] == 11
    assert score["metric_centre_err_m"]["mean"] < 0.05, score
    # The privacy gate was at work: faces and the labelled plate blurred, nothing kept but focal length.
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["faces_blurred"] >= 4
    photos = {e["input"]: e for e in json.loads((out / "photos" / "report.json").read_text())["files"]}
    x, y, w, h = (float(v) for v in (SHARED / "data" / "plates" / "eu" / "eu1.txt").read_text().split()[1:5])
    assert any(
        px <= x + w / 2 <= px + pw and py <= y + h / 2 <= py + ph
        for px, py, pw, ph in photos["street_car.jpg"]["plates"]
    ), photos["street_car.jpg"]["plates"]
    assert "ICC" in photos["street_people.jpg"]["removed"]
    for p in (out / "photos").glob("*.jpg"):
        exif = Image.open(p).getexif()
        assert set(exif) <= {0x0112, 0x8769}, p.name
    # The report shows the montages and the drawings.
    html = (out / "report.html").read_text()
    n_montages = len(list(out.glob("montage_*.jpg")))
    assert html.count("src='data:image/jpeg;base64,") == n_montages > 0 and "src='data:image/svg+xml" in html
    # The report's 3D viewer loads plan.glb in a real browser, offline, with no console error.
    shot = tmp_path / "report.png"
    assert_viewer_loaded(*open_page(out / "report.html", tmp_path, shot=shot))
    assert shot.is_file()
    # The montage differs from the anonymised photo where the design stands, and only there-ish.
    m = np.asarray(Image.open(out / "montage_0000.jpg").convert("L"), float)
    a = np.asarray(Image.open(out / "photos" / "0000.jpg").convert("L"), float)
    changed = np.abs(m - a) > 25
    assert 0.02 < changed.mean() < 0.4
    # The job is recorded as done in the embedded database.
    db = sqlite3.connect(tmp_path / "state" / "siteplan.db")
    assert db.execute("select state, stage from jobs").fetchall() == [("done", "done")]
    # Ray's scratch under the data dir is gone after the run.
    assert not (tmp_path / "state" / "ray").exists()
    # The demo stored its job like the API does (photos and design in the vault, the inputs on the
    # job row) and ran it through the one driver from there (workers/demo.py -> run_project_job),
    # so a batch at a new pipeline version selects it. The batch running such a project to done
    # is tests/api/test_kill9.py's last step (one full reprocess in the suite, not two).
    res = run_cli(["reprocess", "--pipeline-version", "2099.1", "--dry-run"], tmp_path)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"to_process": 1, "skipped": {}, "dry_run": True}
    assert db.execute("select count(*) from jobs").fetchone() == (1,), "a dry run queues nothing"
    assert not list((tmp_path / "state" / "scratch").glob("*/photos")), "decrypted photos left in scratch"


def _mini_sample(tmp: Path, photos: list[str], ref: dict[str, object] | None = None) -> Path:
    s = tmp / "sample"
    (s / "photos").mkdir(parents=True)
    for n in photos:
        shutil.copy(SAMPLE / "photos" / n, s / "photos" / n)
    shutil.copytree(SAMPLE / "design", s / "design")
    shutil.copy(SAMPLE / "placement.json", s / "placement.json")
    (s / "reference.json").write_text(json.dumps(ref or json.loads((SAMPLE / "reference.json").read_text())))
    return s


def test_reference_on_a_missing_photo_stops_before_compute(tmp_path: Path) -> None:
    ref = {"segments": [{"image": "nope.jpg", "a": [1, 2], "b": [300, 400], "length_m": 2.0}]}
    s = _mini_sample(tmp_path, ["0000.jpg", "0001.jpg", "0002.jpg"], ref)
    res = run_cli(["demo", "--sample", str(s), "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert res.returncode == 2
    assert "'nope.jpg'" in res.stderr
    assert not (tmp_path / "o" / "photos").exists()  # nothing was computed


def test_zero_length_reference_is_refused(tmp_path: Path) -> None:
    ref = {"segments": [{"image": "0000.jpg", "a": [1, 2], "b": [300, 400], "length_m": 0}]}
    s = _mini_sample(tmp_path, ["0000.jpg", "0001.jpg", "0002.jpg"], ref)
    res = run_cli(["demo", "--sample", str(s), "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert res.returncode == 2 and "positive length_m" in res.stderr


@pytest.mark.slow
def test_too_few_usable_photos(tmp_path: Path) -> None:
    s = _mini_sample(tmp_path, ["0000.jpg", "0001.jpg"])
    (s / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = run_cli(["demo", "--sample", str(s), "--out", str(tmp_path / "o")], tmp_path, timeout=300)
    assert res.returncode == 2
    assert "only 2 photos could be used" in res.stderr
    entries = json.loads((tmp_path / "o" / "photos" / "report.json").read_text())["files"]
    assert [e["input"] for e in entries if e["error"]] == ["broken.jpg"]
