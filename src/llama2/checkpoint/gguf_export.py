"""Export a Llama 2 checkpoint to a llama.cpp GGUF v3 file (`llama2 quantize --format gguf`).

The file holds architecture `llama`, every hyperparameter llama.cpp reads, the SentencePiece
vocabulary (`tokenizer.ggml.*`), `general.file_type`, and the tensors under llama.cpp's names, q/k in
Meta's layout (what llama.cpp's own converter writes). Tensors stream: `gguf.GGUFWriter`'s two-pass
API writes the tensor table first (sizes are known from shapes), then each tensor is read from the
(memory-mapped) source, converted and written before the next is read, and its pages are released
(`release_pages`), so memory stays about one float32 tensor plus its converted copy. `add_tensor`
would keep every tensor until the end.

Tensor types for each `qtype` (llama.cpp's conventions where we can write the type it would use):
  - 1-D tensors (the RMSNorm weights) are always F32, as in every llama.cpp file type;
  - f32 / f16 / bf16: every matrix in that type;
  - q8_0 / q4_0 / q4_k: every matrix in that block type; `token_embd` too (llama.cpp does the same;
    pass `embedding_qtype` to keep it in f16/f32). `output` is Q8_0 for q4_0/q4_k: llama.cpp would
    write Q6_K, which this package does not quantize, and uses Q8_0 itself when Q6_K cannot apply;
  - a row length that is not a multiple of the block size falls back like llama.cpp's quantizer, to
    the nearest type we write: Q4_K -> Q4_0 (32-value blocks) -> F16. llama.cpp would choose Q5_0
    for Q4_K; Q4_0 keeps the tensor loadable by `GGUFLinear` without dequantizing.
Block quantization is `llama2.quant.gguf_blocks.quantize_gguf` (llama.cpp's reference rounding).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from llama2.checkpoint.formats import CheckpointFormat
from llama2.checkpoint.gguf_model import (
    ARCH,
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_OF_QTYPE,
    gguf_name,
    tensor_nbytes,
)
from llama2.checkpoint.load import CheckpointContents, TensorSource, read_checkpoint
from llama2.checkpoint.memory import release_pages, trim_heap
from llama2.checkpoint.save import atomic_write
from llama2.checkpoint.tokenizer_path import find_tokenizer, require_tokenizer
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError
from llama2.gguf_vocab import GGUFVocab, PieceType, read_vocab
from llama2.outpath import check_output_path, write_error
from llama2.quant.gguf_blocks import BLOCK_SIZES, dequantize_gguf, quantize_gguf

GGUFExportType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"]
EXPORT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k")
_FLOAT_GGML: dict[str, int] = {"f32": GGML_F32, "f16": GGML_F16, "bf16": GGML_BF16}
# general.file_type (llama.cpp's `llama_ftype`): 0 ALL_F32, 1 MOSTLY_F16, 32 MOSTLY_BF16, 7 MOSTLY_Q8_0,
# 2 MOSTLY_Q4_0, 14 MOSTLY_Q4_K_S (our q4_k mix is Q4_K throughout, like Q4_K_S, not Q4_K_M).
FILE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k": 14}
_FALLBACK: dict[str, str] = {"q4_k": "q4_0", "q4_0": "f16", "q8_0": "f16"}
# Rows are quantized in chunks of about this many values: it bounds the quantizer's temporaries, and
# q4_k's 21-step scale search runs fastest on small chunks (measured: 32k values per call).
_QUANT_CHUNK_VALUES: dict[str, int] = {"q8_0": 1 << 20, "q4_0": 1 << 20, "q4_k": 1 << 15}
_PAD_SCORE = -1000.0  # llama.cpp's converter gives padding tokens this score and type UNUSED


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF file to write.

    Attributes:
        name: llama.cpp's name.
        source: where its values come from (our name, lazy).
        shape: logical shape, numpy order (rows, row_length).
        type: "f32", "f16", "bf16", "q8_0", "q4_0" or "q4_k".
        nbytes: its size in the file.
    """

    name: str
    source: TensorSource
    shape: tuple[int, ...]
    type: str
    nbytes: int

    @property
    def ggml_type(self) -> int:
        return _FLOAT_GGML[self.type] if self.type in _FLOAT_GGML else GGML_OF_QTYPE[self.type]


def _check_type(value: str, what: str) -> str:
    if value not in EXPORT_TYPES:
        raise ConfigError(f"{what} must be one of {', '.join(EXPORT_TYPES)}; got {value!r}")
    return value


def _fit(want: str, row: int) -> str:
    """The type a row of `row` values is written in when `want` is asked (block-size fallback)."""
    t = want
    while t in BLOCK_SIZES and row % BLOCK_SIZES[t][0]:
        t = _FALLBACK[t]
    return t


def plan_tensors(
    contents: CheckpointContents,
    qtype: str,
    *,
    embedding_qtype: str | None = None,
    output_qtype: str | None = None,
) -> list[PlannedTensor]:
    """Choose each tensor's GGUF name and type (see the module docstring), in file order.

    Raises:
        ConfigError: an unknown type name.
        CheckpointError: a tensor that has no llama.cpp name.
    """
    _check_type(qtype, "qtype")
    quantized = qtype in BLOCK_SIZES
    emb_type = _check_type(embedding_qtype, "embedding_qtype") if embedding_qtype else qtype
    out_type = _check_type(output_qtype, "output_qtype") if output_qtype else ("q8_0" if quantized else qtype)
    plan: list[PlannedTensor] = []
    for src in contents.tensors:
        try:
            name = gguf_name(src.name)
        except KeyError:
            raise CheckpointError(f"{src.file}: tensor {src.name!r} has no llama.cpp GGUF name") from None
        shape = tuple(src.shape)
        if len(shape) == 1:
            t = "f32"
        elif src.name == "tok_embeddings.weight":
            t = emb_type
        elif src.name == "output.weight":
            t = out_type
        else:
            t = qtype
        t = _fit(t, shape[-1])
        ggml = _FLOAT_GGML[t] if t in _FLOAT_GGML else GGML_OF_QTYPE[t]
        plan.append(PlannedTensor(name, src, shape, t, tensor_nbytes(shape, ggml)))
    return plan


def _encode(t: Tensor, type_: str) -> np.ndarray:
    """Floats -> the bytes of `type_`, as a numpy array GGUFWriter writes as is."""
    t = t.detach().to("cpu")
    if type_ == "f32":
        return t.to(torch.float32).contiguous().numpy()
    if type_ == "f16":
        return t.to(torch.float16).contiguous().numpy()
    if type_ == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    rows = t.reshape(-1, t.shape[-1])  # (rows, row_length)
    step = max(1, _QUANT_CHUNK_VALUES[type_] // rows.shape[1])  # bounds the quantizer's temporaries
    out = torch.cat([quantize_gguf(rows[i : i + step].float(), type_) for i in range(0, rows.shape[0], step)])
    return out.reshape(*t.shape[:-1], -1).numpy()  # (rows, row_bytes) uint8


def _padded_vocab(vocab: GGUFVocab, n: int, source: str) -> GGUFVocab:
    have = len(vocab.pieces)
    if have > n:
        raise CheckpointError(
            f"{source}: the tokenizer has {have} tokens but the model's vocab_size is {n}; "
            "expected a tokenizer no larger than the embedding table"
        )
    if have == n:
        return vocab
    extra = n - have  # embedding rows past the tokenizer (padded vocabularies): llama.cpp's [PADi]
    return GGUFVocab(
        pieces=[*vocab.pieces, *(f"[PAD{i}]" for i in range(have, n))],
        scores=[*vocab.scores, *([_PAD_SCORE] * extra)],
        types=[*vocab.types, *([int(PieceType.UNUSED)] * extra)],
        unk_id=vocab.unk_id,
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        add_dummy_prefix=vocab.add_dummy_prefix,
        remove_extra_whitespaces=vocab.remove_extra_whitespaces,
    )


def _contents(
    source: Path | str | CheckpointContents | nn.Module | Mapping[str, Tensor], args: ModelArgs | None
) -> CheckpointContents:
    if isinstance(source, CheckpointContents):
        return source
    if isinstance(source, (str, Path)):
        return read_checkpoint(source)
    if isinstance(source, nn.Module):
        model_args = getattr(source, "args", None)
        args = args if args is not None else model_args if isinstance(model_args, ModelArgs) else None
        sd = source.state_dict()
    else:
        sd = dict(source)
    if args is None:
        raise CheckpointError("export_gguf needs `args` (the ModelArgs) for a state dict source")
    tensors = []
    for name, t in sd.items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device (no data); load weights first")
        if not t.is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} has dtype {t.dtype}; expected floats (quantized layers cannot be exported)"
            )
        tensors.append(TensorSource(name, Path("<memory>"), tuple(t.shape), t.dtype, t.detach))
    return CheckpointContents(CheckpointFormat.LLAMA2, args, tensors, (), Path("."))


def _add_metadata(w: gguf.GGUFWriter, args: ModelArgs, vocab: GGUFVocab, qtype: str, name: str) -> None:
    if args.rope_scaling is not None and args.rope_scaling.type != "linear":
        raise CheckpointError(
            f"cannot export rope scaling {args.rope_scaling.type!r} to GGUF: llama.cpp supports "
            "none, linear and yarn; expected a model without dynamic scaling"
        )
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    if args.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling.factor)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_unk_token_id(vocab.unk_id)
    if vocab.bos_id >= 0:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id >= 0:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_dummy_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)


def export_gguf(
    source: Path | str | CheckpointContents | nn.Module | Mapping[str, Tensor],
    out_path: Path | str,
    qtype: str = "f32",
    *,
    tokenizer_path: Path | str | None = None,
    args: ModelArgs | None = None,
    embedding_qtype: str | None = None,
    output_qtype: str | None = None,
    name: str | None = None,
    progress: bool = True,
) -> Path:
    """Write a llama.cpp-loadable GGUF v3 file, streaming one tensor at a time.

    Args:
        source: a checkpoint path (any format `read_checkpoint` reads, GGUF included), an opened
            `CheckpointContents`, a `Transformer` or a state dict with our names (then pass `args`).
            Quantized GGUF source tensors are dequantized first (re-quantizing a quantized file loses
            precision twice; export from the float checkpoint when you have it).
        out_path: the `.gguf` file to write (replaced atomically; parent folders are created).
        qtype: "f32", "f16", "bf16", "q8_0", "q4_0" or "q4_k" (see the module docstring).
        tokenizer_path: a SentencePiece `tokenizer.model` or a GGUF file; default: the checkpoint's
            own (`tokenizer.model` beside it, or the GGUF source itself).
        args: the model shape, for a state dict source (a `Transformer` carries its own).
        embedding_qtype: type of `token_embd.weight` instead of `qtype`.
        output_qtype: type of `output.weight` instead of the default (Q8_0 for 4-bit types).
        name: `general.name` (default: the source folder's name, or "llama2").
        progress: show a tqdm bar over tensors on stderr.

    Returns:
        The path written.

    Raises:
        ConfigError: unknown type names, or an output path that cannot be written.
        CheckpointError: unreadable source, a tokenizer larger than the vocabulary, or a shape
            llama.cpp cannot represent (dynamic rope scaling).
        TokenizerError: no tokenizer given or found, or the file is not a tokenizer.
    """
    from tqdm import tqdm

    out = check_output_path(out_path, folder=False, what="GGUF file")  # before the source is read
    contents = _contents(source, args)
    model_args = contents.args
    plan = plan_tensors(contents, qtype, embedding_qtype=embedding_qtype, output_qtype=output_qtype)
    found = find_tokenizer(contents.root, contents.files, contents.format)
    where = contents.root if contents.files else "held in memory"
    hint = "pass tokenizer_path (llama.cpp needs the vocabulary inside the GGUF file)"
    tok = require_tokenizer(found, tokenizer_path, where, hint)
    vocab = _padded_vocab(read_vocab(tok), model_args.vocab_size, str(tok))
    if name is None:
        name = contents.root.name if contents.files and contents.root.name else "llama2"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error("GGUF file", out, e) from None

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(writer, model_args, vocab, qtype, name)
        for p in plan:
            writer.add_tensor_info(
                p.name,
                p.shape,
                np.dtype(np.float32),
                p.nbytes,
                raw_dtype=gguf.GGMLQuantizationType(p.ggml_type),
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(
            plan,
            desc=f"writing {out.name}",
            unit="tensor",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        from_file = bool(contents.files)  # memory-mapped source: drop its pages once converted
        for p in bar:
            raw = p.source.load()
            values = raw if p.source.qtype is None else dequantize_gguf(raw, p.source.qtype)
            data = _encode(values.reshape(p.shape), p.type)
            if data.nbytes != p.nbytes:
                raise CheckpointError(
                    f"{p.source.file}: tensor {p.source.name!r} gave {data.nbytes} bytes as {p.type}; "
                    f"expected {p.nbytes} for shape {list(p.shape)}"
                )
            writer.write_tensor_data(data)
            del data, values
            if from_file:
                release_pages(raw)
            del raw
            trim_heap()
        writer.close()

    try:
        atomic_write(out, write)  # on failure the temporary file is removed and `out` is untouched
    except OSError as e:  # e.g. a full disk
        raise write_error("GGUF file", out, e) from None
    return out
