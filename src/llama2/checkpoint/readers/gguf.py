"""Reader of llama.cpp GGUF files (the work is in `llama2.checkpoint.gguf_model`, imported on use)."""

from __future__ import annotations

from llama2.checkpoint.formats import DetectedCheckpoint
from llama2.checkpoint.source import CheckpointContents


def read_gguf(found: DetectedCheckpoint) -> CheckpointContents:
    from llama2.checkpoint.gguf_model import read_gguf as read

    return read(found)
