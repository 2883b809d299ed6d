"""One reader per checkpoint format: each turns a `DetectedCheckpoint` into a lazy `CheckpointContents`
(shape, tensors not yet read, metadata) without reading tensor data."""

from __future__ import annotations

from collections.abc import Callable

from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint
from llama2.checkpoint.readers.gguf import read_gguf
from llama2.checkpoint.readers.hf import read_hf
from llama2.checkpoint.readers.llama2c import read_llama2c
from llama2.checkpoint.readers.meta import read_meta
from llama2.checkpoint.readers.ours import read_ours
from llama2.checkpoint.source import CheckpointContents

READERS: dict[CheckpointFormat, Callable[[DetectedCheckpoint], CheckpointContents]] = {
    CheckpointFormat.META: read_meta,
    CheckpointFormat.HF: read_hf,
    CheckpointFormat.LLAMA2C: read_llama2c,
    CheckpointFormat.LLAMA2: read_ours,
    CheckpointFormat.GGUF: read_gguf,
}

__all__ = ["READERS", "read_gguf", "read_hf", "read_llama2c", "read_meta", "read_ours"]
