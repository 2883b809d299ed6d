"""OpenAI-compatible HTTP server with continuous batching.

- `async_engine`: the `Engine`, one background thread driving `llama2.generation.engine.StepEngine`
  (the one engine every caller uses); `scheduler` keeps the old import names;
- `app`: the FastAPI app (`create_app`), which only wires settings, middleware, error handlers and
  the routers of `routes/` (one module per OpenAI route); `service` holds the request lifecycle;
- `server`: `ServeConfig` and `run_server` (uvicorn, graceful SIGTERM drain);
- `schemas`: request/response models; `metrics`: Prometheus text metrics.

FastAPI and uvicorn are optional dependencies (`pip install llama2[serve]`); the names below are
imported on first use, so `python -m llama2.serve.server` and the engine alone do not need them early.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama2.serve.scheduler import Engine, EngineConfig, SequenceSpec
    from llama2.serve.server import ServeConfig, build_app, run_server

_EXPORTS = {
    "Engine": "llama2.serve.scheduler",
    "EngineConfig": "llama2.serve.scheduler",
    "SequenceSpec": "llama2.serve.scheduler",
    "ServeConfig": "llama2.serve.server",
    "build_app": "llama2.serve.server",
    "run_server": "llama2.serve.server",
}

__all__ = ["Engine", "EngineConfig", "SequenceSpec", "ServeConfig", "build_app", "run_server"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama2.serve' has no attribute {name!r}")
