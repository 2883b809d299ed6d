"""Read a llama.cpp GGUF model file (architecture `llama`) as a lazy `CheckpointContents`.

The header (hyperparameters, vocabulary, tensor table) is parsed and validated by
`llama2.gguf_header.read_gguf_header`; tensor data is memory-mapped (`numpy.memmap`, copy-on-write,
so nothing is read until a tensor is loaded and the file is never written) and each
`TensorSource.load()` returns a view of the map, or a float32 tensor decoded from it.

Layout facts (checked against llama.cpp's `convert_hf_to_gguf.py` and tested here):
  - names: `token_embd.weight`, `blk.N.attn_q.weight`, ... (the `GGUF_TO_META` table below); a file
    without `output.weight` ties the output head to `token_embd.weight`;
  - dimensions are stored reversed (`ne[0]` is the row length): a (rows, row_length) weight is
    listed as [row_length, rows]; block-quantized rows are contiguous runs of blocks;
  - q/k projection rows are in Meta's layout (adjacent rotary pairs): the converter undoes
    transformers' permutation (`LlamaModel.permute`), so no permutation is needed here.

Tensor types:
  - F32, F16, BF16: a float tensor of that dtype (`TensorSource.qtype` None);
  - Q8_0, Q4_0, Q4_K: `qtype` "q8_0" / "q4_0" / "q4_k" and `load()` returns the raw blocks as uint8
    (rows, row_length / block * block_bytes), the layout `llama2.quant.gguf_blocks` and `GGUFLinear`
    use; `dequantize_source` turns such a source into float32;
  - any other type `gguf.quants` can decode (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, Q6_K, IQ*, ...):
    dequantized to float32 inside `load()` (qtype None), so those files load at float32 size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.config import ModelArgs, RopeScaling
from llama2.errors import CheckpointError, ConfigError
from llama2.gguf_header import GGUFFormatError, GGUFHeader, GGUFTensorInfo, read_gguf_header
from llama2.limits import check_float, check_int
from llama2.quant.gguf_blocks import BLOCK_SIZES, GGUF_BLOCKS, dequantize_gguf

ARCH = "llama"

# llama.cpp tensor names (gguf `MODEL_TENSOR` names for LLM_ARCH_LLAMA) -> ours (Meta's).
META_TO_GGUF: dict[str, str] = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}
GGUF_TO_META: dict[str, str] = {g: m for m, g in META_TO_GGUF.items()}

# ggml_type numbers (ggml.h) of the types handled without gguf.quants.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
GGML_Q4_0, GGML_Q8_0, GGML_Q4_K = (GGUF_BLOCKS[q].ggml_type for q in ("q4_0", "q8_0", "q4_k"))
QTYPE_OF_GGML: dict[int, str] = {b.ggml_type: q for q, b in GGUF_BLOCKS.items()}  # block types we hold
GGML_OF_QTYPE: dict[str, int] = {q: t for t, q in QTYPE_OF_GGML.items()}
_FLOAT_TYPES: dict[int, tuple[np.dtype[Any], torch.dtype]] = {
    GGML_F32: (np.dtype("<f4"), torch.float32),
    GGML_F16: (np.dtype("<f2"), torch.float16),
    GGML_BF16: (np.dtype("<i2"), torch.bfloat16),  # numpy has no bfloat16: viewed as int16, then torch
}


def meta_name(gguf_name: str) -> str | None:
    """Our name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> `layers.3.attention.wq.weight`)."""
    return keymaps.rename(gguf_name, GGUF_TO_META)


def gguf_name(name: str) -> str:
    """llama.cpp's name of one of our tensor names (raises KeyError for a name that has none)."""
    out = keymaps.rename(name, META_TO_GGUF)
    if out is None:
        raise KeyError(name)
    return out


def type_name(ggml_type: int) -> str:
    """`GGMLQuantizationType` name of a ggml type number (`8` -> `Q8_0`), or `type N`."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor of logical `shape` (numpy order) stored as `ggml_type`.

    Raises:
        ValueError: unknown type, or a row length that is not a whole number of blocks.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml type {ggml_type}") from None
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"row length {row} is not a multiple of the {type_name(ggml_type)} block ({block})")
    return math.prod(shape[:-1]) * (row // block) * type_size


# ------------------------------------------------------------------------------- hyperparameters
def _f32_value(value: Any) -> float:
    """A float32 stored in GGUF as the shortest decimal that rounds to it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def args_from_header(header: GGUFHeader) -> ModelArgs:
    """The `ModelArgs` a GGUF `llama` header describes.

    Reads `llama.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
    `attention.head_count`, `attention.head_count_kv`, `attention.layer_norm_rms_epsilon`,
    `rope.freq_base`, `rope.dimension_count`, `rope.scaling.type`/`.factor` (or the older
    `rope.scale_linear`) and the vocabulary size (the token list's length, else `llama.vocab_size`,
    else the rows of `token_embd.weight`). Each value's GGUF type is checked (an integer where a
    count belongs, a number where a float belongs, a string for the scaling type) and bounded
    (`llama2.limits.BOUNDS`) before it is used.

    Raises:
        CheckpointError: a required key is missing or of the wrong type, or the shape is one this
            model cannot run.
    """
    f = header.fields
    path = header.path

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = f.get(f"{ARCH}.{key}", default)
        if value is None and required:
            raise CheckpointError(
                f"{path}: GGUF metadata key '{ARCH}.{key}' is missing; a llama model needs it"
            )
        return value

    def integer(key: str, bound: str, default: Any = None) -> int:
        return check_int(
            get(key, default, required=default is None), bound, f"{path}: GGUF {ARCH}.{key}", CheckpointError
        )

    def number(key: str, bound: str, default: float) -> float:
        name = f"{path}: GGUF {ARCH}.{key}"
        raw = check_float(get(key, default), bound, name, CheckpointError)
        return check_float(_f32_value(raw), bound, name, CheckpointError)  # as float32 rounds it

    dim = integer("embedding_length", "dim")
    n_heads = integer("attention.head_count", "n_heads")
    n_kv = integer("attention.head_count_kv", "n_kv_heads", n_heads)
    n_layers = integer("block_count", "n_layers")
    hidden = integer("feed_forward_length", "hidden_dim")
    tokens = f.get("tokenizer.ggml.tokens")
    emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if tokens is not None:
        if not isinstance(tokens, list):
            raise CheckpointError(f"{path}: GGUF tokenizer.ggml.tokens must be an array of strings")
        vocab = check_int(len(tokens), "vocab_size", f"{path}: GGUF vocabulary size", CheckpointError)
    elif get("vocab_size") is not None:
        vocab = integer("vocab_size", "vocab_size")
    elif emb is not None:
        vocab = emb.shape[0]
    else:
        raise CheckpointError(f"{path}: GGUF file has neither a token list nor token_embd.weight")
    if emb is not None and len(emb.shape) == 2 and emb.shape[0] != vocab:
        raise CheckpointError(
            f"{path}: token_embd.weight has {emb.shape[0]} rows but the vocabulary has {vocab} tokens"
        )
    scaling: RopeScaling | None = None
    scaling_type = get("rope.scaling.type", "none")
    if not isinstance(scaling_type, str):
        raise CheckpointError(
            f"{path}: GGUF {ARCH}.rope.scaling.type must be a string, got {scaling_type!r:.40}"
        )
    factor_key = "rope.scaling.factor"
    if scaling_type == "none" and get("rope.scale_linear") is not None:
        scaling_type, factor_key = "linear", "rope.scale_linear"
    if scaling_type == "linear":
        if get(factor_key) is None:
            raise CheckpointError(
                f"{path}: GGUF rope scaling is 'linear' but '{ARCH}.rope.scaling.factor' is missing"
            )
        factor = number(factor_key, "rope_scaling_factor", 1.0)
        if factor != 1.0:
            scaling = RopeScaling("linear", factor)
    elif scaling_type != "none":
        raise CheckpointError(
            f"{path}: GGUF rope scaling type {scaling_type!r} is not supported; expected 'none' or 'linear'"
        )
    max_seq_len = integer("context_length", "max_seq_len")
    norm_eps = number("attention.layer_norm_rms_epsilon", "norm_eps", 1e-5)
    rope_theta = number("rope.freq_base", "rope_theta", 10000.0)
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=None if n_kv == n_heads else n_kv,
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=norm_eps,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if args.replace(hidden_dim=None).ffn_hidden_dim == hidden:  # Meta's rule gives it: keep it implicit
        args = args.replace(hidden_dim=None)
    rot = integer("rope.dimension_count", "dim", args.head_dim)
    if rot != args.head_dim:
        raise CheckpointError(
            f"{path}: GGUF rope.dimension_count is {rot}; expected the head dimension {args.head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    return args


# ------------------------------------------------------------------------------------- tensors
def _loader(
    data: np.memmap[Any, np.dtype[np.uint8]], info: GGUFTensorInfo, nbytes: int, path: Path
) -> tuple[Callable[[], Tensor], torch.dtype, str | None]:
    """(load, stored dtype, qtype) for one tensor of the map."""
    start, shape, t = info.offset, info.shape, info.ggml_type
    if t in _FLOAT_TYPES:
        np_dtype, dtype = _FLOAT_TYPES[t]

        def load_float() -> Tensor:
            out = torch.from_numpy(data[start : start + nbytes].view(np_dtype))
            return (out.view(dtype) if dtype == torch.bfloat16 else out).reshape(shape)

        return load_float, dtype, None
    rows = math.prod(shape[:-1])
    if t in QTYPE_OF_GGML and len(shape) == 2:

        def load_blocks() -> Tensor:
            return torch.from_numpy(data[start : start + nbytes].reshape(rows, nbytes // rows))  # (N, bytes)

        return load_blocks, torch.uint8, QTYPE_OF_GGML[t]

    def load_dequantized() -> Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.asarray(data[start : start + nbytes]).reshape(max(rows, 1), -1)
        try:
            values = dequantize(raw, GGMLQuantizationType(t))  # (rows, row_length) float32
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} has GGUF type {type_name(t)}, which cannot be decoded ({e})"
            ) from None
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    return load_dequantized, torch.float32, None


def read_gguf(found: DetectedCheckpoint) -> CheckpointContents:
    """Open a GGUF model file lazily: `ModelArgs` from its metadata, tensors memory-mapped.

    Args:
        found: `detect()`'s result for the file (format GGUF, one weight file).

    Returns:
        The checkpoint: tensors under our names (see the module docstring for the types), the
        file's scalar metadata (`general.*`, `llama.*`, `tokenizer.ggml.model`, ...) as strings.

    Raises:
        CheckpointError: corrupt or truncated file, another architecture, an unknown tensor name, a
            tensor type that cannot be decoded, or hyperparameters the model cannot run.
    """
    path = found.weight_files[0]
    try:
        header = read_gguf_header(path)
    except GGUFFormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None
    arch = header.fields.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: GGUF general.architecture is {arch!r}; expected {ARCH!r}")
    args = args_from_header(header)
    data: np.memmap[Any, np.dtype[np.uint8]] = np.memmap(path, dtype=np.uint8, mode="c")
    sources: list[TensorSource] = []
    for info in header.tensors:
        name = meta_name(info.name)
        if name is None:
            raise CheckpointError(
                f"{path}: unexpected GGUF tensor {info.name!r}; a llama.cpp Llama 2 model has "
                "token_embd, blk.N.attn_*/ffn_*, output_norm and output tensors only"
            )
        load, dtype, qtype = _loader(data, info, info.nbytes, path)  # nbytes checked by the header parser
        sources.append(TensorSource(name, path, info.shape, dtype, load, qtype))
    if not any(s.name == "output.weight" for s in sources):
        emb = next((s for s in sources if s.name == "tok_embeddings.weight"), None)
        if emb is not None:  # tied head: llama.cpp reuses token_embd; our head is its own tensor
            emb_load = emb.load
            sources.append(
                TensorSource(
                    "output.weight", path, emb.shape, emb.dtype, lambda: emb_load().clone(), emb.qtype
                )
            )
    metadata = {k: str(v) for k, v in header.fields.items() if isinstance(v, (str, int, float, bool))}
    return CheckpointContents(CheckpointFormat.GGUF, args, sources, (path,), found.root, metadata)


def dequantize_source(src: TensorSource) -> Tensor:
    """Read a tensor as floats: a block-quantized source (`qtype` set) is dequantized to float32
    with `llama2.quant.gguf_blocks` (same values as `gguf.quants.dequantize`); others are loaded as is.
    """
    t = src.load()
    if src.qtype is None:
        return t
    if src.qtype not in BLOCK_SIZES:
        raise CheckpointError(f"{src.file}: tensor {src.name!r} has unknown block type {src.qtype!r}")
    return dequantize_gguf(t, src.qtype).reshape(src.shape)
