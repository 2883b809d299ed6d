"""The memory plan of a checkpoint as `load_model` would hold it, from its headers (no tensor is read).

`plan_checkpoint(path, ...)` reads the shape, the stored scheme (our format's safetensors metadata)
and each tensor's stored type (GGUF block types included), counts the weights exactly as the loader
keeps them (`stored_weight_bytes`), and hands them to the pure `llama2.plan.estimate_memory` for the
KV cache and the activations. This is the I/O half of `llama2 plan --model`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llama2.checkpoint.load import float_weight_dtype, read_checkpoint
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.errors import ConfigError
from llama2.plan import MemoryPlan, WeightBytes, estimate_memory
from llama2.quant.convert import BLOCK_LINEARS, QuantConfig, config_from_metadata, parse_quant_spec
from llama2.quant.registry import get_scheme
from llama2.runtime import resolve_device


def _is_linear(module_name: str) -> bool:
    """A module the loader may hold quantized: a block projection or the output head."""
    return module_name == "output" or module_name.rsplit(".", 1)[-1] in BLOCK_LINEARS


def stored_weight_bytes(contents: CheckpointContents, dtype: torch.dtype) -> WeightBytes:
    """The bytes of every weight as `load_model` keeps a stored checkpoint, from its headers.

    A GGUF block tensor of a linear stays in its blocks (`llama2.quant.registry`'s layout); the
    buffers of our format's quantized modules (a linear whose `weight` is stored as integers) keep
    their stored dtypes; everything else (float tensors, block-quantized embeddings, GGUF types this
    package does not hold) becomes a float tensor in `dtype`.
    """
    quantized = {
        src.name.rsplit(".", 1)[0]
        for src in contents.tensors
        if _is_linear(src.name.rsplit(".", 1)[0])
        and (src.qtype is not None or (src.name.endswith(".weight") and not src.dtype.is_floating_point))
    }

    def nbytes(src: TensorSource) -> int:
        module = src.name.rsplit(".", 1)[0]
        if src.qtype is not None and module in quantized:
            n, k = src.shape
            return get_scheme(src.qtype).storage_bytes(n, k, QuantConfig(src.qtype))
        return math.prod(src.shape) * (src.dtype if module in quantized else dtype).itemsize

    return WeightBytes.from_tensors(
        ((src.name, nbytes(src)) for src in contents.tensors), output_quantized="output" in quantized
    )


def _block_scheme(contents: CheckpointContents) -> QuantConfig | None:
    """The scheme of a GGUF file's first block-quantized projection (for the activations' dequantization
    buffers; the weights are counted per tensor), with the head's quantization."""
    qtypes = {src.name.rsplit(".", 1)[0]: src.qtype for src in contents.tensors if src.qtype is not None}
    first = next((q for m, q in qtypes.items() if m != "output" and _is_linear(m)), None)
    if first is None:
        return None
    return QuantConfig(first, include_output="output" in qtypes)


def plan_checkpoint(
    path: Path | str,
    *,
    quantize: str | QuantConfig | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 1,
    full_logits: bool = False,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """Plan a checkpoint's memory as `load_model(path, quantize=..., dtype=...)` would hold it.

    Args:
        path: a checkpoint (any format) or an embedded model's name.
        quantize: a scheme to quantize a float checkpoint with while loading (`parse_quant_spec`);
            None plans what is stored (a quantized checkpoint as stored, a float one in float).
        dtype: dtype of the float weights; None: the one `load_model` would choose.
        max_seq_len: the context; None: the checkpoint's.
        batch_size, full_logits, device: as `llama2.plan.estimate_memory`.

    Raises:
        CheckpointError: the checkpoint cannot be read.
        ConfigError: a scheme asked for a checkpoint already quantized differently, or that cannot
            hold a layer's shape.
    """
    contents = read_checkpoint(path)
    args = contents.args
    requested = parse_quant_spec(quantize)
    stored = config_from_metadata(contents.metadata)
    blocks = {src.qtype for src in contents.tensors if src.qtype is not None}
    if requested is not None and (
        (stored is not None and stored != requested) or (blocks and blocks != {requested.scheme})
    ):
        held = stored.to_metadata() if stored is not None else f"GGUF blocks {', '.join(sorted(blocks))}"
        raise ConfigError(
            f"{contents.files[0]} is already quantized ({held}); plan it without a scheme "
            f"(it loads as stored), not {requested.to_metadata()}"
        )
    dev = resolve_device(device) if isinstance(device, str) else device
    target = float_weight_dtype(contents, dtype, dev)
    context = max_seq_len if max_seq_len is not None else args.max_seq_len
    if stored is None and not blocks:  # a float checkpoint: the scheme's layout from the shape alone
        return estimate_memory(
            args,
            scheme=requested,
            dtype=target,
            max_seq_len=context,
            batch_size=batch_size,
            full_logits=full_logits,
            device=dev,
        )
    return estimate_memory(
        args,
        scheme=stored if stored is not None else _block_scheme(contents),
        dtype=target,
        max_seq_len=context,
        batch_size=batch_size,
        full_logits=full_logits,
        device=dev,
        stored=stored_weight_bytes(contents, target),
    )


__all__ = ["plan_checkpoint", "stored_weight_bytes"]
