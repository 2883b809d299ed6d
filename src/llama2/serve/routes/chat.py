"""`POST /v1/chat/completions`: chat completion in the Llama 2-Chat format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llama2.serve.routes import json_body
from llama2.serve.schemas import ChatCompletion, ChatCompletionRequest
from llama2.serve.service import service_of
from llama2.serve.sse import SSE_HEADERS, EventStreamResponse

router = APIRouter()


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, openapi_extra=json_body(ChatCompletionRequest)
)
async def chat_completions(request: Request) -> Response:
    """Chat completion in the Llama 2-Chat format."""
    service = service_of(request)
    body, prep = await service.prepare(request, ChatCompletionRequest)
    handle = service.submit(prep)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = service.stream(handle, prep, "chat", include_usage)
        return EventStreamResponse(stream, headers=SSE_HEADERS)
    done = await service.collect(handle, request)
    return JSONResponse(service.responses.chat_response(prep, done).model_dump(mode="json"))
