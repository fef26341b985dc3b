"""A re-run of `reconstruct` into a folder that holds a model: it replaces the model whole, or,
when it fails, leaves the earlier one whole; never a model of one run beside another's facts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import reconstruct.site as site_mod
from reconstruct.dense import DenseConfig
from reconstruct.errors import ReconstructionError
from reconstruct.reference import ScaleReference
from reconstruct.scale import ScaleEstimate
from reconstruct.sfm import SfmResult
from reconstruct.site import load_site, reconstruct
from tests.reconstruct.synthetic import H, W, make_scene, write_run_dir


def _fake_sfm(monkeypatch: pytest.MonkeyPatch, scale: float) -> list[str]:
    """SfM and scale replaced by the synthetic scene's exact answers (the photos are not real)."""
    scene = make_scene(seed=3)
    names = sorted(im.name for im in scene.rec.images.values())

    def run_sfm(*_: Any, **__: Any) -> SfmResult:
        import pycolmap

        return SfmResult(pycolmap.Reconstruction(scene.rec), names, [], {}, {"sfm_s": 0.0})

    monkeypatch.setattr(site_mod, "run_sfm", run_sfm)
    monkeypatch.setattr(site_mod, "estimate_scale", lambda *a, **k: ScaleEstimate(scale, 0.001, "test"))
    monkeypatch.setattr(site_mod, "vertical_from_lines", lambda *a, **k: None)
    return names


def _run(tmp: Path, names: list[str]) -> Any:
    ref = ScaleReference.model_validate(
        {"segments": [{"image": names[0], "a": [100, 100], "b": [400, 100], "length_m": 1.0}]}
    )
    intr = {n: {"width": W, "height": H} for n in names}
    dense, version = DenseConfig(enabled=False), "test"
    return reconstruct(
        tmp / "photos", ref, tmp / "run", intrinsics=intr, names=names, dense=dense, pipeline_version=version
    )


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_failed_rerun_keeps_the_earlier_model_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    write_run_dir(make_scene(seed=1), run)
    (run / "surface.ply").write_bytes(b"ply\nearlier run's surface\n")
    before = _snapshot(run)
    names = _fake_sfm(monkeypatch, 1 / 0.37)

    # Fails after the new model and points were written (site.json cannot be written).
    def no_json(*_: Any) -> None:
        raise ReconstructionError("disk full")

    monkeypatch.setattr(site_mod, "_write_json", no_json)
    with pytest.raises(ReconstructionError):
        _run(tmp_path, names)
    assert _snapshot(run) == before, "a failed re-run changed the earlier run's outputs"
    assert not (run / site_mod.STAGING).exists()
    load_site(run)  # still a complete model

    monkeypatch.undo()
    names = _fake_sfm(monkeypatch, 1 / 0.37)
    site = _run(tmp_path, names)
    info = json.loads((run / "site.json").read_text())
    assert info == site.info and info["pipeline_version"] and info["images_dir"] == "../photos"
    assert _snapshot(run)["model/images.txt"] != before["model/images.txt"]
    # The earlier run's surface belonged to its model: with dense stereo off now, it is gone.
    assert not (run / "surface.ply").exists() and (run / "points.ply").is_file()
    assert not (run / site_mod.STAGING).exists()
    rec = load_site(run).reconstruction
    assert sorted(im.name for im in rec.images.values()) == names


def test_a_run_killed_while_publishing_leaves_no_model_that_loads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run_dir(make_scene(seed=1), run)
    (run / "site.json").unlink()  # _publish retires site.json first and restores it last
    with pytest.raises(ReconstructionError, match="no complete model"):
        load_site(run)
    (run / "site.json").write_text("{not json")
    with pytest.raises(ReconstructionError, match="cannot be read"):
        load_site(run)


def test_an_error_while_publishing_puts_the_earlier_model_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    write_run_dir(make_scene(seed=1), run)
    before = _snapshot(run)
    names = _fake_sfm(monkeypatch, 1 / 0.37)
    real_replace = Path.replace

    def flaky(self: Path, target: Any) -> Path:
        if self.name == "points.ply" and self.parent.name == site_mod.STAGING:
            raise OSError(28, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", flaky)
    with pytest.raises(OSError):
        _run(tmp_path, names)
    monkeypatch.setattr(Path, "replace", real_replace)
    assert _snapshot(run) == before, "the earlier run's outputs were not put back"
    assert not (run / site_mod.STAGING).exists() and not (run / site_mod.PREVIOUS).exists()
    load_site(run)
