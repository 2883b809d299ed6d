"""`llama2 quantize`: convert a checkpoint of any supported format to a quantized one.

Two outputs:
  - our format (`params.json` + `model.safetensors` + `tokenizer.model`), any scheme of
    `llama2.quant` (int8, int4, nf4, q8_0, q4_0, q4_k), the scheme recorded in the safetensors
    metadata so `load_model` rebuilds the same modules without re-quantizing;
  - GGUF (`.gguf`, llama.cpp's format), for f32, f16, bf16, q8_0, q4_0 and q4_k.

Both stream: the source is read tensor by tensor from its memory map, so memory stays near the
quantized size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import save_checkpoint
from llama2.errors import ConfigError
from llama2.gguf_vocab import is_gguf, save_sentencepiece
from llama2.outpath import check_output_path, write_error
from llama2.quant.convert import parse_quant_spec, quantization_metadata

OutputFormat = Literal["llama2", "gguf"]
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k")


def quantize_checkpoint(
    source: Path | str,
    out: Path | str,
    scheme: str,
    *,
    output_format: OutputFormat = "llama2",
    tokenizer_path: Path | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write a quantized copy of `source`.

    Args:
        source: a checkpoint folder or file in any format `load_model` reads.
        out: the folder to write (our format) or the `.gguf` file to write (GGUF).
        scheme: our format: a `parse_quant_spec` spec ("nf4", "int4,groupsize=64", ...); GGUF: one
            of f32, f16, bf16, q8_0, q4_0, q4_k.
        output_format: "llama2" or "gguf".
        tokenizer_path: the tokenizer to store with the weights; default: the checkpoint's.
        dtype: our format: dtype of the layers that stay in floating point (embeddings, norms,
            output head); default: the checkpoint's.
        progress: show progress bars on stderr.

    Returns:
        The path written.

    Raises:
        ConfigError: an unknown scheme or format, a layer shape the scheme cannot hold, or an output
            path that cannot be written (checked before the source is read).
        CheckpointError: the source cannot be read.
    """
    if output_format == "gguf":
        if scheme not in GGUF_TYPES:
            raise ConfigError(f"GGUF output supports {', '.join(GGUF_TYPES)}; got {scheme!r}")
        from llama2.checkpoint.gguf_export import export_gguf

        return export_gguf(source, out, scheme, tokenizer_path=tokenizer_path, progress=progress)
    if output_format != "llama2":
        raise ConfigError(f"unknown output format {output_format!r}; expected llama2 or gguf")
    config = parse_quant_spec(scheme)
    if config is None:  # parse_quant_spec returns None only for None
        raise ConfigError("a quantization scheme is required")
    check_output_path(out, folder=True, what="output folder")  # before the model is loaded
    loaded = load_model(source, dtype=dtype, progress=progress, quantize=config)
    tokenizer = tokenizer_path if tokenizer_path is not None else loaded.tokenizer_path
    from_gguf = tokenizer is not None and is_gguf(tokenizer)
    try:
        written = save_checkpoint(
            loaded.model,
            loaded.args,
            out,
            tokenizer_path=None if from_gguf else tokenizer,
            metadata=quantization_metadata(config),
        )
        if from_gguf and tokenizer is not None:  # rebuild a SentencePiece model from the GGUF vocabulary
            save_sentencepiece(tokenizer, written / "tokenizer.model")
    except OSError as e:  # e.g. a full disk; each file is replaced atomically, so none is half-written
        raise write_error("output folder", out, e) from None
    return written
