"""Read and validate a karpathy/llama2.c `.bin` header (v0 legacy or v1 "ak42").

The header holds seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len);
the float32 weights follow in a fixed order. Every field is bounded (`llama2.limits.BOUNDS`) before it
is used, and the file size the shape implies is computed arithmetically (nothing is allocated per
layer), so a small file claiming a huge shape is refused at once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from llama2.errors import CheckpointError
from llama2.limits import BOUNDS

LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
LLAMA2C_V1_HEADER_BYTES = 256
LLAMA2C_V0_HEADER_BYTES = 28  # 7 x int32
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


def read_head(path: Path, n: int) -> bytes:
    """The first `n` bytes of a file (fewer if it is shorter); `CheckpointError` if unreadable."""
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None


@dataclass(frozen=True)
class Llama2cHeader:
    """The shape stored in a llama2.c `.bin` header."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here
    seq_len: int
    shared_classifier: bool
    header_bytes: int

    def _templates(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name template, shape) in file order; `{i}` templates repeat once per layer."""
        from llama2.checkpoint.keymaps import LLAMA2C_V0_ORDER, LLAMA2C_V1_ORDER

        hd = self.dim // self.n_heads
        kv = self.n_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "tok_embeddings.weight": (self.vocab_size, self.dim),
            "norm.weight": (self.dim,),
            "output.weight": (self.vocab_size, self.dim),
            "freq_cis_real": (self.seq_len, hd // 2),
            "freq_cis_imag": (self.seq_len, hd // 2),
            "layers.{i}.attention_norm.weight": (self.dim,),
            "layers.{i}.ffn_norm.weight": (self.dim,),
            "layers.{i}.attention.wq.weight": (self.n_heads * hd, self.dim),
            "layers.{i}.attention.wk.weight": (kv, self.dim),
            "layers.{i}.attention.wv.weight": (kv, self.dim),
            "layers.{i}.attention.wo.weight": (self.dim, self.n_heads * hd),
            "layers.{i}.feed_forward.w1.weight": (self.hidden_dim, self.dim),
            "layers.{i}.feed_forward.w2.weight": (self.dim, self.hidden_dim),
            "layers.{i}.feed_forward.w3.weight": (self.hidden_dim, self.dim),
        }
        order = LLAMA2C_V0_ORDER if self.version == 0 else LLAMA2C_V1_ORDER
        return [(t, shapes[t]) for t in order if not (t == "output.weight" and self.shared_classifier)]

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor in file order (including v0's rope tables)."""
        out: list[tuple[str, tuple[int, ...]]] = []
        for template, shape in self._templates():
            copies = self.n_layers if "{i}" in template else 1
            out.extend((template.format(i=i), shape) for i in range(copies))
        return out

    def expected_file_size(self) -> int:
        """Bytes the header's shape implies (header + float32 weights), computed without a per-layer list."""
        n = 0
        for template, shape in self._templates():
            copies = self.n_layers if "{i}" in template else 1
            n += copies * _count(shape)
        return self.header_bytes + 4 * n

    def check_size(self, path: Path, size: int) -> None:
        """Refuse a file whose size is not exactly the shape's, naming the first tensor cut off.

        Raises:
            CheckpointError: truncated (with the tensor and its byte range) or with trailing bytes.
        """
        offset = self.header_bytes
        for template, shape in self._templates():
            nbytes = 4 * _count(shape)
            copies = self.n_layers if "{i}" in template else 1
            if offset + copies * nbytes > size:
                i = max(size - offset, 0) // nbytes if nbytes else 0
                start = offset + i * nbytes
                raise CheckpointError(
                    f"{path}: truncated llama2.c file: tensor {template.format(i=i)!r} needs bytes "
                    f"{start}..{start + nbytes} but the file has {size} bytes"
                )
            offset += copies * nbytes
        if offset != size:
            raise CheckpointError(
                f"{path}: llama2.c file has {size - offset} bytes after the last tensor; expected exactly "
                f"{offset} bytes for the shape in its header"
            )


def _count(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def shape_problem(ints: tuple[int, ...]) -> str | None:
    """Why seven header ints are not a model shape this package can run, or None when they are."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
    for name, value in zip(_FIELDS, (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len), strict=True):
        if value not in BOUNDS[name]:
            return f"{name} {value} is outside {BOUNDS[name]}"
    if dim % n_heads or (dim // n_heads) % 2:
        return f"dim {dim} is not n_heads {n_heads} times an even head dimension"
    if n_heads % n_kv:
        return f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}"
    return None


def read_llama2c_header(path: Path) -> Llama2cHeader | None:
    """Parse a llama2.c header; None when the file is not a llama2.c file.

    A v1+ file is recognised by its magic, and must then have a bounded shape and exactly the size that
    shape implies. A v0 file (no magic) is recognised by a plausible shape whose weights fit the file:
    a file at most as large as the shape implies is taken as (possibly truncated) v0.

    Raises:
        CheckpointError: a v1 file with an unsupported version, a shared-classifier flag other than 0
            or 1, an impossible or out-of-bounds shape, or a size other than its shape's (naming the
            first tensor cut off).
    """
    head = read_head(path, LLAMA2C_V1_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise CheckpointError(
                f"{path}: llama2.c file version {version} is not supported; expected version 1 (float32) "
                "after the ak42 magic (version 0 files have no magic). Version 2 is Q8_0-quantized: "
                "re-export it as float32 with llama2.c export.py"
            )
        if len(head) < 8 + 28 + 1:
            raise CheckpointError(f"{path}: truncated llama2.c v1 header ({len(head)} bytes, expected 256)")
        ints = struct.unpack("<7i", head[8:36])
        problem = shape_problem(ints) or ("vocab_size is negative" if ints[5] < 0 else None)
        if problem:
            raise CheckpointError(f"{path}: llama2.c v1 header holds an impossible shape {ints}: {problem}")
        if head[36] not in (0, 1):  # export.py writes the flag as one byte, 0 or 1
            raise CheckpointError(
                f"{path}: llama2.c v1 header has shared-classifier flag {head[36]} at byte 36; expected 0 "
                "(separate output.weight) or 1 (output shares tok_embeddings.weight)"
            )
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
        header = Llama2cHeader(
            1, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, head[36] == 1, LLAMA2C_V1_HEADER_BYTES
        )
        header.check_size(path, path.stat().st_size)
        return header
    if len(head) < LLAMA2C_V0_HEADER_BYTES:
        return None
    ints = struct.unpack("<7i", head[:28])
    if shape_problem(ints) is not None:
        return None
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
    header = Llama2cHeader(
        0, dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0, LLAMA2C_V0_HEADER_BYTES
    )
    size = path.stat().st_size
    # More than a small fraction of the implied size, and not larger: a v0 file (maybe truncated).
    if size > header.expected_file_size() or size < LLAMA2C_V0_HEADER_BYTES + 4 * dim:
        return None
    return header
