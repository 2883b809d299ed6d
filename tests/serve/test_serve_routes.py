"""The app as thin route modules: each OpenAI route lives in its own module under
`llama2.serve.routes`, the OpenAPI operations keep their names and bodies, and the routes answer
in-process (ASGI, no server process) with the same text as the `Generator` oracle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serve_support import CONTEXT, tiny_model, tokenizer_for

from llama2.chat import encode_dialog
from llama2.generation import Generator, SamplingParams
from llama2.serve.app import begin_drain, create_app
from llama2.serve.prepare import AppSettings
from llama2.serve.scheduler import Engine, EngineConfig
from llama2.serve.service import Service

MODEL = "tiny-routes"
GREEDY = SamplingParams(temperature=0.0)

# path -> (method, operationId, tags, request-body schema, 200 media type, 200 schema $ref, module)
ROUTES: dict[str, tuple[str, str, list[str] | None, str | None, str, str | None, str]] = {
    "/health": ("get", "health_health_get", ["server"], None, "application/json", None, "health"),
    "/metrics": ("get", "metrics_endpoint_metrics_get", ["server"], None, "text/plain", None, "health"),
    "/v1/models": ("get", "list_models_v1_models_get", None, None, "application/json", "ModelList", "models"),
    "/v1/completions": (
        "post",
        "completions_v1_completions_post",
        None,
        "CompletionRequest",
        "application/json",
        "Completion",
        "completions",
    ),
    "/v1/chat/completions": (
        "post",
        "chat_completions_v1_chat_completions_post",
        None,
        "ChatCompletionRequest",
        "application/json",
        "ChatCompletion",
        "chat",
    ),
}
ERROR_CODES = ["400", "401", "408", "413", "421", "429", "500", "503"]


@pytest.fixture(scope="module")
def app() -> FastAPI:
    tok = tokenizer_for(32000)
    engine = Engine(tiny_model(), tok, EngineConfig(max_slots=2, prefill_chunk=16))
    return create_app(engine, tok, AppSettings(model_name=MODEL))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:  # runs the lifespan: the engine thread starts and stops
        yield c


@pytest.fixture(scope="module")
def oracle() -> Generator:
    return Generator(tiny_model(), tokenizer_for(32000))


def _flat_routes(routes: list[Any]) -> Iterator[Any]:
    for r in routes:
        sub = getattr(r, "original_router", None)  # FastAPI >= 0.165 keeps included routers lazy
        yield from _flat_routes(sub.routes) if sub is not None else [r]


def test_openapi_operations_unchanged(app: FastAPI) -> None:
    schema = app.openapi()
    assert list(schema["paths"]) == list(ROUTES)
    for path, (method, op_id, tags, body, media, ref, _) in ROUTES.items():
        ops = schema["paths"][path]
        assert list(ops) == [method], path
        op = ops[method]
        assert op["operationId"] == op_id
        assert op.get("tags") == tags
        if body is None:
            assert "requestBody" not in op and "parameters" not in op, path
        else:
            want = {"$ref": f"#/components/schemas/{body}"}
            assert op["requestBody"] == {"required": True, "content": {"application/json": {"schema": want}}}
            assert body in schema["components"]["schemas"]
        assert sorted(op["responses"]) == ["200", *ERROR_CODES]
        for code in ERROR_CODES:
            # FastAPI files the shared error responses under the route's own media type
            err = op["responses"][code]["content"][media]["schema"]
            assert err == {"$ref": "#/components/schemas/ErrorResponse"}
        ok = op["responses"]["200"]["content"]
        assert list(ok) == [media]
        if ref is not None:
            assert ok[media]["schema"] == {"$ref": f"#/components/schemas/{ref}"}


def test_each_route_lives_in_its_own_module(app: FastAPI) -> None:
    modules = {r.path: r.endpoint.__module__ for r in _flat_routes(app.routes) if r.path in ROUTES}
    assert modules == {path: f"llama2.serve.routes.{spec[-1]}" for path, spec in ROUTES.items()}
    assert isinstance(app.state.service, Service)


def test_health_models_metrics_and_errors(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, CONTEXT)]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE" in metrics.text
    wrong = client.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_completion_plain_and_streamed_match_generator(client: TestClient, oracle: Generator) -> None:
    ids = oracle.tokenizer.encode("The sky is", bos=True, eos=False)
    expected = oracle.generate([ids], 6, GREEDY)[0].text
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6, "temperature": 0}
    out = client.post("/v1/completions", json=body)
    assert out.status_code == 200, out.text
    data = out.json()
    assert data["object"] == "text_completion" and data["choices"][0]["text"] == expected
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream_body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_plain_and_streamed_match_generator(client: TestClient, oracle: Generator) -> None:
    dialog = [{"role": "user", "content": "Name a colour."}]
    ids = encode_dialog(dialog, oracle.tokenizer)  # type: ignore[arg-type]
    expected = oracle.generate([ids], 5, GREEDY)[0].text
    body = {"model": MODEL, "messages": dialog, "max_tokens": 5, "temperature": 0}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected


def test_drain_cut_turns_new_requests_away() -> None:
    """`begin_drain` reaches the app's `Service`; once the drain has cut, a new request gets 503."""
    tok = tokenizer_for(32000)
    app = create_app(Engine(tiny_model(), tok, EngineConfig(max_slots=1)), tok, AppSettings(model_name=MODEL))
    with TestClient(app) as c:
        service: Service = app.state.service
        assert c.portal is not None
        c.portal.call(begin_drain, app)  # on the event loop, as the server calls it
        assert service.draining and not service.cut
        assert c.get("/v1/models").status_code == 200  # draining, not yet cut: still served
        c.portal.call(service.cut_live)  # what the drain timer does when `drain_timeout_s` passes
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
