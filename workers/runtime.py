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
    ray.init(
        num_cpus=num_cpus,
        # One slot for batch work (workers/routing.py): a batch runs beside interactive jobs at
        # low priority, never in their CPU slots.
        resources={"siteplan_batch": 1},
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
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
