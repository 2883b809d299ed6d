"""The registry of quantization schemes: one object per scheme, and the only place that tells them apart.

Each `Scheme` knows its module class, which `QuantConfig` options it takes (its metadata fields), the
exact bytes its module holds for an (N, K) = (out, in) linear (what `llama2.plan` counts), which shapes
it can hold, how to build an empty module (to load into) and how to quantize a float linear:

- int8: int8 (N, K) + fp32 scale per row = `N*K + 4N`; any shape.
- int4: uint8 (N, K/2) + bf16 (K/g, N, 2) scale/zero = `N*K/2 + 4*N*K/g`; K % g == 0.
- nf4: uint8 ceil(N*K/2) + fp32 absmax per block of b = `+ 4*ceil(N*K/b)`; with double quantization
  uint8 absmax + fp32 nested absmax per 256 blocks + the 256-entry fp32 code + the fp32 offset.
- q8_0, q4_0, q4_k: `N * K/block * bytes` (GGUF blocks, `gguf_blocks.GGUF_BLOCKS`: 34 bytes per 32,
  18 per 32, 144 per 256); K % block == 0.

Adding a scheme is one subclass here plus its entry in `SCHEMES` (and its name in the torch-free
`llama2.quant.schemes`, which the CLI's help shows; a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from llama2.errors import ConfigError
from llama2.quant.gguf_blocks import GGUF_BLOCKS, GGUFBlock
from llama2.quant.int4 import INT4_GROUPSIZES
from llama2.quant.linear import GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantizedLinear
from llama2.quant.nf4 import NESTED_BLOCKSIZE, NF4_BLOCKSIZES

COMMON_OPTIONS = ("compute_dtype", "include_output")  # QuantConfig fields every scheme records


class QuantOptions(Protocol):
    """The option values a scheme reads: `llama2.quant.config.QuantConfig` provides them (the registry
    sits below the config, which validates itself through `get_scheme`)."""

    @property
    def scheme(self) -> str: ...
    @property
    def groupsize(self) -> int: ...
    @property
    def blocksize(self) -> int: ...
    @property
    def double_quant(self) -> bool: ...
    @property
    def compute_dtype(self) -> str | None: ...
    @property
    def include_output(self) -> bool: ...
    @property
    def torch_compute_dtype(self) -> torch.dtype | None: ...


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme (subclasses fill in the storage layout and the module).

    Attributes:
        name: the `QuantConfig.scheme` string.
        module: the `QuantizedLinear` subclass holding a layer.
        bits: nominal bits per weight of the codes (without scales), for tables and suggestions.
        options: the scheme's own `QuantConfig` fields (recorded in metadata besides COMMON_OPTIONS).
    """

    name: str
    module: type[QuantizedLinear]
    bits: int
    options: tuple[str, ...] = ()

    def validate(self, config: QuantOptions) -> None:
        """Raise ConfigError for an option value this scheme does not take."""

    def check_shape(self, out_features: int, in_features: int, config: QuantOptions) -> None:
        """Raise ConfigError when this scheme cannot hold an (out, in) weight."""

    def storage_bytes(self, out_features: int, in_features: int, config: QuantOptions) -> int:
        """Exact bytes of the buffers of one quantized (out, in) linear (shape checked first)."""
        raise NotImplementedError

    def bytes_per_weight(self, out_features: int, in_features: int, config: QuantOptions) -> float:
        """`storage_bytes / (out * in)`: scales and any fixed tables included."""
        return self.storage_bytes(out_features, in_features, config) / (out_features * in_features)

    def empty(
        self, in_features: int, out_features: int, config: QuantOptions, device: torch.device | str
    ) -> QuantizedLinear:
        """An empty module (e.g. on `meta`) to be filled by `load_state_dict(..., assign=True)`."""
        raise NotImplementedError

    def quantize(self, linear: nn.Linear, config: QuantOptions) -> QuantizedLinear:
        """The module holding `linear`'s weight quantized (on the weight's device)."""
        raise NotImplementedError

    def metadata(self, config: QuantOptions) -> dict[str, Any]:
        """The fields that describe `config` in checkpoint metadata (read by `QuantConfig.from_metadata`)."""
        out: dict[str, Any] = {"scheme": self.name}
        out.update((key, getattr(config, key)) for key in (*self.options, *COMMON_OPTIONS))
        return out


@dataclass(frozen=True)
class Int8Scheme(Scheme):
    def storage_bytes(self, out_features: int, in_features: int, config: QuantOptions) -> int:
        return out_features * in_features + 4 * out_features  # int8 codes + float32 scale per row

    def empty(
        self, in_features: int, out_features: int, config: QuantOptions, device: torch.device | str
    ) -> QuantizedLinear:
        return Int8Linear(in_features, out_features, config.torch_compute_dtype, device)

    def quantize(self, linear: nn.Linear, config: QuantOptions) -> QuantizedLinear:
        return Int8Linear.from_linear(linear, config.torch_compute_dtype)


@dataclass(frozen=True)
class Int4Scheme(Scheme):
    def validate(self, config: QuantOptions) -> None:
        if config.groupsize not in INT4_GROUPSIZES:
            raise ConfigError(f"int4 groupsize must be one of {INT4_GROUPSIZES}, got {config.groupsize}")

    def check_shape(self, out_features: int, in_features: int, config: QuantOptions) -> None:
        if in_features % config.groupsize:
            raise ConfigError(
                f"int4 needs in_features divisible by groupsize {config.groupsize}, got {in_features}"
            )

    def storage_bytes(self, out_features: int, in_features: int, config: QuantOptions) -> int:
        self.check_shape(out_features, in_features, config)
        n, k, g = out_features, in_features, config.groupsize
        return n * (k // 2) + (k // g) * n * 2 * 2  # uint8 (N, K/2) + bf16 (K/g, N, 2)

    def empty(
        self, in_features: int, out_features: int, config: QuantOptions, device: torch.device | str
    ) -> QuantizedLinear:
        return Int4Linear(in_features, out_features, config.groupsize, config.torch_compute_dtype, device)

    def quantize(self, linear: nn.Linear, config: QuantOptions) -> QuantizedLinear:
        return Int4Linear.from_linear(linear, config.groupsize, config.torch_compute_dtype)


@dataclass(frozen=True)
class NF4Scheme(Scheme):
    def validate(self, config: QuantOptions) -> None:
        if config.blocksize not in NF4_BLOCKSIZES:
            raise ConfigError(f"nf4 blocksize must be one of {NF4_BLOCKSIZES}, got {config.blocksize}")

    def storage_bytes(self, out_features: int, in_features: int, config: QuantOptions) -> int:
        numel = out_features * in_features
        nblocks = -(-numel // config.blocksize)
        packed = (numel + 1) // 2  # two 4-bit codes per byte
        if not config.double_quant:
            return packed + 4 * nblocks  # float32 absmax per block
        nested = -(-nblocks // NESTED_BLOCKSIZE)
        return packed + nblocks + 4 * nested + 256 * 4 + 4  # uint8 absmax, fp32 nested, code, offset

    def empty(
        self, in_features: int, out_features: int, config: QuantOptions, device: torch.device | str
    ) -> QuantizedLinear:
        cd = config.torch_compute_dtype
        return NF4Linear(in_features, out_features, config.blocksize, config.double_quant, cd, device)

    def quantize(self, linear: nn.Linear, config: QuantOptions) -> QuantizedLinear:
        cd = config.torch_compute_dtype
        return NF4Linear.from_linear(linear, config.blocksize, config.double_quant, cd)


@dataclass(frozen=True)
class GGUFScheme(Scheme):
    """A GGUF block type: rows of whole blocks, stored exactly as a GGUF file holds them."""

    @property
    def block(self) -> GGUFBlock:
        return GGUF_BLOCKS[self.name]

    def check_shape(self, out_features: int, in_features: int, config: QuantOptions) -> None:
        if in_features % self.block.values:
            raise ConfigError(
                f"{self.name} needs in_features divisible by {self.block.values}, got {in_features}"
            )

    def storage_bytes(self, out_features: int, in_features: int, config: QuantOptions) -> int:
        self.check_shape(out_features, in_features, config)
        return out_features * (in_features // self.block.values) * self.block.nbytes

    def empty(
        self, in_features: int, out_features: int, config: QuantOptions, device: torch.device | str
    ) -> QuantizedLinear:
        return GGUFLinear(in_features, out_features, self.name, config.torch_compute_dtype, device)

    def quantize(self, linear: nn.Linear, config: QuantOptions) -> QuantizedLinear:
        return GGUFLinear.from_linear(linear, self.name, config.torch_compute_dtype)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Int8Scheme("int8", Int8Linear, bits=8),
        Int4Scheme("int4", Int4Linear, bits=4, options=("groupsize",)),
        NF4Scheme("nf4", NF4Linear, bits=4, options=("blocksize", "double_quant")),
        GGUFScheme("q8_0", GGUFLinear, bits=8),
        GGUFScheme("q4_0", GGUFLinear, bits=4),
        GGUFScheme("q4_k", GGUFLinear, bits=4),
    )
}


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`.

    Raises:
        ConfigError: no such scheme.
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise ConfigError(
            f"unknown quantization scheme {name!r}; expected one of {', '.join(SCHEMES)}"
        ) from None


def storage_bytes(out_features: int, in_features: int, config: QuantOptions) -> int:
    """Exact bytes of one (out, in) linear quantized with `config` (ConfigError if it cannot hold it)."""
    return get_scheme(config.scheme).storage_bytes(out_features, in_features, config)


__all__ = [
    "COMMON_OPTIONS",
    "SCHEMES",
    "GGUFScheme",
    "Int4Scheme",
    "Int8Scheme",
    "NF4Scheme",
    "QuantOptions",
    "Scheme",
    "get_scheme",
    "storage_bytes",
]
