"""NF4 and its double quantization against bitsandbytes (the reference implementation)."""

from __future__ import annotations

import pytest
import torch

from llama2.errors import ConfigError
from llama2.quant.nf4 import (
    create_dynamic_map,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    quantize_blockwise_8bit,
    quantize_nf4,
)

bnb_functional = pytest.importorskip(
    "bitsandbytes.functional", reason="bitsandbytes is the NF4 reference; install it (dev extra) to run"
)

SHAPES = [(64, 128), (96, 256), (33, 70), (2, 500), (7, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 0.05
    t.view(-1)[::37] *= 20  # some outliers so block absmax values vary widely
    t.view(-1)[:64] = 0  # an all-zero block
    return t.to(dtype)


def test_dynamic_map_matches_bitsandbytes() -> None:
    assert torch.equal(create_dynamic_map(signed=True), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bit_identical(shape: tuple[int, ...], dtype: torch.dtype, double_quant: bool) -> None:
    w = _tensor(shape, dtype, seed=sum(shape))
    ref_q, ref_state = bnb_functional.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    ours = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == ref_q.shape
    assert torch.equal(ours.packed, ref_q)
    assert torch.equal(ours.absmax, ref_state.absmax)
    if double_quant:
        assert ours.nested_absmax is not None and ours.nested_code is not None and ours.offset is not None
        assert torch.equal(ours.nested_absmax, ref_state.state2.absmax)
        assert torch.equal(ours.nested_code, ref_state.state2.code)
        assert torch.equal(ours.offset, ref_state.offset)
        assert ref_state.state2.blocksize == 256
    deq = dequantize_nf4(ours)
    assert deq.dtype == dtype and deq.shape == w.shape
    if shape[-1] % 2:  # bnb's odd-width dequantize path runs torch.compile (slow): check quantization only
        return
    ref_deq = bnb_functional.dequantize_4bit(ref_q, ref_state)
    assert torch.equal(deq.reshape(-1), ref_deq.reshape(-1))  # bnb returns (1, n) for 1-D input


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_nf4_other_blocksizes(blocksize: int) -> None:
    w = _tensor((128, 256), torch.float32, seed=blocksize)
    ref_q, ref_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    ours = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(ours.packed, ref_q) and torch.equal(ours.absmax, ref_state.absmax)


def test_blockwise_8bit_matches_bitsandbytes() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256 * 9 + 100, generator=g) * 0.3  # a short last block too
    x[256:512] = 0
    code = create_dynamic_map()
    ref_q, ref_state = bnb_functional.quantize_blockwise(x, blocksize=256)
    q, absmax = quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_state.absmax)
    ref_deq = bnb_functional.dequantize_blockwise(q, ref_state)
    assert torch.equal(dequantize_blockwise_8bit(q, absmax, code, 256), ref_deq)


def test_nf4_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="blocksize"):
        quantize_nf4(torch.zeros(64), blocksize=48)
    with pytest.raises(ConfigError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.zeros(64, dtype=torch.int32))
