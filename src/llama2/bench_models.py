"""`llama2 bench`'s models: random-weight presets built block by block in the target dtype (each
block quantized before the next exists), checkpoints loaded with quantization while loading, and the
quantization spec of a bench row."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2.config import ModelArgs
from llama2.model import Transformer
from llama2.quant import QuantConfig, accelerate, parse_quant_spec, quantize_model

INIT_STD = 0.02  # random weights ~ N(0, 0.02^2), as Llama's initialisation


def make_quant_config(
    scheme: str | QuantConfig | None, include_output: bool = False, groupsize: int | None = None
) -> QuantConfig | None:
    """A `llama2.quant.QuantConfig` for a spec (`"int8"`, `"int4,groupsize=64"`, see `parse_quant_spec`)
    or a config, with `include_output`/`groupsize` applied on top (None: no quantization)."""
    config = parse_quant_spec(scheme)
    if config is None:
        return None
    changes: dict[str, Any] = {}
    if include_output:
        changes["include_output"] = True
    if groupsize is not None:
        changes["groupsize"] = groupsize
    return QuantConfig(**{**config.to_metadata(), **changes}) if changes else config


@torch.no_grad()
def _init_random_(module: nn.Module, gen: torch.Generator) -> None:
    """Fill a freshly materialised module in place: norms 1, everything else N(0, INIT_STD^2)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or (name == "weight" and p.dim() == 1):
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def random_model(
    args: ModelArgs,
    dtype: torch.dtype = torch.float32,
    *,
    quantize: QuantConfig | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Transformer:
    """A `Transformer` of shape `args` with random weights, built in `dtype` on the CPU.

    The model is created on the `meta` device and materialised one block at a time, each block's
    linears quantized (with `quantize`, a `QuantConfig`) before the next exists, so peak memory is
    the final model plus one float block.

    Args:
        args: the shape (e.g. `PRESETS["tinyllama-1.1b"]`).
        dtype: dtype of the float weights (embeddings, norms, unquantized linears).
        quantize: a `llama2.quant.QuantConfig` or None.
        seed: random seed of the weights.
        progress: print one line per block on stderr.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype)
    for name in ("tok_embeddings", "norm", "output"):
        part = getattr(model, name).to_empty(device="cpu")
        _init_random_(part, gen)
        setattr(model, name, part)
    if quantize is not None and quantize.include_output:
        holder = nn.Module()  # quantize_model takes a top-level `output` only; the blocks are still meta
        holder.output = model.output
        quantize_model(holder, quantize)
        model.output = holder.output
    blocks = model.layers
    for i in range(len(blocks)):
        block = blocks[i].to_empty(device="cpu")
        _init_random_(block, gen)
        if quantize is not None:
            quantize_model(block, quantize)
        blocks[i] = block
        if progress and sys.stderr.isatty():
            print(f"\r  building block {i + 1}/{len(blocks)}", end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    accelerate(model)  # bf16/fp16 linears -> the CPU kernels, as load_model does
    return model.eval()


def estimate_weight_bytes(args: ModelArgs, dtype: torch.dtype, quantize: QuantConfig | None) -> int:
    """Bytes of a model of shape `args` (float parts in `dtype`, linears per `quantize`): the exact
    storage layouts of `llama2.quant.registry`, as `llama2.plan` counts them."""
    from llama2.plan import planned_weight_bytes

    return planned_weight_bytes(args, quantize, dtype).total


def available_memory_bytes() -> int | None:
    """Bytes the CPU can allocate now (`llama2.plan.available_memory`)."""
    from llama2.plan import available_memory

    return available_memory("cpu")


def load_checkpoint_model(
    path: str | Path,
    dtype: torch.dtype | None,
    quantize: QuantConfig | None,
    max_seq_len: int | None,
    progress: bool,
) -> Transformer:
    """Load a checkpoint with `llama2.checkpoint.load.load_model`, quantizing tensor by tensor while
    loading (`quantize`: a `QuantConfig` or None), so the float model never exists in full."""
    from llama2.assets import resolve_model
    from llama2.checkpoint.load import load_model

    loaded = load_model(
        resolve_model(path), dtype=dtype, max_seq_len=max_seq_len, progress=progress, quantize=quantize
    )
    return loaded.model.eval()


__all__ = [
    "INIT_STD",
    "available_memory_bytes",
    "estimate_weight_bytes",
    "load_checkpoint_model",
    "make_quant_config",
    "random_model",
]
