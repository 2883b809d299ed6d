"""Quantized drop-in replacements for bias-free `nn.Linear` layers.

Every module keeps its quantized tensors as buffers (so `state_dict()` / `load_state_dict(...,
assign=True)` move them without re-quantizing) and computes `y = x @ W.T` in `compute_dtype`
(default: the input's dtype), returning the input's dtype. The main buffer is always `weight`
(an integer tensor), so code that asks `module.weight.is_floating_point()` sees a quantized layer.

Build one from a float layer with `Cls.from_linear(linear, ...)`, or an empty one with the
constructor (any device, `meta` included) and load a saved state dict into it.

On CPU the forward uses the C++ kernels of `llama2.quant.kernels` (a matrix-vector kernel for
up to 16 activation rows, chunked dequantize + float32 GEMM beyond) when they are built and the
input needs no gradient; otherwise it dequantizes the whole weight and calls `F.linear`. The
`use_kernel` attribute forces one path: None (default) = kernels when possible, False = never,
True = always (a `ConfigError` when impossible). `DenseLinear` does the same for plain
bfloat16/float16 weights, and `accelerate(model)` swaps it in for a model's `nn.Linear` layers.
`quantize_activations` (default True) lets the int8/int4 decode kernels quantize activations to
Q8_0 blocks, as the GGUF types always do (llama.cpp's method; see `llama2.quant.kernels`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.errors import ConfigError
from llama2.quant import kernels
from llama2.quant.gguf_blocks import BLOCK_SIZES, dequantize_gguf, quantize_gguf
from llama2.quant.int4 import dequantize_int4, quantize_int4
from llama2.quant.int8 import dequantize_int8, quantize_int8
from llama2.quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor, dequantize_nf4, nf4_code, quantize_nf4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NF4_CODE: list[Tensor] = []


def _nf4_code() -> Tensor:
    """The NF4 code book on CPU, created once."""
    if not _NF4_CODE:
        _NF4_CODE.append(nf4_code())
    return _NF4_CODE[0]


def _bufs(mod: nn.Module) -> dict[str, Tensor]:
    """A module's buffers by name: the per-token forward reads them from here, since every
    `self.<buffer>` goes through `nn.Module.__getattr__` (about a microsecond each)."""
    return cast(dict[str, Tensor], mod._buffers)


def _check_linear(linear: nn.Linear) -> None:
    if linear.bias is not None:
        raise ConfigError("quantized linear layers support bias-free nn.Linear only (Llama has no biases)")


def _use_kernel(use_kernel: bool | None, fits: bool, x: Tensor, weight: Tensor, what: str) -> bool:
    """Resolve a module's `use_kernel` setting for one forward call."""
    if use_kernel is False:
        return False
    possible = fits and kernels.kernels_enabled(x, weight) and weight.is_contiguous()
    if use_kernel and not possible:
        raise ConfigError(
            f"use_kernel=True but the CPU kernel cannot run this {what}: it needs CPU tensors, no "
            "gradient through the input, a supported shape and the built extension "
            "(is LLAMA2_NO_KERNELS set, or did the build warn?)"
        )
    return possible


class QuantizedLinear(nn.Module):
    """Base class: subclasses provide `dequantize_weight` and may provide `_kernel_matmul`."""

    scheme: str = ""
    weight: Tensor
    # decode kernel quantizes activations to Q8_0 blocks (llama.cpp's method) where it supports it
    quantize_activations: bool = True

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {_FLOAT_DTYPES} or None, got {compute_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.use_kernel: bool | None = None

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out_features, in_features) weight in `dtype`."""
        raise NotImplementedError

    def _kernel_fits(self) -> bool:
        """Whether this layer's shape and layout are supported by its CPU kernel."""
        return False

    def kernel_usable(self, x: Tensor | None = None) -> bool:
        """Whether the forward (for input `x`; default: a CPU float32 input) uses the CPU kernel."""
        probe = x if x is not None else torch.empty(0, self.in_features)
        return _use_kernel(self.use_kernel, self._kernel_fits(), probe, self.weight, type(self).__name__)

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype through the CPU kernel (float32 inside)."""
        raise NotImplementedError

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize_weight(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features) in x's dtype."""
        dtype = self.compute_dtype or x.dtype
        xc = x if x.dtype == dtype else x.to(dtype)
        use = self.use_kernel
        if use is None:  # the common case, checked inline: it runs once per layer per token
            w = _bufs(self)["weight"]
            use = self._kernel_fits() and kernels.kernels_enabled(xc, w) and w.is_contiguous()
        elif use:
            use = self.kernel_usable(xc)  # raises when impossible
        if use:
            y = self._kernel_matmul(xc)  # in `dtype`: float32 accumulation, rounded once as a `dtype` matmul
            return y if y.dtype == x.dtype else y.to(x.dtype)
        return self._matmul(xc).to(x.dtype)

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

    def _kernel_fits(self) -> bool:
        return _bufs(self)["scales"].is_contiguous()

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        b = _bufs(self)
        return kernels.int8_linear(x, b["weight"], b["scales"], self.quantize_activations)

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # (..., N)


class Int4Linear(QuantizedLinear):
    """Weight-only int4, groupwise asymmetric (gpt-fast).

    Buffers `weight` (N, K/2) uint8 and `scales_and_zeros` (K/groupsize, N, 2) bfloat16, and
    nothing else: the CPU kernel reads this layout directly (no second, repacked copy).
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

    def _kernel_fits(self) -> bool:
        sz = _bufs(self)["scales_and_zeros"]
        return self.groupsize % 32 == 0 and sz.dtype == torch.bfloat16 and sz.stride(-1) == 1

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        b = _bufs(self)
        sz = b["scales_and_zeros"]
        return kernels.int4_linear(x, b["weight"], sz, self.groupsize, self.quantize_activations)

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

    def _kernel_fits(self) -> bool:
        if self.in_features % self.blocksize or self.blocksize % 32:
            return False
        b = _bufs(self)
        if self.double_quant:
            nested = b["nested_absmax"].is_contiguous() and b["nested_code"].is_contiguous()
            return nested and b["absmax"].is_contiguous()
        return b["absmax"].is_contiguous()

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        b = _bufs(self)
        shape = (self.out_features, self.in_features)
        if self.double_quant:
            return kernels.nf4_linear(
                x,
                b["weight"],
                shape,
                b["absmax"],
                self.blocksize,
                _nf4_code(),
                b["nested_absmax"],
                b["nested_code"],
                b["offset"],
            )
        absmax = b["absmax"]
        absmax = absmax if absmax.dtype == torch.float32 else absmax.float()
        return kernels.nf4_linear(x, b["weight"], shape, absmax, self.blocksize, _nf4_code())

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

    def _kernel_fits(self) -> bool:
        return self.qtype in kernels.GGUF_QTYPE_IDS

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        return kernels.gguf_linear(x, _bufs(self)["weight"], self.qtype)


class DenseLinear(nn.Linear):
    """A bias-free linear layer with a bfloat16/float16 `weight` parameter and the CPU kernels.

    An `nn.Linear` subclass with the same parameter name and shape, so state dicts are
    interchangeable and code that looks for `nn.Linear` (quantization, LoRA) still finds it. On CPU,
    without autograd, the forward streams the half-precision weight through a float32-accumulating
    matrix-vector kernel for small inputs and converts it to float32 in row chunks for torch's
    float32 GEMM on large ones; the result is rounded to the input's dtype. Otherwise (CUDA,
    training, kernels unavailable) it is `F.linear`.
    """

    weight: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialise a weight
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"DenseLinear holds a bfloat16 or float16 weight, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.use_kernel: bool | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseLinear:
        """Wrap `linear`'s weight (shared, not copied); it must be bfloat16/float16 and bias-free."""
        _check_linear(linear)
        mod = cls(linear.in_features, linear.out_features, linear.weight.dtype, device="meta")
        mod.weight = linear.weight  # type: ignore[assignment]  # nn.Linear declares Tensor; it is a Parameter
        return mod

    def kernel_usable(self, x: Tensor | None = None) -> bool:
        """Whether the forward (for input `x`; default: a CPU float32 input) uses the CPU kernel."""
        probe = x if x is not None else torch.empty(0, self.in_features)
        fits = self.weight.dtype in (torch.bfloat16, torch.float16)
        return _use_kernel(self.use_kernel, fits, probe, self.weight, "DenseLinear")

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features) in x's dtype."""
        w = cast(Tensor, self._parameters["weight"])  # not self.weight: nn.Module.__getattr__ is slow
        if self.use_kernel is None:  # the common case, checked inline: it runs once per layer per token
            fits = w.dtype in (torch.bfloat16, torch.float16) and w.is_contiguous()
            use = fits and kernels.kernels_enabled(x, w)
        else:
            use = self.kernel_usable(x)  # raises when impossible but forced
        if use:
            return kernels.dense_linear(x, w)  # x's dtype, float32 accumulation
        return F.linear(x.to(w.dtype), w).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


ACCELERATED_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def accelerate(model: nn.Module) -> nn.Module:
    """Make a CPU model fast: swap its bfloat16/float16 `nn.Linear` layers named wq wk wv wo w1 w2 w3
    output for `DenseLinear` (in place, sharing the weights) when the CPU kernels are available, and,
    once every such layer takes float32 input (kernel or quantized modules), run the activations in
    float32 (`model.compute_dtype`, when the model has one): this CPU has no native bf16 arithmetic,
    so elementwise work and attention in bf16 are slower than in float32. The weights keep their dtype.

    Float32 linears are left alone (torch's float32 matrix-vector product already runs at memory
    bandwidth). Returns `model`.
    """
    probe = torch.empty(0)
    if not kernels.kernels_enabled(probe, probe):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                name in ACCELERATED_LINEARS
                and type(child) is nn.Linear
                and child.bias is None
                and child.weight.device.type == "cpu"
                and child.weight.dtype in (torch.bfloat16, torch.float16)
            ):
                setattr(parent, name, DenseLinear.from_linear(child))
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ACCELERATED_LINEARS]
    mixed_ok = all(isinstance(m, DenseLinear | QuantizedLinear) or _is_float32(m) for m in linears)
    half = any(isinstance(m, DenseLinear) for m in linears) or any(
        p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
    )
    if linears and mixed_ok and half and getattr(model, "compute_dtype", False) is None:
        model.compute_dtype = torch.float32  # type: ignore[assignment]
    return model


def _is_float32(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dtype == torch.float32
