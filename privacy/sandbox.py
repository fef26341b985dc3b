"""Untrusted files are parsed in a child process, never in the service's own.

Image decoders are native code (libjpeg-turbo, libheif, libwebp, libtiff, littlecms) fed with
files from strangers. A crafted file that makes one of them crash would take down whatever
process decoded it: the API server and every upload in flight, or a Ray worker, and the photo
would come back after a restart and crash it again. One that makes a decoder loop would hold a
worker for ever. So ``run_isolated`` runs such a function in a short-lived child process.

The children are forked from a small server process of our own (``python -m privacy.sandbox``,
started on first use, one per calling process) that has imported the decoders and nothing
else: about 10 ms per call against 100+ ms to decode a 12 MP photo. multiprocessing's
forkserver was tried first: its children import the caller's main module, which in a Ray
worker means Ray itself, 0.35-0.6 s per photo.

Each child limits itself: an alarm at ``timeout_s`` (wall time) ends it whatever the decoder
is doing, as does a CPU-time limit; its address space is capped. A crash, a timeout or an
exhausted limit becomes an :class:`InvalidImage` with a clear message. The server reaps every
child and tells the caller how it ended.

The child sends back a small picklable result and, optionally, one array (the pixels) through
an anonymous memory file (``memfd``) the caller maps: one copy, nothing named on any
filesystem, nothing left behind when either side dies.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
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

_MEMFD = hasattr(os, "memfd_create")  # Linux; elsewhere the pixels come through the socket
_GRACE_S = 3.0  # after the child's own deadline, for its end to be reported
_TIMEOUT = ("decode_timeout", "the file took too long to decode; it may be damaged or hostile")


class SandboxUnavailable(RuntimeError):
    """The sandbox itself failed (its server died, no memory or file descriptors here): says
    nothing about the file, which must be tried again later, never refused or deleted."""


class _Server:
    """The caller's side of the fork server: a socket to hand it one connection per call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        path = [p for p in sys.path if p and os.path.isdir(p)]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "privacy.sandbox", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.sock = ours
        return ours

    def hand_over(self, conn_end: socket.socket, kill_after_s: float) -> None:
        """Give the server one end of a fresh connection: it forks a child to serve it, and
        kills that child if it still runs ``kill_after_s`` from now."""
        with self.lock:
            for attempt in range(2):
                sock = self.sock if self.proc is not None and self.proc.poll() is None else None
                if sock is None:
                    sock = self._start()
                    sock.settimeout(10.0)  # a stalled server must not hold the lock for ever
                try:
                    socket.send_fds(sock, [struct.pack("d", kill_after_s)], [conn_end.fileno()])
                    return
                except OSError:
                    if attempt:
                        raise
                    self.sock = None  # the server is gone: start another once

    def shutdown(self) -> None:
        """Stop the server (it ends when its socket closes) and wait for it."""
        if not self.lock.acquire(timeout=5):  # at exit, a daemon thread may hold it for ever
            return
        try:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self.proc = None
        finally:
            self.lock.release()


_server = _Server()
atexit.register(_server.shutdown)  # an orderly end (the server would also end with its caller)


def shutdown() -> None:
    """Stop this process's fork server, if one runs: its CPU time and that of every child it
    reaped then count in this process's ``RUSAGE_CHILDREN`` (benchmarks measure with it)."""
    _server.shutdown()


def run_isolated(fn: IsolatedFn, data: bytes, *, timeout_s: float, memory_bytes: int) -> tuple[Any, np.ndarray | None]:
    """``fn(data)`` in a child process, with ``memory_bytes`` of address space to spare. ``fn``
    must be picklable by reference: a module-level function, or a ``functools.partial`` of one.
    Raises :class:`InvalidImage` when the child crashes, times out or exhausts a limit (a
    verdict on the file), :class:`SandboxUnavailable` when the sandbox itself fails (none)."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise SandboxUnavailable(f"no socket for the decoder ({type(exc).__name__})") from None
    try:
        # Sends give up after the call's time: a stalled child or server never blocks us.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(timeout_s + _GRACE_S) + 1, 0))
        _server.hand_over(theirs, timeout_s + 2 * _GRACE_S)
    except OSError as exc:
        ours.close()
        raise SandboxUnavailable(f"the decoder sandbox could not be reached ({type(exc).__name__})") from None
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    deadline = time.monotonic() + timeout_s + _GRACE_S
    try:
        try:
            conn.send((fn, memory_bytes, timeout_s))
            conn.send_bytes(data)
        except OSError:
            # The child died before reading everything (its end is reported next), or stalled.
            _next(conn, time.monotonic() + _GRACE_S)
            raise
        result, out = _exchange(conn, deadline)
        # Then the child's end, as the server reports it: no child outlives its call.
        _wait(conn, deadline)
        if conn.recv() != ("exit", 0):
            raise InvalidImage("decoder_crashed", "the image decoder did not end cleanly")
        return result, out
    except (EOFError, OSError) as exc:
        # No exit status from the server: our side failed (server gone, no memory or fds).
        raise SandboxUnavailable(f"the decoder sandbox failed ({type(exc).__name__})") from None
    finally:
        conn.close()


def _exchange(conn: Connection, deadline: float) -> tuple[Any, np.ndarray | None]:
    msg = _next(conn, deadline)
    if msg[0] == "invalid":
        # The child is ending: wait for it, so that no child outlives its call.
        with contextlib.suppress(EOFError, OSError):
            if conn.poll(max(0.0, deadline - time.monotonic())):
                conn.recv()
        raise InvalidImage(msg[1], msg[2])
    _, result, meta = msg
    if meta is None:
        return result, None
    shape, dtype = meta
    dt = np.dtype(dtype)
    size = int(np.prod(shape))
    if not _MEMFD:
        out = np.empty(shape, dt)
        _wait(conn, deadline)
        conn.recv_bytes_into(out.data.cast("B"))
        return result, out
    fd = os.memfd_create("siteplan-pixels", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(1, size * dt.itemsize))
        reduction.send_handle(conn, fd, 0)
        _next(conn, deadline)  # "done"
        mm = mmap.mmap(fd, max(1, size * dt.itemsize))
    finally:
        os.close(fd)
    # The array owns the mapping: its memory goes when the array does.
    return result, np.frombuffer(mm, dt, size).reshape(shape)


def _wait(conn: Connection, deadline: float) -> None:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise InvalidImage(*_TIMEOUT)


def _next(conn: Connection, deadline: float) -> Any:
    """The child's next message; its end, reported by the server before any answer, becomes
    an error."""
    _wait(conn, deadline)
    msg = conn.recv()
    if msg[0] != "exit":
        return msg
    code = int(msg[1])
    if code == 0:
        raise InvalidImage("decoder_crashed", "the image decoder ended without an answer")
    if code in (-signal.SIGALRM, -signal.SIGXCPU, -signal.SIGKILL):
        raise InvalidImage(*_TIMEOUT)
    try:
        why = signal.Signals(-code).name if code < 0 else f"exit status {code}"
    except ValueError:
        why = f"signal {-code}"
    log.warning("an image decoder died (%s); the file was refused", why)
    raise InvalidImage("decoder_crashed", f"the file crashed the image decoder ({why}); it is damaged or hostile")


# ---- the fork server and its children (python -m privacy.sandbox FD) ----


def _child(conn: Connection) -> None:
    fn, memory_bytes, timeout_s = conn.recv()
    data = conn.recv_bytes()
    # Self-limits: SIGALRM's default action ends the process whatever the decoder is doing.
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    cpu_s = max(1, int(timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    try:  # the cap is on top of what the child holds at start (Linux; elsewhere no cap)
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (base + memory_bytes, base + memory_bytes))
    except (OSError, ValueError):
        pass
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
    fd = reduction.recv_handle(conn)
    try:
        with mmap.mmap(fd, max(1, array.nbytes)) as mm:
            np.frombuffer(mm, array.dtype, array.size).reshape(array.shape)[...] = array
    finally:
        os.close(fd)
    conn.send(("done",))


def _reap(pid: int, fd: int, kill_after_s: float) -> None:
    """Wait for one child, killing it at its deadline whatever it blocks (the child's own alarm
    and CPU limit come first; this is the backstop); tell its caller how it ended, after
    whatever the child sent. The child is ours until reaped, so the pid cannot be reused."""
    deadline = time.monotonic() + kill_after_s
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)
    conn = Connection(fd)
    try:
        conn.send(("exit", os.waitstatus_to_exitcode(status)))
    except OSError:
        pass  # the caller has gone already
    finally:
        conn.close()


def _serve(sock: socket.socket) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the caller decides; this server
    # ends when the caller's socket closes, and its children at their own deadline.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The decoders, imported once for every child (privacy.isolated itself imports this module:
    # it is what the children run, and is loaded on first use from these, cheaply).
    import privacy.decode
    import privacy.metadata  # noqa: F401

    reapers: list[threading.Thread] = []
    try:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 8, 1)
            except OSError:
                return
            if not msg:  # the calling process is gone
                return
            if not fds:
                continue
            reapers = [t for t in reapers if t.is_alive()]
            _fork_one(fds[0], struct.unpack("d", msg)[0] if len(msg) == 8 else 60.0, reapers)
    finally:
        for t in reapers:  # every child's end is reported before the server goes
            t.join()


def _fork_one(fd: int, kill_after_s: float, reapers: list[threading.Thread]) -> None:
    try:
        pid = os.fork()
    except OSError:  # no memory or no pids: the caller sees the connection close
        os.close(fd)
        return
    if pid == 0:
        code = 0
        try:
            os.closerange(3, fd)  # nothing of the server or of other calls in the child
            os.closerange(fd + 1, 1 << 16)
            _child(Connection(fd))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    t = threading.Thread(target=_reap, args=(pid, fd, kill_after_s))
    try:
        t.start()
    except RuntimeError:  # no thread to spare: reap here, the caller still gets the child's end
        _reap(pid, fd, kill_after_s)
        return
    reapers.append(t)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
