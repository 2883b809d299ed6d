"""The one table of float dtype names every command and API accepts.

Spellings (case-insensitive): `float32` / `fp32` / `f32`, `bfloat16` / `bf16`, `float16` / `fp16` /
`f16` / `half` -- the union of what `llama2.api`, `llama2 plan`, `llama2 bench`, `llama2 serve` and the
CLI accepted before they shared this table. Names are plain strings here (torch is imported only when
a name is turned into a `torch.dtype`), so the CLI can list them without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama2.errors import ConfigError

if TYPE_CHECKING:
    import torch

CANONICAL: tuple[str, ...] = ("float32", "bfloat16", "float16")  # torch attribute names
ALIASES: dict[str, str] = {  # every accepted spelling -> its canonical name
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}
DTYPE_NAMES: tuple[str, ...] = tuple(ALIASES)  # for argparse `choices=`


def canonical_name(name: str) -> str:
    """'bf16' -> 'bfloat16'.

    Raises:
        ConfigError: a name not in the table.
    """
    try:
        return ALIASES[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ConfigError(
            f"unknown dtype {name!r}; expected one of {', '.join(CANONICAL)} "
            f"(or {', '.join(a for a in ALIASES if a not in CANONICAL)})"
        ) from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A float dtype from any spelling in the table, or a `torch.dtype` of the table (returned as is).

    Raises:
        ConfigError: an unknown name, or a torch dtype outside float32/bfloat16/float16.
    """
    import torch

    if isinstance(name, torch.dtype):
        if dtype_name(name) not in CANONICAL:
            raise ConfigError(f"dtype must be one of {', '.join(CANONICAL)}, got {name}")
        return name
    dtype: torch.dtype = getattr(torch, canonical_name(name))
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (any dtype: its torch name without the `torch.` prefix)."""
    return str(dtype).removeprefix("torch.")


def dtype_table() -> dict[str, torch.dtype]:
    """Every accepted spelling -> its torch dtype."""
    import torch

    return {alias: getattr(torch, name) for alias, name in ALIASES.items()}


__all__ = [
    "ALIASES",
    "CANONICAL",
    "DTYPE_NAMES",
    "canonical_name",
    "dtype_name",
    "dtype_table",
    "parse_dtype",
]
