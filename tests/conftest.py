"""Shared fixtures. Real data comes from ../shared/data; its absence is an error, not a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
SAMPLE = ROOT / "sample_data"

os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture(scope="session")
def data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the shared test data is missing at {DATA}; it sits beside the checkout")
    return DATA


@pytest.fixture(scope="session")
def fountain(data: Path) -> Path:
    return data / "sfm" / "strecha-fountain-P11"
