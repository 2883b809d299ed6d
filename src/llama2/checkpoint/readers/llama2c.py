"""Reader of karpathy/llama2.c `.bin` files (v0 legacy header or v1 "ak42" header), float32 weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint, read_llama2c_header
from llama2.checkpoint.readers.common import config_error
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError

LLAMA2C_NORM_EPS = 1e-5  # llama2.c run.c hard-codes these; the file does not store them
LLAMA2C_ROPE_THETA = 10000.0


def read_llama2c(found: DetectedCheckpoint) -> CheckpointContents:
    file = found.weight_files[0]
    header = read_llama2c_header(file)
    if header is None:
        raise CheckpointError(f"{file}: not a llama2.c file (its header holds no plausible model shape)")
    size = file.stat().st_size
    offset = header.header_bytes
    layout: list[tuple[str, tuple[int, ...], int]] = []  # (name, shape, byte offset)
    for name, shape in header.tensor_shapes():
        nbytes = 4 * int(np.prod(shape))
        if offset + nbytes > size:
            raise CheckpointError(
                f"{file}: truncated llama2.c file: tensor {name!r} needs bytes {offset}..{offset + nbytes} "
                f"but the file has {size} bytes"
            )
        layout.append((name, shape, offset))
        offset += nbytes
    if offset != size:
        raise CheckpointError(
            f"{file}: llama2.c file has {size - offset} bytes after the last tensor; expected exactly "
            f"{offset} bytes for the shape in its header"
        )
    # Copy-on-write map: pages are read lazily and never written back to the file.
    data = np.memmap(file, dtype=np.float32, mode="c", offset=header.header_bytes)
    base = header.header_bytes

    def view(shape: tuple[int, ...], byte_offset: int) -> Callable[[], Tensor]:
        start = (byte_offset - base) // 4
        count = int(np.prod(shape))
        return lambda: torch.from_numpy(data[start : start + count]).view(shape)

    sources: list[TensorSource] = []
    emb_loader: Callable[[], Tensor] | None = None
    for name, shape, byte_offset in layout:
        if name in keymaps.LLAMA2C_ROPE_TABLES:
            continue
        loader = view(shape, byte_offset)
        if name == "tok_embeddings.weight":
            emb_loader = loader
        sources.append(TensorSource(name, file, shape, torch.float32, loader))
    if header.shared_classifier and emb_loader is not None:
        shared = emb_loader  # Llama 2's head is untied: give the output its own copy
        sources.append(
            TensorSource(
                "output.weight",
                file,
                (header.vocab_size, header.dim),
                torch.float32,
                lambda: shared().clone(),
            )
        )
    try:
        args = ModelArgs(
            dim=header.dim,
            n_layers=header.n_layers,
            n_heads=header.n_heads,
            n_kv_heads=None if header.n_kv_heads == header.n_heads else header.n_kv_heads,
            vocab_size=header.vocab_size,
            hidden_dim=header.hidden_dim,
            norm_eps=LLAMA2C_NORM_EPS,
            rope_theta=LLAMA2C_ROPE_THETA,
            max_seq_len=header.seq_len,
        )
    except ConfigError as e:
        raise config_error(file, e) from None
    return CheckpointContents(
        CheckpointFormat.LLAMA2C, args, sources, (file,), found.root, {"llama2c_version": str(header.version)}
    )
