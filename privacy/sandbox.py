"""Untrusted files are parsed in a child process, never in the service's own.

Image decoders are native code (libjpeg-turbo, libheif, libwebp, libtiff, littlecms) fed with
files from strangers. A crafted file that makes one of them crash would take down whatever
process decoded it: the API server and every upload in flight, or a Ray worker, and the photo
would come back after a restart and crash it again. One that makes a decoder loop would hold a
worker for ever. So ``run_isolated`` runs such a function in a short-lived child process, forked
from a server process that has the decoders imported already (multiprocessing's forkserver:
about 10 ms per call, against 100+ ms to decode a 12 MP photo). The child has a CPU-time and an
address-space limit; the parent waits at most ``timeout_s``. A crash, a timeout or an exhausted
limit becomes an :class:`InvalidImage` with a clear message, and the child is gone.

The child sends back a small picklable result and, optionally, one array (the pixels), which
the parent receives straight into its own buffer: one copy, no temporary file, nothing left in
``/dev/shm`` when either side dies.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from privacy.errors import InvalidImage

log = logging.getLogger(__name__)

# The child's function returns (a picklable result, an array or None).
IsolatedFn = Callable[[bytes], tuple[Any, np.ndarray | None]]

_MEMFD = hasattr(os, "memfd_create")  # Linux; elsewhere the pixels come through the pipe
_ctx: Any = None
_ctx_lock = threading.Lock()


def _context() -> Any:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            # Imported once in the fork server; every child starts with them loaded.
            ctx.set_forkserver_preload(["privacy.isolated"])
            _ctx = ctx
        return _ctx


def _limit(memory_bytes: int, cpu_s: int) -> None:
    """``memory_bytes`` of address space beyond what the child holds at start (the interpreter,
    the decoders' libraries: their size differs between machines), and ``cpu_s`` of CPU time."""
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (base + memory_bytes, base + memory_bytes))
    # A hard stop even if the parent is gone: the kernel ends a child past its CPU time.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def _child(conn: Connection, fn: IsolatedFn, memory_bytes: int, cpu_s: int) -> None:
    try:
        data = conn.recv_bytes()
        _limit(memory_bytes, cpu_s)
        try:
            result, array = fn(data)
        except InvalidImage as exc:
            conn.send(("invalid", exc.code, str(exc)))
            return
        except MemoryError:
            conn.send(("invalid", "too_large", "decoding the file needs more memory than a photo may use"))
            return
        except Exception as exc:  # a decoder's own error: the type only, never the content
            conn.send(("invalid", "undecodable", f"the file could not be decoded ({type(exc).__name__})"))
            return
        if array is None:
            conn.send(("ok", result, None))
            return
        array = np.ascontiguousarray(array)
        conn.send(("ok", result, (array.shape, array.dtype.str)))
        if not _MEMFD:
            conn.send_bytes(array.data.cast("B"))
            return
        # The parent hands over an anonymous memory file of the right size: the pixels are
        # copied once, into memory the parent keeps, and nothing is ever named on a filesystem.
        fd = reduction.recv_handle(conn)
        try:
            with mmap.mmap(fd, max(1, array.nbytes)) as mm:
                np.frombuffer(mm, array.dtype, array.size).reshape(array.shape)[...] = array
        finally:
            os.close(fd)
        conn.send("done")
    finally:
        conn.close()


def run_isolated(fn: IsolatedFn, data: bytes, *, timeout_s: float, memory_bytes: int) -> tuple[Any, np.ndarray | None]:
    """``fn(data)`` in a child process, with ``memory_bytes`` of address space to spare. ``fn``
    must be picklable by reference: a module-level function, or a ``functools.partial`` of one.
    Raises :class:`InvalidImage` on a crash, a timeout or an exhausted limit."""
    ctx = _context()
    ours, theirs = ctx.Pipe()
    cpu_s = max(1, int(timeout_s) + 5)
    proc = ctx.Process(target=_child, args=(theirs, fn, memory_bytes, cpu_s), daemon=True)
    deadline = time.monotonic() + timeout_s
    try:
        proc.start()
        theirs.close()
        ours.send_bytes(data)
        msg = _receive(ours, proc, deadline, lambda: ours.recv())
        if msg[0] == "invalid":
            raise InvalidImage(msg[1], msg[2])
        _, result, meta = msg
        if meta is None:
            return result, None
        shape, dtype = meta
        dt = np.dtype(dtype)
        size = int(np.prod(shape))
        if not _MEMFD:  # through the pipe: ~4x slower for a 12 MP photo, but anywhere
            out = np.empty(shape, dt)
            _receive(ours, proc, deadline, lambda: ours.recv_bytes_into(out.data.cast("B")))
            return result, out
        fd = os.memfd_create("siteplan-pixels", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(1, size * dt.itemsize))
            reduction.send_handle(ours, fd, proc.pid)
            _receive(ours, proc, deadline, ours.recv)
            mm = mmap.mmap(fd, max(1, size * dt.itemsize))
        finally:
            os.close(fd)
        # The array owns the mapping: its memory goes when the array does.
        return result, np.frombuffer(mm, dt, size).reshape(shape)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        raise _crashed(proc) from None
    finally:
        ours.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        proc.close()


def _receive(conn: Connection, proc: Any, deadline: float, read: Callable[[], Any]) -> Any:
    """Wait for the child's next message (or its end) until the deadline, then read it."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise InvalidImage("decode_timeout", "the file took too long to decode; it may be damaged or hostile")
        ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=left)
        if conn in ready:  # data, or the child's end of the pipe closed (EOFError when read)
            return read()
        if ready:  # the child ended without a word
            raise _crashed(proc)


def _crashed(proc: Any) -> InvalidImage:
    proc.join(5)
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            why = signal.Signals(-code).name
        except ValueError:
            why = f"signal {-code}"
    else:
        why = f"exit status {code}"
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return InvalidImage("decode_timeout", "the file took too long to decode; it may be damaged or hostile")
    log.warning("an image decoder died (%s); the file was refused", why)
    return InvalidImage("decoder_crashed", f"the file crashed the image decoder ({why}); it is damaged or hostile")
