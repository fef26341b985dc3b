"""Untrusted files are decoded in a sandbox child: a decoder that crashes, hangs or runs away
with memory costs that child and a clear error, never the calling process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import privacy.anonymize as gate
from privacy.anonymize import AnonymizationPolicy, anonymize_dir, anonymize_file
from privacy.errors import InvalidImage
from privacy.isolated import read_source, read_untrusted, untrusted_size
from privacy.sandbox import run_isolated

# What a broken native decoder does, run in the child (module-level: passed by name).


def _segfault(data: bytes) -> tuple[None, None]:
    os.kill(os.getpid(), signal.SIGSEGV)
    return None, None


def _spin(data: bytes) -> tuple[None, None]:
    while True:
        pass


def _hog(data: bytes) -> tuple[int, None]:
    return len(bytearray(64 * 2**30)), None


def _echo(data: bytes) -> tuple[int, np.ndarray]:
    return len(data), np.frombuffer(data, np.uint8).reshape(-1, 4).copy()


def _descendants() -> set[int]:
    """Every live process below this one (the sandbox's children are the fork server's), but
    multiprocessing's fork server and resource tracker, which outlive the calls by design."""
    parent: dict[int, int] = {}
    server: set[int] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = pp = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if pp == os.getpid() and (b"forkserver import main" in cmd or b"resource_tracker import" in cmd):
                server.add(int(d.name))
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found - server


def test_results_and_arrays_come_back_whole() -> None:
    data = bytes(range(256)) * 4096
    n, arr = run_isolated(_echo, data, timeout_s=30, memory_bytes=2**30)
    assert n == len(data)
    assert arr is not None and arr.shape == (len(data) // 4, 4) and arr.tobytes() == data
    assert arr.flags.writeable  # the gate redacts in place


@pytest.mark.parametrize(
    ("fn", "code", "limit_s"),
    [(_segfault, "decoder_crashed", 5.0), (_spin, "decode_timeout", 6.0), (_hog, "too_large", 5.0)],
)
def test_a_broken_decoder_costs_its_child_only(fn: object, code: str, limit_s: float) -> None:
    before = _descendants()
    t0 = time.monotonic()
    with pytest.raises(InvalidImage) as err:
        run_isolated(fn, b"not an image", timeout_s=2.0, memory_bytes=2**30)  # type: ignore[arg-type]
    assert err.value.code == code
    assert time.monotonic() - t0 < limit_s
    assert "not an image" not in str(err.value)  # the message names the problem, never the content
    assert _descendants() <= before  # the child is gone, not left running or as a zombie
    # ... and the sandbox still works afterwards
    assert run_isolated(_echo, b"abcd", timeout_s=30, memory_bytes=2**30)[0] == 4


def test_sandboxed_decode_equals_in_process_decode(data: Path) -> None:
    """Same pixels, same facts, for every kind of real camera file the shared data holds."""
    files = [p for p in sorted((data / "exif").rglob("*")) if p.suffix.lower() in {".jpg", ".heic", ".tif", ".png"}]
    checked = 0
    for p in files[:: max(1, len(files) // 12)]:
        raw = p.read_bytes()
        try:
            facts, rgb = read_source(raw, 120_000_000)
        except InvalidImage as exc:
            with pytest.raises(InvalidImage) as err:
                read_untrusted(raw, max_pixels=120_000_000, timeout_s=60)
            assert err.value.code == exc.code
            continue
        facts2, rgb2 = read_untrusted(raw, max_pixels=120_000_000, timeout_s=60)
        assert facts2 == facts
        assert rgb2.shape == rgb.shape and np.array_equal(rgb2, rgb)
        assert untrusted_size(raw[: 4 * 2**20]) in (facts.original_size, None)
        checked += 1
    assert checked >= 8


def test_only_native_header_parsers_run_in_the_sandbox(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG's size is read by Pillow's Python parser in process (an upload must not pay a
    sandbox child for it); a HEIC's and a WebP's go through libheif / libwebp: sandboxed."""
    import privacy.isolated as iso

    calls: list[int] = []

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        return run_isolated(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(iso, "run_isolated", counting)
    jpeg = (data / "sfm" / "strecha-fountain-P11" / "images" / "0000.jpg").read_bytes()[: 256 * 1024]
    assert untrusted_size(jpeg) == (3072, 2048) and calls == []
    for name in ("exif-samples/heic/IMG_5195.HEIC", "exiftool-t-images/RIFF.webp"):
        raw = (data / "exif" / name).read_bytes()
        size = untrusted_size(raw[: 256 * 1024])
        assert size is not None and size == read_source(raw, 120_000_000)[0].original_size
    assert len(calls) == 2
    # A header whose parser fails says nothing (decoding proper gives the reason), in either path.
    assert untrusted_size(b"\xff\xd8\xff\xe0" + b"\0" * 100) is None
    assert untrusted_size(b"RIFF\0\0\0\0WEBPVP8 " + b"\xff" * 100) is None
    assert untrusted_size(b"no image at all") is None


def test_a_hostile_file_gets_a_report_entry_and_the_batch_goes_on(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real gate over a folder, with one file's decoder crashing (in a real child) and one
    file too slow: both are refused with a clear error, no output file, the others are done."""
    src = tmp_path / "in"
    src.mkdir()
    photos = sorted((data / "sfm" / "strecha-fountain-P11" / "images").glob("*.jpg"))[:3]
    for i, p in enumerate(photos):
        (src / f"{i}.jpg").write_bytes(p.read_bytes())
    (src / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 crash me")
    real = gate.read_untrusted

    def reader(data: bytes, *, max_pixels: int, timeout_s: float) -> object:
        if b"crash me" in data:
            return run_isolated(_segfault, data, timeout_s=timeout_s, memory_bytes=2**30)
        return real(data, max_pixels=max_pixels, timeout_s=timeout_s)

    monkeypatch.setattr(gate, "read_untrusted", reader)
    out = tmp_path / "out"
    entries = {e["input"]: e for e in anonymize_dir(src, out, workers=2)}
    assert "[decoder_crashed]" in entries["3.jpg"]["error"]
    assert not (out / "3.jpg").exists()
    for i in range(3):
        assert entries[f"{i}.jpg"]["error"] is None and (out / f"{i}.jpg").exists()
    slow = anonymize_file(src / "0.jpg", tmp_path / "slow", AnonymizationPolicy(decode_timeout_s=0.005))
    assert slow["error"] is not None and "[decode_timeout]" in slow["error"]
    assert not (tmp_path / "slow" / "0.jpg").exists()
    assert sorted(os.listdir(out)) == ["0.jpg", "1.jpg", "2.jpg", "report.json"]


def _stubborn(data: bytes) -> tuple[None, None]:
    """Blocks the alarm and sleeps (no CPU time): only the server's backstop can end it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)
    return None, None


def test_a_child_that_blocks_its_alarm_is_killed_by_the_server() -> None:
    before = _descendants()
    t0 = time.monotonic()
    with pytest.raises(InvalidImage) as err:
        run_isolated(_stubborn, b"x", timeout_s=1.0, memory_bytes=2**30)
    assert err.value.code == "decode_timeout"
    assert time.monotonic() - t0 < 12
    deadline = time.monotonic() + 10
    while not _descendants() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _descendants() <= before


def test_a_dead_sandbox_is_our_failure_not_the_files() -> None:
    """The server killed mid-call: an error that refuses nothing (ingest would delete a refused
    photo's original); the next call starts a new server."""
    import threading

    from privacy import sandbox

    got: list[BaseException] = []

    def call() -> None:
        try:
            run_isolated(_spin, b"x", timeout_s=5.0, memory_bytes=2**30)
        except BaseException as exc:
            got.append(exc)

    th = threading.Thread(target=call)
    th.start()
    time.sleep(1.0)
    proc = sandbox._server.proc
    assert proc is not None
    proc.kill()
    th.join(20)
    assert got and isinstance(got[0], sandbox.SandboxUnavailable) and not isinstance(got[0], InvalidImage)
    assert run_isolated(_echo, b"abcd", timeout_s=30, memory_bytes=2**30)[0] == 4
