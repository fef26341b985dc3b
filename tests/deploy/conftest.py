"""A throwaway PostgreSQL database per test on the local server (the one tests/api uses; .ci/run
starts it). Unreachable: the tests fail, never skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import throwaway_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    with throwaway_database("siteplan_d") as url:
        yield url
