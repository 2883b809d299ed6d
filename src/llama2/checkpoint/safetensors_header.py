"""Read and validate a safetensors header before any tensor is created.

Layout: 8-byte little-endian header length N, N bytes of JSON (tensor name -> {dtype, shape,
data_offsets}, plus an optional `__metadata__` of strings), then the tensor data. Everything is
checked against the file before a tensor is touched: the header's length and entry count are bounded
(`llama2.limits.BOUNDS`), each dtype is one safetensors defines, each shape a short list of
non-negative integers, and each entry's byte range is exactly its shape times its element size;
sorted by offset, the ranges tile the data region from its start to the end of the file, with no gap
and no overlap (the rule the safetensors crate enforces when it opens the file).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from llama2.errors import CheckpointError
from llama2.limits import BOUNDS, json_depth_ok

# The largest header length `sniff` accepts as "this is a safetensors file" (the safetensors crate's
# own limit); `read_safetensors_header` then refuses anything above BOUNDS["safetensors_header_bytes"].
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024

# Bytes per element of every dtype the safetensors format defines (sub-byte float types excluded).
SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class _TooMany(Exception):
    """Raised from inside the JSON parser once the header holds more objects than allowed."""


def _bounded_pairs_hook(limit: int) -> Any:
    """A `json` object hook that stops parsing after `limit` objects and refuses duplicate keys."""
    seen = [0]

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen[0] += 1
        if seen[0] > limit:
            raise _TooMany
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"key {key!r:.60} appears twice")
            out[key] = value
        return out

    return hook


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header and check every entry against the file (see the module docstring).

    Returns:
        (header, data_start): the JSON header (tensor name -> {dtype, shape, data_offsets}, plus an
        optional `__metadata__`), and the byte offset where tensor data begins.

    Raises:
        CheckpointError: naming the file (and the tensor) when truncated, too large or malformed.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            limit = BOUNDS["safetensors_header_bytes"].max
            if n > limit:
                raise CheckpointError(
                    f"{path}: safetensors header length {n} is larger than the {limit} bytes supported "
                    "(file corrupt?)"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: header needs {8 + n} bytes, file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from None
    max_entries = BOUNDS["tensors_per_file"].max
    too_many = f"{path}: safetensors header holds more than {max_entries} entries (file corrupt?)"
    if raw.count(b'"data_offsets"') > max_entries:  # a fast first look; the parse hook below is exact
        raise CheckpointError(too_many)
    try:
        # Objects: one per tensor entry, the metadata and the header itself.
        header = json.loads(raw, object_pairs_hook=_bounded_pairs_hook(max_entries + 2))
    except _TooMany:
        raise CheckpointError(too_many) from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # includes json.JSONDecodeError
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: corrupt safetensors header ({detail})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    if not json_depth_ok(header, 3):
        raise CheckpointError(f"{path}: corrupt safetensors header (values nested too deeply)")
    data_start = 8 + n
    _check_entries(path, header, size - data_start, data_start)
    return header, data_start


def _check_entries(path: Path, header: dict[str, Any], data_size: int, data_start: int) -> None:
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    spans: list[tuple[int, int, str]] = []
    max_ndim = BOUNDS["tensor_ndim"].max
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{path}: tensor {name!r:.80}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what}: header entry must be an object with dtype, shape, data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(
                f"{what}: unknown dtype {dtype!r:.40}; expected one of {', '.join(SAFETENSORS_DTYPE_BYTES)}"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > max_ndim
            or not all(_is_index(s) for s in shape)
        ):
            raise CheckpointError(
                f"{what}: shape {shape!r:.60} must be a list of at most {max_ndim} non-negative integers"
            )
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(v) for v in offsets):
            raise CheckpointError(f"{what} has no valid data_offsets (expected [begin, end] byte offsets)")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{what}: data_offsets [{begin}, {end}] end before they begin")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if end - begin != nbytes:
            raise CheckpointError(
                f"{what}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} of "
                f"{dtype} needs {nbytes}"
            )
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r:.80} needs bytes "
                f"{data_start + begin}..{data_start + end} but the file has {data_start + data_size} bytes"
            )
        if begin != expected:
            kind = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r:.80} starts at data byte {begin}, "
                f"which {kind} (expected {expected})"
            )
        expected = end
    if expected != data_size:
        raise CheckpointError(
            f"{path}: safetensors file has {data_size - expected} bytes after the last tensor; expected "
            f"exactly {data_start + expected} bytes"
        )


def _is_index(value: Any) -> bool:
    """A JSON non-negative integer (`bool` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (validated)."""
    header, _ = read_safetensors_header(path)
    return [k for k in header if k != "__metadata__"]
