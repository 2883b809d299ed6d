"""The types every checkpoint reader produces: a lazy `TensorSource` per tensor and the
`CheckpointContents` that holds them (kept apart from the readers and the loader so that
`gguf_model`, `gguf_export` and the readers import them without a cycle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llama2.checkpoint.formats import CheckpointFormat
from llama2.config import ModelArgs


@dataclass
class TensorSource:
    """One tensor of a checkpoint, under our (Meta) name, not yet read.

    Attributes:
        name: our parameter name.
        file: the file it comes from (for error messages).
        shape: its shape after renaming/merging (known without reading the data).
        dtype: its stored dtype.
        load: reads it (memory-mapped where possible) and applies any permutation/merge.
        qtype: None for a plain tensor. For a tensor stored in a GGUF block format that
            `llama2.quant.gguf_blocks.BLOCK_SIZES` supports ("q8_0", "q4_0", "q4_k"): that name,
            and `load()` returns the raw blocks, uint8 (shape[0], shape[1] / block * block_bytes),
            while `shape` stays the logical (dequantized) shape.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], Tensor]
    qtype: str | None = None


@dataclass
class CheckpointContents:
    """A checkpoint opened lazily: its shape, its tensors (unread) and metadata."""

    format: CheckpointFormat
    args: ModelArgs
    tensors: list[TensorSource]
    files: tuple[Path, ...]
    root: Path
    metadata: dict[str, str] = field(default_factory=dict)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Read every tensor (Meta names), optionally converting floating-point ones to `dtype`."""
        out: dict[str, Tensor] = {}
        for src in self.tensors:
            t = src.load()
            out[src.name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
