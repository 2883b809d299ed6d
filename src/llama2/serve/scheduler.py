"""The server's scheduling names, kept importable from here.

The engine itself is `llama2.generation.engine.StepEngine` (slots, chunked prefill, batched decode,
one sampling chain); `llama2.serve.async_engine.Engine` drives it from a background thread; the
scheduling policy (admission, queue limit, prefill budget) is the torch-free `llama2.scheduling`.
"""

from __future__ import annotations

from llama2.generation.engine import (
    EngineConfig,
    PromptLogprobs,
    SequenceDone,
    SequenceFailed,
    SequenceSpec,
)
from llama2.generation.sequence import InfillDetokenizer
from llama2.serve.async_engine import (
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    QueueItem,
    RequestHandle,
)

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineOverloadedError",
    "InfillDetokenizer",
    "PromptLogprobs",
    "QueueItem",
    "RequestHandle",
    "SequenceDone",
    "SequenceFailed",
    "SequenceSpec",
]
