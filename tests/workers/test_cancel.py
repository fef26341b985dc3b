"""A job cancelled while a stage runs stops within about a second, and its stage writes no more."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from workers.stages import JobCancelled, _await


@ray.remote(max_retries=0)
def _slow_stage(out: str) -> str:
    time.sleep(5)
    Path(out).write_text("written after the cancellation")
    return "done"


@pytest.mark.slow
def test_a_cancelled_stage_is_killed_not_waited_for(tmp_path: Path) -> None:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "late.txt"
        ref = _slow_stage.remote(str(out))
        t0 = time.monotonic()
        with pytest.raises(JobCancelled):
            _await(ref, lambda: time.monotonic() - t0 > 1.0)
        assert time.monotonic() - t0 < 4.0
        time.sleep(max(0.0, t0 + 7 - time.monotonic()))  # past the moment the stage would have written
        assert not out.exists(), "the stage's worker was killed"
    finally:
        ray.shutdown()
