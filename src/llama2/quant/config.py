"""`QuantConfig`, how to quantize a model's linear layers, and the `--quantize` spec parsers.

A config is validated by its scheme's registry entry (`llama2.quant.registry`); `llama2.quant.convert`
applies it to a model (and re-exports everything here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llama2.dtypes import canonical_name, parse_dtype
from llama2.errors import ConfigError
from llama2.quant.registry import COMMON_OPTIONS, SCHEMES, get_scheme

_SPEC_KEYS = (*dict.fromkeys(o for s in SCHEMES.values() for o in s.options), *COMMON_OPTIONS)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model's linear layers.

    Attributes:
        scheme: "int8", "int4", "nf4", "q8_0", "q4_0" or "q4_k".
        groupsize: int4 values per scale/zero pair (32, 64, 128 or 256).
        blocksize: NF4 values per absmax (QLoRA: 64).
        double_quant: NF4 only: 8-bit quantize the absmax values (blocks of 256).
        compute_dtype: "float32", "bfloat16", "float16", or None for the activations' dtype.
        include_output: also quantize the output head (`output`).
    """

    scheme: str
    groupsize: int = 128
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str | None = None
    include_output: bool = False

    def __post_init__(self) -> None:
        get_scheme(self.scheme).validate(self)
        if self.compute_dtype is not None:  # any spelling of llama2.dtypes, kept as its canonical name
            try:
                name = canonical_name(self.compute_dtype)
            except ConfigError as err:
                raise ConfigError(f"compute_dtype: {err} (or None for the activations' dtype)") from None
            object.__setattr__(self, "compute_dtype", name)

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else parse_dtype(self.compute_dtype)

    def to_metadata(self) -> dict[str, Any]:
        """The fields that describe this scheme, for checkpoint metadata."""
        return get_scheme(self.scheme).metadata(self)

    def spec(self) -> str:
        """The shortest spec `parse_quant_spec` turns back into this config: `int4,groupsize=64`."""
        default = QuantConfig(self.scheme)
        options = [
            f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in self.to_metadata().items()
            if k != "scheme" and v != getattr(default, k)
        ]
        return ",".join([self.scheme, *options])

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> QuantConfig:
        """Inverse of `to_metadata`; raises ConfigError on unknown keys or values."""
        known = {"scheme", *_SPEC_KEYS}
        extra = set(meta) - known
        if "scheme" not in meta or extra:
            raise ConfigError(
                f"quantization metadata needs 'scheme' and only the keys {sorted(known)}; got {sorted(meta)}"
            )
        return cls(**meta)


def parse_quant_spec(spec: str | QuantConfig | None) -> QuantConfig | None:
    """Parse `"nf4"`, `"int4,groupsize=64"`, `"q4_0,include_output=true"`, `"nf4,double_quant=false"`.

    The first comma-separated item is the scheme (any case; `none` alone: None, float weights); the
    others are `QuantConfig` fields as `key=value`.

    Raises:
        ConfigError: unknown scheme, unknown field or a value of the wrong type.
    """
    if spec is None or isinstance(spec, QuantConfig):
        return spec
    scheme, *options = [part.strip() for part in spec.split(",")]
    scheme = scheme.lower()
    if scheme in ("none", "float") and not options:  # float weights, as `--quantize none` says
        return None
    fields: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _SPEC_KEYS:
            raise ConfigError(
                f"bad quantization option {option!r} in {spec!r}; expected key=value with key one of "
                f"{', '.join(_SPEC_KEYS)}"
            )
        value = value.strip()
        if key in ("groupsize", "blocksize"):
            try:
                fields[key] = int(value)
            except ValueError:
                raise ConfigError(f"quantization option {key} must be an integer, got {value!r}") from None
        elif key in ("double_quant", "include_output"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"quantization option {key} must be true or false, got {value!r}")
            fields[key] = value.lower() in ("true", "1", "yes")
        else:
            fields[key] = value
    return QuantConfig(scheme, **fields)


def parse_quant_specs(text: str) -> list[QuantConfig | None]:
    """A comma-separated list of specs, each option attached to the scheme before it:
    `"none,int8,int4,groupsize=64,nf4"` -> [None, int8, int4 (groupsize 64), nf4] (`none`: float weights).

    Raises:
        ConfigError: an empty list, an option before any scheme, or a bad spec (`parse_quant_spec`).
    """
    groups: list[list[str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            if not groups or groups[-1][0].lower() in ("none", "float"):
                raise ConfigError(f"quantization option {part!r} in {text!r} follows no scheme")
            groups[-1].append(part)
        else:
            groups.append([part])
    if not groups:
        raise ConfigError(f"no quantization scheme in {text!r}; expected e.g. none,int8,int4,groupsize=64")
    return [parse_quant_spec(",".join(g)) for g in groups]


__all__ = ["QuantConfig", "parse_quant_spec", "parse_quant_specs"]
