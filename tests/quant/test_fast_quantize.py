"""The C++ quantizers (`llama2.quant.kernels.quantize`) against the pure-torch reference quantizers.

The torch quantizers are themselves checked bit for bit against bitsandbytes (test_nf4.py) and the
gguf package / llama.cpp golden bytes (test_gguf_blocks.py); here every output tensor of the fast
path must be `torch.equal` (same dtype, shape and bits) to the torch path, forced with
`LLAMA2_NO_KERNELS=1`, on random tensors of several shapes and dtypes and on edge cases: all-zero
blocks, a single nonzero, constant blocks, values exactly on NF4 midpoints, tiny and huge
magnitudes, and odd element counts for NF4 (short last block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from llama2.quant import gguf_blocks, int4, int8, nf4
from llama2.quant.kernels import quantize as fast

pytestmark = pytest.mark.skipif(
    not fast.fast_quantize_available(), reason="fast quantizers not built (LLAMA2_NO_KERNELS or no compiler)"
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((16, 256), (5, 768), (4, 1024))


@contextmanager
def _torch_path() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA2_NO_KERNELS", "1")
        assert not fast.fast_quantize_usable(torch.ones(4))
        yield


def _flatten(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, tuple):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, nf4.NF4Tensor):
        fields = (out.packed, out.absmax, out.nested_absmax, out.nested_code, out.offset)
        return [t for t in fields if t is not None]
    raise TypeError(type(out))


def _check_same(fn: Callable[[Tensor], object], w: Tensor) -> None:
    assert fast.fast_quantize_usable(w)
    got = _flatten(fn(w))
    with _torch_path():
        ref = _flatten(fn(w))
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert torch.equal(g.reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """Random rows of very different scales, with edge-case blocks in the first rows."""
    g = torch.Generator().manual_seed(seed)
    big = 1e4 if dtype == torch.float16 else 1e30  # finite in every dtype
    tiny = 1e-4 if dtype == torch.float16 else 1e-30
    scales = torch.logspace(-3, 1, shape[0], dtype=torch.float64)[:, None]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scales  # (N, K)
    x[0, :64] = 0.0  # all-zero blocks (every scheme's block size is <= 64 or 256-aligned below)
    x[0, 64:128] = 0.0
    x[0, 100] = -0.75  # a single nonzero in a block
    x[1, :256] = -0.5  # a constant negative block (Q4_K's degenerate sub-blocks)
    x[1, 32:64] = 2.0  # a constant positive block
    half = shape[1] // 2
    x[2, :half] = torch.randn(half, generator=g, dtype=torch.float64) * tiny
    x[2, half : half + 64] = torch.randn(64, generator=g, dtype=torch.float64).clamp(-4, 4) * big
    # NF4 ties: a block with absmax 1 and values exactly on the float32 code midpoints
    code = nf4.nf4_code()
    mids = ((code[:-1] + code[1:]) / 2).double()  # (15,)
    x[3, :64] = torch.cat([mids, mids, mids, mids, mids[:3], torch.tensor([1.0], dtype=torch.float64)])
    x[3, 64:96] = torch.tensor([8.0, -8.0, 4.0, -4.0] * 8, dtype=torch.float64)  # ties for Q8_0/Q4_0/int8
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_int4_match_torch(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = _weights(shape, dtype, seed=shape[1])
    _check_same(int8.quantize_int8, w)
    for groupsize in (32, 128, 256):
        _check_same(lambda t, gs=groupsize: int4.quantize_int4(t, gs), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # x * x overflows at 1e30
def test_gguf_match_torch(qtype: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = _weights(shape, dtype, seed=shape[0] * 7 + 1)
    if qtype == "q4_k" and shape[0] > 5:
        w = w[:5]  # the torch Q4_K reference is slow
    _check_same(lambda t: gguf_blocks.quantize_gguf(t, qtype), w)
    w3 = w[: w.shape[0] // 2 * 2].reshape(-1, 2, shape[1])  # (B, 2, K)
    _check_same(lambda t: gguf_blocks.quantize_gguf(t, qtype), w3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [64 * 40, 64 * 40 + 1, 64 * 40 + 37, 63, 1, 256 * 64 * 3 + 65])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_match_torch(numel: int, dtype: torch.dtype, double_quant: bool) -> None:
    w = torch.randn(numel, dtype=torch.float64).to(dtype)
    m = min(numel, 4096)
    w[:m] = _weights((4, 1024), dtype, seed=numel).reshape(-1)[:m]  # the edge-case blocks first
    _check_same(lambda t: nf4.quantize_nf4(t, 64, double_quant), w)
    if numel % 2 == 0:
        _check_same(lambda t: nf4.quantize_nf4(t, 64, double_quant), w.reshape(2, -1))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_nf4_blocksizes_and_blockwise_8bit(blocksize: int) -> None:
    w = _weights((8, 1024), torch.float32, seed=blocksize)
    _check_same(lambda t: nf4.quantize_nf4(t, blocksize, True), w)
    code = nf4.create_dynamic_map(signed=True)
    x = w.reshape(-1)[:5000] - 0.01  # a short last block of 8-bit quantization too
    _check_same(lambda t: nf4.quantize_blockwise_8bit(t, code, 256), x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_two_threads_split_the_same() -> None:
    """at::parallel_for chunking must not change anything (the suite otherwise runs one thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = _weights((64, 2048), torch.bfloat16, seed=3)
        for fn in (
            int8.quantize_int8,
            lambda t: int4.quantize_int4(t, 64),
            lambda t: nf4.quantize_nf4(t, 64, True),
            lambda t: gguf_blocks.quantize_gguf(t, "q8_0"),
            lambda t: gguf_blocks.quantize_gguf(t, "q4_0"),
        ):
            _check_same(fn, w)
        _check_same(lambda t: gguf_blocks.quantize_gguf(t, "q4_k"), w[:8])
    finally:
        torch.set_num_threads(old)


def test_quantizers_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public quantizers call the C++ ops (and stop calling them with LLAMA2_NO_KERNELS=1)."""
    calls: list[str] = []
    for name in ("fast_quantize_int8", "fast_quantize_int4", "fast_quantize_nf4", "fast_quantize_gguf"):
        orig = getattr(fast, name)

        def spy(*args: object, _orig: Callable[..., object] = orig, _name: str = name) -> object:
            calls.append(_name)
            return _orig(*args)

        monkeypatch.setattr(fast, name, spy)
    w = torch.randn(4, 256)
    int8.quantize_int8(w)
    int4.quantize_int4(w, 128)
    nf4.quantize_nf4(w)
    gguf_blocks.quantize_gguf(w, "q4_k")
    assert calls == ["fast_quantize_int8", "fast_quantize_int4", "fast_quantize_nf4", "fast_quantize_gguf"]
    calls.clear()
    with _torch_path():
        int8.quantize_int8(w)
        nf4.quantize_nf4(w)
        gguf_blocks.quantize_gguf(w, "q8_0")
    assert calls == []


def test_non_contiguous_input() -> None:
    w = _weights((64, 512), torch.bfloat16, seed=5).t().contiguous().t()  # (64, 512), column-major
    assert not w.is_contiguous()
    _check_same(int8.quantize_int8, w)
    _check_same(lambda t: int4.quantize_int4(t, 128), w)
    _check_same(lambda t: nf4.quantize_nf4(t, 64, True), w)
    _check_same(lambda t: gguf_blocks.quantize_gguf(t, "q4_0"), w)
