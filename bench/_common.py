"""Helpers shared by the benchmarks: run a function in a fresh process, time it, measure its peak RSS."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from typing import Any


def _child(fn: Callable[..., Any], args: tuple[Any, ...], q: Any) -> None:
    t0 = time.perf_counter()
    try:
        result = fn(*args)
        err = None
    except Exception as exc:  # report, don't hide
        result, err = None, f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    # Files are decoded in sandbox children (privacy/sandbox.py): stop their server so that its
    # CPU time, and that of every child it reaped, is counted below.
    import sys

    if "privacy.sandbox" in sys.modules:
        sys.modules["privacy.sandbox"].shutdown()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (all threads and child processes, start-up included): steadier than wall time
    # on a shared machine. Peak RSS: this process's, and the largest child's (a decode sandbox),
    # which ran beside it: their sum bounds the peak of the two together.
    q.put(
        {
            "result": result,
            "error": err,
            "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime + kids.ru_utime + kids.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024.0,
            "child_peak_rss_mb": kids.ru_maxrss / 1024.0,
        }
    )


def measured(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a spawned process; its wall time, CPU time and peak resident memory (measured)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out: dict[str, Any] = q.get()
    p.join()
    return out
