"""The OpenAI-compatible routes, one module per route family, each an `APIRouter` holding only its
handlers: `models` (`GET /v1/models`), `completions` (`POST /v1/completions`), `chat`
(`POST /v1/chat/completions`) and `health` (`GET /health`, `GET /metrics`).

Handlers stay thin: the request lifecycle (prepare, submit, collect, stream, drain) is
`llama2.serve.service.Service`, reached with `service_of(request)`; `llama2.serve.app` wires them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (off the event loop)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
