"""Write-then-rename, written once: a file appears whole under its name, or not at all."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A new file beside ``path`` (owner-only by default, created exclusively under a random
    name), written by the caller, flushed to disk and renamed onto ``path`` when the block ends;
    removed instead if the block raises. The parent folder is made (owner-only) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")  # no suffix: never matches a glob of the real files
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """``data`` into ``path`` with :func:`atomic_file`."""
    with atomic_file(path, mode=mode) as f:
        f.write(data)
