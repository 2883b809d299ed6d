"""Bounds on every number read from a config file or a checkpoint header, in one table.

Each bound is generous (it admits every published Llama 2 / Code Llama / TinyLlama / llama2.c shape
with a wide margin) but finite, so a corrupt or hostile file is refused with a one-line error before
anything is allocated from its numbers. The checkers here convert nothing: a string, `null`, a list or
a `bool` where a number belongs is refused, as is a non-finite float (`1e400` parses to inf).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from llama2.errors import ConfigError, Llama2Error


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; each end is inclusive unless marked open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{_num(self.low)}, {_num(self.high)}{right}"

    @property
    def max(self) -> int:
        """The upper bound as an int (for counts and sizes)."""
        return int(self.high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


MiB = 1 << 20

# The one table. Model-shape keys are `ModelArgs` field names.
BOUNDS: dict[str, Range] = {
    # ---- model shape (ModelArgs)
    "dim": Range(1, 1 << 16),  # model width; 70B and Code Llama 34B use 8192
    "n_layers": Range(1, 1024),  # 70B has 80 layers
    "n_heads": Range(1, 1024),  # 70B and 34B have 64 query heads
    "n_kv_heads": Range(1, 1024),  # 70B/34B: 8 (grouped-query attention); must also divide n_heads
    "vocab_size": Range(1, 1 << 20),  # Llama 2: 32000, Code Llama: 32016; ~1M leaves room for any tokenizer
    "multiple_of": Range(1, 1 << 16),  # 70B rounds its FFN width to 4096
    "hidden_dim": Range(1, 1 << 20),  # FFN width; 70B: 28672 (3.5 x dim); 1M = 16 x the widest dim
    "ffn_dim_multiplier": Range(0, 16, low_open=True),  # 70B: 1.3, Code Llama 34B: 1.0
    "max_seq_len": Range(1, 1 << 22),  # context; Llama 2: 4096, Code Llama: 16k trained, 100k usable
    "norm_eps": Range(0, 1, low_open=True, high_open=True),  # RMSNorm epsilon; real: 1e-5 / 1e-6
    "rope_theta": Range(0, 1e12, low_open=True),  # rotary base; Llama 2: 1e4, Code Llama: 1e6
    "rope_scaling_factor": Range(1, 1024),  # position interpolation factor; 4..32 in practice
    # ---- files and containers
    "json_bytes": Range(0, 16 * MiB),  # a config/index JSON; a 70B index.json is ~30 KiB
    "json_depth": Range(0, 64),  # nesting of any JSON we read; real configs nest 3 levels
    "safetensors_header_bytes": Range(0, 16 * MiB),  # 70B's 723-tensor header is ~90 KiB (crate: 100 MB)
    "tensors_per_file": Range(0, 65536),  # 70B has 723 tensors; quantized files a few times more
    "tensor_ndim": Range(0, 8),  # safetensors entries: our tensors have at most 2 dimensions
    "gguf_kv_count": Range(0, 65536),  # llama.cpp writes ~40 metadata keys
    "gguf_tensor_ndim": Range(1, 4),  # GGML_MAX_DIMS is 4
    "gguf_alignment": Range(1, 1 << 16),  # general.alignment; llama.cpp's default is 32
    "gguf_array_depth": Range(0, 64),  # arrays of arrays in GGUF metadata; real files use none
}

# GGUF stores each dimension as a uint64; a single dimension beyond this cannot be a real tensor and
# would overflow ggml's int64 element counts.
GGUF_MAX_DIM = 1 << 40


def _show(value: Any) -> str:
    """A short rendering of a bad value for a one-line message (never thousands of characters)."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def check_int(value: Any, key: str, name: str | None = None, error: type[Llama2Error] = ConfigError) -> int:
    """`value` as an int within `BOUNDS[key]`; `bool`, floats and strings are refused.

    Args:
        value: the value read from a file.
        key: the bounds table's key.
        name: the field's name in the message (default: `key`).
        error: the exception class to raise.
    """
    bounds = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value not in bounds:
        raise error(f"{name or key} must be an integer in {bounds}, got {_show(value)}")
    return int(value)


def check_float(
    value: Any, key: str, name: str | None = None, error: type[Llama2Error] = ConfigError
) -> float:
    """`value` as a finite float within `BOUNDS[key]`; ints are accepted, `bool` and strings are not."""
    bounds = BOUNDS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name or key} must be a number in {bounds}, got {_show(value)}")
    number = float(value)
    if not math.isfinite(number) or number not in bounds:
        raise error(f"{name or key} must be a finite number in {bounds}, got {_show(value)}")
    return number


def check_count(value: int, key: str, what: str, error: type[Llama2Error] = ConfigError) -> int:
    """Refuse a count (entries, keys, bytes) above `BOUNDS[key]`."""
    if value > BOUNDS[key].max:
        raise error(f"{what} is {value}; at most {BOUNDS[key].max} is supported (file corrupt?)")
    return value


def json_depth_ok(data: Any, limit: int) -> bool:
    """Whether `data` (parsed JSON) nests at most `limit` levels (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def loads_json(raw: bytes | str, source: str, error: type[Llama2Error] = ConfigError) -> Any:
    """Parse JSON from a file's bytes with bounded size and nesting.

    Raises:
        error: naming `source`: too large, not JSON (including integers of thousands of digits),
            or nested deeper than `BOUNDS["json_depth"]`.
    """
    limit = BOUNDS["json_bytes"].max
    if len(raw) > limit:
        raise error(f"{source}: {len(raw)} bytes is too large for a JSON config (at most {limit})")
    try:
        data = json.loads(raw)
    except RecursionError:
        data = None
        depth_error = True
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and int digit-count limits
        raise error(f"{source}: not valid JSON ({_one_line(e)})") from None
    else:
        depth_error = not json_depth_ok(data, BOUNDS["json_depth"].max)
    if depth_error:
        raise error(f"{source}: JSON nested deeper than {BOUNDS['json_depth'].max} levels (file corrupt?)")
    return data


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."
