"""`GET /v1/models`: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llama2.serve.schemas import ModelCard, ModelList
from llama2.serve.service import service_of

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The one model this server serves."""
    service = service_of(request)
    card = ModelCard(
        id=service.settings.model_name, created=service.created, max_model_len=service.engine.context_window
    )
    return ModelList(data=[card])
