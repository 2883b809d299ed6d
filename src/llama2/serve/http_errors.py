"""OpenAI-shaped errors (`{"error": {"message", "type", "param", "code"}}`) and request-body parsing.

`parse_body` turns the raw bytes of a request into a validated request model, exactly as FastAPI's
own body handling would (`json.loads`, then pydantic on the Python objects), but as a plain function
that the app runs on a worker thread: a megabyte body costs a few hundred milliseconds of parsing
and validation, which must not stall the event loop.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    """The JSON response of an `APIError`."""
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "tuple", "set"}
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _field_path(loc: Sequence[int | str]) -> str:
    """`("body", "prompt", "list[int]", 1)` -> `"prompt.1"`: drop "body" and pydantic's union-member tags."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif item != "body" and _FIELD_NAME.match(item) and item not in _TYPE_TAGS:
            parts.append(item)
    return ".".join(parts)


def validation_api_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Map pydantic's (or FastAPI's) validation errors to a 400 that names the offending field."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(
            400,
            f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
            code="invalid_json",
        )
    parts: list[str] = []
    for err in errors:
        line = f"{_field_path(err.get('loc', ())) or 'body'}: {err.get('msg')}"
        if line not in parts:
            parts.append(line)
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return APIError(
        400,
        "invalid request: " + "; ".join(parts[:5]) + more,
        param=_field_path(first.get("loc", ())) or None,
        code="invalid_value",
    )


M = TypeVar("M", bound=BaseModel)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # no Content-Type: read as JSON (FastAPI does the same)
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    is_json = subtype == "json" or subtype.endswith("+json")
    return message.get_content_maintype() == "application" and is_json


def parse_body(model: type[M], body: bytes, content_type: str | None) -> M:
    """Decode and validate a JSON request body (blocking: call it off the event loop).

    Raises:
        APIError: 400 for a body that is not JSON, not of the right shape, or sent with another
            Content-Type.
    """
    if not _is_json(content_type):
        raise APIError(
            400, f"the request body must be JSON (Content-Type: application/json), got {content_type!r}"
        )
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg}", code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, a 5000-digit number, deep nesting
        raise APIError(400, f"could not read the request body: {e}", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_api_error(e.errors(include_url=False)) from None
    except RecursionError:
        message = "could not read the request body: nested too deeply"
        raise APIError(400, message, code="invalid_json") from None
