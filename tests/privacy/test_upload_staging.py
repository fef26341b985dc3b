"""The encrypted upload staging at byte level: an upload sealed in place on its last request is
published whole; a crash between sealing and publishing resumes from the last full chunk; a
stale tail from an earlier request never blocks the resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataprotection.vault import CHUNK, FileKeyStore, UploadStaging, Vault


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    v = Vault(tmp_path / "objects", FileKeyStore(tmp_path / "keys"))
    v.keys.create("k1")
    return v


def _staging(tmp_path: Path, vault: Vault) -> UploadStaging:
    return UploadStaging(tmp_path / "uploads" / "o1", vault, "k1", "o1")


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 12345])
def test_single_request_sealed_in_place_then_published(tmp_path: Path, vault: Vault, size: int) -> None:
    data = os.urandom(size)
    st = _staging(tmp_path, vault)
    app = st.appender(limit=size)
    app.write_many([data[i : i + 65536] for i in range(0, size, 65536)])
    app.close(last=True)
    assert app.sealed_last and not (st.dir / "tail").exists()
    info = st.publish(app.offset)
    assert info.size == size and vault.read_bytes("k1", "o1") == data
    assert not st.dir.exists()


def test_crash_between_seal_and_publish_resumes_from_the_last_full_chunk(tmp_path: Path, vault: Vault) -> None:
    size = 3 * CHUNK + 777
    data = os.urandom(size)
    st = _staging(tmp_path, vault)
    # Request 1 stops mid-chunk: a tail file holds the remainder.
    st.append([data[: CHUNK + 100]], limit=size)
    assert st.offset() == CHUNK + 100 and (st.dir / "tail").exists()
    # Request 2 brings the rest and seals the last chunk in place; then the server dies.
    app = st.appender(limit=size)
    app.write(data[CHUNK + 100 :])
    app.close(last=True)
    again = _staging(tmp_path, vault)
    assert again.offset() == 3 * CHUNK  # the short final record is dropped, the stale tail gone
    app = again.appender(limit=size)
    app.write(data[3 * CHUNK :])
    app.close(last=True)
    again.publish(app.offset)
    assert vault.read_bytes("k1", "o1") == data


def test_close_last_refuses_an_incomplete_upload(tmp_path: Path, vault: Vault) -> None:
    st = _staging(tmp_path, vault)
    app = st.appender(limit=100)
    app.write(b"x" * 50)
    with pytest.raises(ValueError, match="not whole"):
        app.close(last=True)
    app.close()
    assert st.offset() == 50


def test_a_request_killed_after_new_full_chunks_still_resumes(tmp_path: Path, vault: Vault) -> None:
    """Request 1 leaves a full chunk and a tail; request 2 adds full chunks and the process dies
    before its close(): the stale tail must not poison the upload (it resumes at the last chunk)."""
    size = 4 * CHUNK + 10
    data = os.urandom(size)
    st = _staging(tmp_path, vault)
    st.append([data[: CHUNK + 100]], limit=size)
    app = st.appender(limit=size)
    app.write(data[CHUNK + 100 : 3 * CHUNK + 50])
    app.f.close()  # the process dies: the written chunks reached the file, close() never ran
    again = _staging(tmp_path, vault)
    assert again.offset() == 3 * CHUNK
    app = again.appender(limit=size)
    app.write(data[3 * CHUNK :])
    app.close(last=True)
    again.publish(app.offset)
    assert vault.read_bytes("k1", "o1") == data
