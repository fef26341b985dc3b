"""``/metrics`` in Prometheus text format, for operators: counts only, no tenant or personal data.
With ``SITEPLAN_METRICS_TOKEN`` set it needs that bearer token; without, loopback clients only."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from api.deps import ServicesDep
from api.errors import ApiError
from workers.metrics import ServiceCollector

router = APIRouter(tags=["meta"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}},
    include_in_schema=False,
)
def metrics(request: Request, svc: ServicesDep) -> Response:
    want = svc.settings.metrics_token
    if want:
        got = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise ApiError(401, "unauthorized", "the metrics token is required")
    elif request.client is None or request.client.host not in ("127.0.0.1", "::1", "testclient"):
        raise ApiError(404, "not_found", "no such page")
    reg = CollectorRegistry()
    reg.register(ServiceCollector(svc.factory))
    return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)
