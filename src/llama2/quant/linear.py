"""Quantized drop-in replacements for bias-free `nn.Linear` layers.

Every module keeps its quantized tensors as buffers (so `state_dict()` / `load_state_dict(...,
assign=True)` move them without re-quantizing) and computes `y = x @ W.T` in `compute_dtype`
(default: the input's dtype), returning the input's dtype. The main buffer is always `weight`
(an integer tensor), so code that asks `module.weight.is_floating_point()` sees a quantized layer.

Build one from a float layer with `Cls.from_linear(linear, ...)`, or an empty one with the
constructor (any device, `meta` included) and load a saved state dict into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.errors import ConfigError
from llama2.quant.gguf_blocks import BLOCK_SIZES, dequantize_gguf, quantize_gguf
from llama2.quant.int4 import (
    cpu_int4_kernel_available,
    cpu_kernel_fits,
    dequantize_int4,
    int4_matmul_cpu,
    pack_for_cpu_kernel,
    quantize_int4,
)
from llama2.quant.int8 import dequantize_int8, quantize_int8
from llama2.quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4, quantize_nf4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_linear(linear: nn.Linear) -> None:
    if linear.bias is not None:
        raise ConfigError("quantized linear layers support bias-free nn.Linear only (Llama has no biases)")


class QuantizedLinear(nn.Module):
    """Base class: subclasses provide `dequantize_weight` and may override `_matmul`."""

    scheme: str = ""
    weight: Tensor

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {_FLOAT_DTYPES} or None, got {compute_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out_features, in_features) weight in `dtype`."""
        raise NotImplementedError

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize_weight(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features) in x's dtype."""
        dtype = self.compute_dtype or x.dtype
        return self._matmul(x.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
            f"compute_dtype={self.compute_dtype}"
        )


class Int8Linear(QuantizedLinear):
    """Weight-only int8, per output channel: buffers `weight` (N, K) int8 and `scales` (N,) float32."""

    scheme = "int8"
    scales: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> Int8Linear:
        _check_linear(linear)
        mod = cls(linear.in_features, linear.out_features, compute_dtype, device=linear.weight.device)
        mod.weight, mod.scales = quantize_int8(linear.weight)
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # (..., N)


class Int4Linear(QuantizedLinear):
    """Weight-only int4, groupwise asymmetric (gpt-fast).

    Buffers `weight` (N, K/2) uint8 and `scales_and_zeros` (K/groupsize, N, 2) bfloat16. On CPU
    the codes are repacked once for `_weight_int4pack_mm_for_cpu` when available and the shape
    fits (`use_kernel=None` means "when possible"); otherwise the weight is dequantized per call.
    """

    scheme = "int4"
    scales_and_zeros: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groupsize: int = 128,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        use_kernel: bool | None = None,
    ) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        if in_features % groupsize:
            raise ConfigError(
                f"int4 needs in_features divisible by groupsize; "
                f"got in_features={in_features}, groupsize={groupsize}"
            )
        self.groupsize = groupsize
        self.use_kernel = use_kernel
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales_and_zeros",
            torch.zeros(in_features // groupsize, out_features, 2, dtype=torch.bfloat16, device=device),
        )
        self._kernel_weight: Tensor | None = None
        self._kernel_key: tuple[int, int] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        groupsize: int = 128,
        compute_dtype: torch.dtype | None = None,
        use_kernel: bool | None = None,
    ) -> Int4Linear:
        _check_linear(linear)
        mod = cls(
            linear.in_features,
            linear.out_features,
            groupsize,
            compute_dtype,
            linear.weight.device,
            use_kernel,
        )
        mod.weight, mod.scales_and_zeros = quantize_int4(linear.weight, groupsize)
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize, dtype)

    def kernel_usable(self) -> bool:
        """Whether the forward will use the CPU int4 kernel."""
        possible = (
            self.weight.device.type == "cpu"
            and cpu_int4_kernel_available()
            and cpu_kernel_fits(self.out_features, self.in_features, self.groupsize)
        )
        if self.use_kernel and not possible:
            raise ConfigError(
                "the CPU int4 kernel needs torch's _weight_int4pack_mm_for_cpu, a CPU weight, "
                f"out_features % 16 == 0 and in_features % groupsize == 0; got {self.out_features}x"
                f"{self.in_features}, groupsize {self.groupsize}"
            )
        return possible if self.use_kernel is None else self.use_kernel

    def _packed_for_kernel(self) -> Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._kernel_weight is None or self._kernel_key != key:
            self._kernel_weight = pack_for_cpu_kernel(self.weight)  # repacked once per weight tensor
            self._kernel_key = key
        return self._kernel_weight

    def _matmul(self, x: Tensor) -> Tensor:
        if self.kernel_usable():
            return int4_matmul_cpu(x, self._packed_for_kernel(), self.scales_and_zeros, self.groupsize)
        return F.linear(x, self.dequantize_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groupsize={self.groupsize}"


class NF4Linear(QuantizedLinear):
    """QLoRA NF4 with optional double quantization, bitsandbytes' layout.

    Buffers: `weight` (ceil(N*K/2), 1) uint8; `absmax` (nblocks,) float32, or uint8 when
    double-quantized, with `nested_absmax` (ceil(nblocks/256),) float32, `nested_code` (256,)
    float32 and `offset` () float32.
    """

    scheme = "nf4"
    absmax: Tensor
    nested_absmax: Tensor
    nested_code: Tensor
    offset: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.blocksize = blocksize
        self.double_quant = double_quant
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("absmax", torch.zeros(nblocks, dtype=absmax_dtype, device=device))
        if double_quant:
            n_nested = -(-nblocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.zeros(n_nested, dtype=torch.float32, device=device))
            self.register_buffer("nested_code", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        _check_linear(linear)
        mod = cls(
            linear.in_features,
            linear.out_features,
            blocksize,
            double_quant,
            compute_dtype,
            linear.weight.device,
        )
        q = quantize_nf4(linear.weight, blocksize, double_quant)
        mod.weight, mod.absmax = q.packed, q.absmax
        if q.nested_absmax is not None and q.nested_code is not None and q.offset is not None:
            mod.nested_absmax, mod.nested_code, mod.offset = q.nested_absmax, q.nested_code, q.offset
        return mod

    def nf4_tensor(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor`."""
        shape = torch.Size((self.out_features, self.in_features))
        if not self.double_quant:
            return NF4Tensor(self.weight, self.absmax, shape, torch.float32, self.blocksize)
        return NF4Tensor(
            self.weight,
            self.absmax,
            shape,
            torch.float32,
            self.blocksize,
            self.nested_absmax,
            self.nested_code,
            self.offset,
        )

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self.nf4_tensor(), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}"


class GGUFLinear(QuantizedLinear):
    """Keeps a GGUF block-quantized weight (`weight`: (N, K / block * bytes) uint8) and
    dequantizes it at forward time."""

    scheme = "gguf"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: str = "q8_0",
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        if qtype not in BLOCK_SIZES:
            raise ConfigError(f"unknown GGUF block type {qtype!r}; expected one of {', '.join(BLOCK_SIZES)}")
        block, nbytes = BLOCK_SIZES[qtype]
        if in_features % block:
            raise ConfigError(f"{qtype} needs in_features divisible by {block}, got {in_features}")
        self.qtype = qtype
        self.scheme = qtype
        self.register_buffer(
            "weight",
            torch.zeros(out_features, in_features // block * nbytes, dtype=torch.uint8, device=device),
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, qtype: str = "q8_0", compute_dtype: torch.dtype | None = None
    ) -> GGUFLinear:
        _check_linear(linear)
        mod = cls(linear.in_features, linear.out_features, qtype, compute_dtype, linear.weight.device)
        mod.weight = quantize_gguf(linear.weight, qtype)
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_gguf(self.weight, self.qtype).to(dtype)
