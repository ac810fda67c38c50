"""``GET /metrics``: Prometheus text exposition of :mod:`api.metrics` (no API key, like ``/healthz``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from api.metrics import metrics_of

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format (OpenMetrics when the Accept header asks for it).",
            "content": {"text/plain": {"schema": {"type": "string"}}, "application/openmetrics-text": {}},
        }
    },
)
def metrics(request: Request) -> Response:
    """Request latency by route template, bytes uploaded and downloaded and open event streams (this API
    process's own counts: scrape every process), and, read from the database at scrape time, jobs by
    state, queue depth and iterations per second per worker. Needs no API key: keep it off the
    public network.
    """
    found = metrics_of(request.app)
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    body = encoder(found.registry) if found is not None else b""
    return Response(body, media_type=None, headers={"Content-Type": content_type})
