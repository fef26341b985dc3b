"""Starting and stopping Ray with every file it writes under storage the service controls.

Ray writes session logs, sockets, plasma fallback files and spilled objects under its temp dir
unless told otherwise, and leaves them after shutdown. Personal data can sit in spilled objects,
so the temp dir, plasma directory and spill directory all point under ``Settings.ray_dir``,
and an embedded run wipes it on shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from siteplan.settings import Settings

log = logging.getLogger(__name__)


_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """The embedded Ray listens on 127.0.0.1 only (its GCS, raylet, object manager, workers and
    runtime-env agent). Ray turns a node address of 127.0.0.1 into the host's external one
    (``resolve_ip_for_localhost``) unless it runs as a single-node Ray, as it does on macOS and
    Windows; that switch is its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import by
    this process and at start by the processes Ray starts now. Set for the start only; a Ray
    joined at ``SITEPLAN_RAY_ADDRESS`` is untouched. tests/workers/test_loopback.py lists the
    sockets, so a Ray upgrade that changes this fails there."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(_SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = before_env


@contextmanager
def ray_runtime(settings: Settings) -> Iterator[None]:
    """Start (or join) Ray for the duration of the block."""
    if ray.is_initialized():
        yield
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()
        return
    rdir = settings.ray_dir
    spill = rdir / "spill"
    plasma = rdir / "plasma"
    for d in (spill, plasma):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(rdir, 0o700)
    num_cpus = settings.num_cpus or os.cpu_count() or 1
    with _loopback_only():
        ray.init(
            num_cpus=num_cpus,
            # One slot for batch work (workers/routing.py): a batch runs beside interactive jobs at
            # low priority, never in their CPU slots.
            resources={"siteplan_batch": 1},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(rdir),
            _plasma_directory=str(plasma),
            object_spilling_directory=str(spill),
        )
    log.info("local Ray started with %d CPUs", num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(rdir, ignore_errors=True)
