"""`GET /health` (liveness and engine state) and `GET /metrics` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from llama2.serve.service import service_of

router = APIRouter(tags=["server"])


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: always 200 while the process serves (no API key needed)."""
    return {"status": "ok", **service_of(request).engine.stats()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_endpoint(request: Request) -> PlainTextResponse:
    """Prometheus text format."""
    text = service_of(request).metrics.render()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
