"""Liveness (no authentication, reveals nothing)."""

from __future__ import annotations

from fastapi import APIRouter

from api.schemas import Health
from siteplan import PIPELINE_VERSION

router = APIRouter(tags=["meta"])


@router.get("/health", response_model=Health)
def health() -> Health:
    return Health(status="ok", pipeline_version=PIPELINE_VERSION)
