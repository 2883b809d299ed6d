"""The C++ CPU kernels of `llama2.quant.kernels` against independent references.

- float-activation formats (int8, int4, NF4, bf16, fp16): the weight dequantized by the torch
  reference path (itself checked against bitsandbytes / gpt-fast numerics elsewhere), then a
  float64 matmul;
- Q8_0 / Q4_0 / Q4_K: llama.cpp's semantics, emulated with the `gguf` package: the activation is
  quantized with gguf's Q8_0 quantizer, both operands are dequantized by gguf, and the dot is
  taken in float64.

Shapes are small and odd (rows not a multiple of 16, M in {1, 3, 17 (GEMM path)}).
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from llama2.quant import kernels
from llama2.quant.gguf_blocks import quantize_gguf
from llama2.quant.linear import DenseLinear, GGUFLinear, Int4Linear, Int8Linear, NF4Linear, accelerate

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available(), reason="CPU kernels not built (LLAMA2_NO_KERNELS or no compiler)"
)
MS = (1, 3, kernels.MV_MAX_ROWS + 1)  # decode kernel, several rows, and the dequantize + GEMM path
_QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[1] = 0.0  # an all-zero row
    w[2, 5] = 0.4  # an outlier
    return w


def _x(m: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + m)
    return torch.randn(m, k, generator=g).to(dtype)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _gguf_deq(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float64))


def _q8_act(x: torch.Tensor) -> torch.Tensor:
    """x quantized to Q8_0 and back by the gguf package, float64."""
    xq = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return _gguf_deq(xq, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)


def _q8_emulation(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str) -> torch.Tensor:
    """llama.cpp: x quantized to Q8_0 by gguf, weight dequantized by gguf, dot in float64."""
    return _q8_act(x) @ _gguf_deq(w_bytes.numpy(), _QTYPES[qtype]).T


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k"])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_kernels(qtype: str, m: int, dtype: torch.dtype) -> None:
    n, k = 37, 512
    mod = GGUFLinear.from_linear(_linear(_weight(n, k)), qtype)
    x = _x(m, k, dtype)
    assert mod.kernel_usable(x)
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == dtype and y.shape == (m, n)
    wd = _gguf_deq(mod.weight.numpy(), _QTYPES[qtype])
    exact = x.double() @ wd.T  # dequantize-then-float64 reference
    if m <= kernels.MV_MAX_ROWS:  # Q8_0 activations, as llama.cpp
        ref = _q8_emulation(x, mod.weight, qtype)
        tol = 2e-6 if dtype == torch.float32 else 8e-3  # fp32 summation order / bf16 output rounding
        assert _rel(y, ref) < tol
        assert 1e-5 < _rel(y, exact) < 2e-2  # the activation really is quantized, and only slightly
    else:  # GEMM path: float activations
        assert _rel(y, exact) < (2e-6 if dtype == torch.float32 else 8e-3)


def test_gguf_dequant_kernel_is_exact() -> None:
    for qtype in ("q8_0", "q4_0", "q4_k"):
        w = quantize_gguf(_weight(21, 512), qtype)
        got = torch.ops.llama2_kernels.gguf_dequant(w, kernels.GGUF_QTYPE_IDS[qtype], 3, 20)
        ref = _gguf_deq(w.numpy(), _QTYPES[qtype])[3:20].float()
        assert torch.equal(got, ref), qtype


def _float_modules(w: torch.Tensor) -> dict[str, nn.Module]:
    lin = _linear(w)
    return {
        "int8": Int8Linear.from_linear(lin),
        "int4-g32": Int4Linear.from_linear(lin, 32),
        "int4-g128": Int4Linear.from_linear(lin, 128),
        "nf4": NF4Linear.from_linear(lin, 64, double_quant=False),
        "nf4-dq": NF4Linear.from_linear(lin, 64, double_quant=True),
    }


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_int4_nf4_kernels(m: int, dtype: torch.dtype) -> None:
    n, k = 29, 256
    x = _x(m, k, dtype)
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # fp32 summation order / bf16 output rounding
    for name, mod in _float_modules(_weight(n, k, seed=m)).items():
        assert isinstance(mod, Int8Linear | Int4Linear | NF4Linear)
        assert mod.kernel_usable(x), name
        wd = mod.dequantize_weight(torch.float32).double()
        exact = x.double() @ wd.T  # dequantize-then-float64 reference
        with torch.no_grad():
            y = mod(x)
            assert y.dtype == dtype and y.shape == (m, n)
            if name.startswith("int") and m <= kernels.MV_MAX_ROWS:  # Q8_0 activations by default
                assert _rel(y, _q8_act(x) @ wd.T) < tol, name
                assert 1e-5 < _rel(y, exact) < 2e-2, name
                mod.quantize_activations = False  # float-activation kernel
                y = mod(x)
            assert _rel(y, exact) < tol, name
            mod.use_kernel = False
            fallback = mod(x)
        assert _rel(fallback, exact) < max(tol, 1e-2), name  # the pure-torch path agrees too


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_dense_kernel(m: int, wdtype: torch.dtype) -> None:
    n, k = 19, 77  # K not a multiple of 32: exercises the scalar tail
    w = _weight(n, k).to(wdtype)
    lin = nn.Linear(k, n, bias=False, dtype=wdtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = DenseLinear.from_linear(lin)
    assert mod.weight is lin.weight  # shared, not copied
    for dtype in (torch.float32, wdtype):
        x = _x(m, k, dtype)
        with torch.no_grad():
            y = mod(x)
        ref = x.double() @ w.double().T
        assert y.dtype == dtype
        assert _rel(y, ref) < (2e-6 if dtype == torch.float32 else 8e-3)
    assert mod.state_dict().keys() == lin.state_dict().keys()


def test_odd_int8_shape() -> None:
    mod = Int8Linear.from_linear(_linear(_weight(13, 45)))
    x = _x(2, 45)
    with torch.no_grad():
        y = mod(x)
    assert _rel(y, x.double() @ mod.dequantize_weight().double().T) < 2e-6


def test_nf4_kernel_needs_whole_blocks_per_row() -> None:
    mod = NF4Linear.from_linear(_linear(_weight(8, 96)), 64)  # 96 % 64 != 0: torch path
    assert not mod.kernel_usable()
    with torch.no_grad():
        y = mod(_x(1, 96))
    assert y.shape == (1, 8)


def test_autograd_takes_the_torch_path() -> None:
    mod = NF4Linear.from_linear(_linear(_weight(16, 128)), 64)
    x = _x(2, 128).requires_grad_()
    assert not mod.kernel_usable(x)
    mod(x).sum().backward()
    assert x.grad is not None


def test_no_kernels_env_forces_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = GGUFLinear.from_linear(_linear(_weight(16, 64)), "q4_0")
    x = _x(1, 64)
    assert mod.kernel_usable(x)
    monkeypatch.setattr(kernels.build, "_disabled", [True])  # as LLAMA2_NO_KERNELS=1 at import
    assert not mod.kernel_usable(x)
    with torch.no_grad():
        y = mod(x)
    assert _rel(y, x.double() @ mod.dequantize_weight().double().T) < 2e-6  # float path: exact-ish


def test_accelerate_swaps_half_precision_linears() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq = nn.Linear(32, 32, bias=False, dtype=torch.bfloat16)
            self.w1 = nn.Linear(32, 64, bias=False)  # float32: left alone
            self.other = nn.Linear(32, 32, bias=False, dtype=torch.bfloat16)  # not a model projection

    model = nn.Sequential(Block())
    before = model[0].wq.weight
    accelerate(model)
    assert isinstance(model[0].wq, DenseLinear) and model[0].wq.weight is before
    assert type(model[0].w1) is nn.Linear and type(model[0].other) is nn.Linear


def test_compile_traces_through_the_ops() -> None:
    mod = GGUFLinear.from_linear(_linear(_weight(32, 64)), "q8_0")
    x = _x(1, 64)
    with torch.no_grad():
        eager = mod(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(mod, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_four_bit_kernels_at_the_int16_bounds() -> None:
    """The 8-rows-at-a-time Q4_0 / int4 kernels sum int16 partial products: codes all 0 or all 15
    against activations quantized to +-127 reach the largest block sums (|32 * 8 * 127|)."""
    n, k = 27, 256  # three groups of 8 rows and a 3-row tail
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[0] = 0
    codes[1] = 15
    codes[2, ::2] = 0
    codes[2, 1::2] = 15
    codes[3:11] = 0  # a whole group of 8 at the extreme
    x = torch.ones(3, k)  # every Q8_0 activation code 127
    x[1] = -1.0
    x[2, ::2] = -1.0
    # Q4_0: bytes = fp16 scale, then 16 bytes (low nibbles: values 0..15, high: 16..31)
    blocks = codes.view(n, k // 32, 2, 16)
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)  # (n, nb, 16)
    scale = torch.full((n, k // 32, 1), 0.5, dtype=torch.float16).view(torch.uint8).view(n, k // 32, 2)
    q4 = torch.cat([scale, packed], dim=2).reshape(n, -1).contiguous()
    mod = GGUFLinear(k, n, "q4_0")
    mod.weight = q4
    with torch.no_grad():
        y = mod(x)
    assert _rel(y, _q8_emulation(x, q4, "q4_0")) < 2e-6
    # int4 (gpt-fast: even column in the low nibble), groupsize 64
    i4 = Int4Linear(k, n, 64)
    i4.weight = (codes[:, ::2] | (codes[:, 1::2] << 4)).contiguous()
    sz = torch.empty(k // 64, n, 2)
    sz[..., 0] = 0.25
    sz[..., 1] = -0.5
    i4.scales_and_zeros = sz.to(torch.bfloat16)
    with torch.no_grad():
        y4 = i4(x)
    assert _rel(y4, _q8_act(x) @ i4.dequantize_weight().double().T) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mv_ops_take_half_inputs_of_any_shape(dtype: torch.dtype) -> None:
    """The decode ops read bf16/fp16 x of shape (..., K) directly and round the float32 result
    once, exactly as converting x to float32, calling the op, and `.to(dtype)` would."""
    w = _weight(19, 128)
    mods = {
        "q4_0": GGUFLinear.from_linear(_linear(w), "q4_0"),
        "int4": Int4Linear.from_linear(_linear(w), 32),
        "nf4": NF4Linear.from_linear(_linear(w), 64, double_quant=True),
        "dense": DenseLinear.from_linear(_linear(w).to(torch.bfloat16)),
    }
    x = _x(2, 128).to(dtype).reshape(2, 1, 128)
    with torch.no_grad():
        for name, mod in mods.items():
            y = mod(x)
            ref = mod(x.float().reshape(2, 128)).to(dtype).reshape(2, 1, 19)
            assert y.dtype == dtype and y.shape == (2, 1, 19), name
            torch.testing.assert_close(y, ref, rtol=0, atol=0, msg=name)
