"""`POST /v1/completions`: text completion (and Code Llama infilling with `suffix`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llama2.serve.routes import json_body
from llama2.serve.schemas import Completion, CompletionRequest
from llama2.serve.service import service_of
from llama2.serve.sse import SSE_HEADERS, EventStreamResponse

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, openapi_extra=json_body(CompletionRequest))
async def completions(request: Request) -> Response:
    """Text completion (and Code Llama infilling with `suffix`)."""
    service = service_of(request)
    body, prep = await service.prepare(request, CompletionRequest)
    handle = service.submit(prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(
            service.stream(handle, prep, "completion", include_usage), headers=SSE_HEADERS
        )
    done = await service.collect(handle, request)
    return JSONResponse(service.responses.completion_response(prep, done).model_dump(mode="json"))
