"""Weight-only int8 (per channel) and int4 (groupwise, gpt-fast) round trips and linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama2.errors import ConfigError
from llama2.quant import kernels
from llama2.quant.int4 import dequantize_int4, quantize_int4
from llama2.quant.int8 import dequantize_int8, quantize_int8
from llama2.quant.kernels import kernels_available
from llama2.quant.linear import GGUFLinear, Int4Linear, Int8Linear, NF4Linear


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3] = 0  # an all-zero row
    w[5, 7] = 0.5  # an outlier
    return w


def test_int8_roundtrip_bound() -> None:
    w = _weight(64, 128)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    torch.testing.assert_close(scales, w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127)
    assert int(q.abs().max()) == 127
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-5)).all())  # half a step per row
    assert float(dequantize_int8(q, scales)[3].abs().max()) == 0.0


@pytest.mark.parametrize("groupsize", [32, 64, 128])
def test_int4_roundtrip_bound(groupsize: int) -> None:
    w = _weight(64, 256, seed=groupsize)
    packed, sz = quantize_int4(w, groupsize)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    assert sz.shape == (256 // groupsize, 64, 2) and sz.dtype == torch.bfloat16
    deq = dequantize_int4(packed, sz, groupsize)
    groups = w.reshape(64, -1, groupsize)
    span = (groups.amax(-1) - groups.amin(-1)).clamp(min=1e-6) / 15  # float step per group
    err = (deq - w).abs().reshape(64, -1, groupsize).amax(-1)
    # half a step, plus the bf16 rounding of scale (x8 codes) and zero: < 1 step in all
    assert bool((err <= span * 1.0 + 1e-6).all())
    assert float((deq - w).pow(2).mean().sqrt()) < float(span.mean()) * 0.5


def test_int4_rejects_bad_groupsize() -> None:
    with pytest.raises(ConfigError, match="groupsize"):
        quantize_int4(torch.zeros(16, 64), 48)
    with pytest.raises(ConfigError, match="divisible"):
        quantize_int4(torch.zeros(16, 96), 64)


def _linear(n: int, k: int) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(k, n, bias=False)


@pytest.mark.parametrize(
    ("make", "rtol"),
    [
        (lambda lin: Int8Linear.from_linear(lin), 0.01),
        (lambda lin: Int4Linear.from_linear(lin, 64, use_kernel=False), 0.12),
        (lambda lin: NF4Linear.from_linear(lin, 64, True), 0.12),
        (lambda lin: GGUFLinear.from_linear(lin, "q8_0"), 0.01),
        (lambda lin: GGUFLinear.from_linear(lin, "q4_0"), 0.15),
        (lambda lin: GGUFLinear.from_linear(lin, "q4_k"), 0.12),
    ],
)
def test_quantized_linear_close_to_float(make: object, rtol: float) -> None:
    lin = _linear(64, 256)
    x = torch.randn(3, 5, 256)
    mod = make(lin)  # type: ignore[operator]
    with torch.no_grad():
        y, ref = mod(x), lin(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    rel = float((y - ref).norm() / ref.norm())
    assert rel < rtol, rel
    assert not mod.weight.is_floating_point()


@pytest.mark.skipif(not kernels_available(), reason="CPU kernels not built (LLAMA2_NO_KERNELS, no compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_kernel_matches_dequantized_matmul(dtype: torch.dtype) -> None:
    lin = _linear(64, 256)
    fast = Int4Linear.from_linear(lin, 64, use_kernel=True)
    fast.quantize_activations = False  # float activations: the same values up to summation order
    slow = Int4Linear(256, 64, 64, use_kernel=False)
    slow.load_state_dict(fast.state_dict())
    assert fast.kernel_usable() and not slow.kernel_usable()
    x = torch.randn(2, 256).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast(x).float(), slow(x).float(), rtol=tol, atol=tol)


def test_int4_holds_only_the_quantized_weight() -> None:
    mod = Int4Linear.from_linear(_linear(64, 256), 64)
    with torch.no_grad():
        mod(torch.randn(1, 256))  # a forward must not cache a second (repacked) copy
    tensors = [t for t in vars(mod).values() if isinstance(t, torch.Tensor)]
    assert tensors == []
    nbytes = sum(b.numel() * b.element_size() for b in mod.buffers())
    assert nbytes == 64 * 128 + 4 * 64 * 2 * 2  # codes + bf16 scales and zeros


def test_kernel_refusal_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels.build, "_disabled", [True])  # as LLAMA2_NO_KERNELS=1 at import
    mod = Int4Linear.from_linear(_linear(32, 64), 32, use_kernel=True)
    with pytest.raises(ConfigError, match="use_kernel=True"):
        mod(torch.randn(1, 64))


def test_compute_dtype_is_used() -> None:
    lin = _linear(32, 64)
    mod = Int8Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    mod.use_kernel = False  # the torch path computes in bf16 exactly; the kernel accumulates in fp32
    x = torch.randn(2, 64)
    y = mod(x)
    assert y.dtype == torch.float32
    expected = (nn.functional.linear(x.bfloat16(), mod.weight.bfloat16()) * mod.scales.bfloat16()).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
