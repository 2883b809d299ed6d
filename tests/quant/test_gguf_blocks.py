"""GGUF Q8_0 / Q4_0 / Q4_K blocks against the gguf package and llama.cpp's reference quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.errors import ConfigError
from llama2.quant.gguf_blocks import dequantize_gguf, quantize_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "q4_k_llamacpp_golden.npz"
TYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_k": QT.Q4_K}


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.001, 3.0, (*shape[:-1], 1))
    x = x.reshape(-1, shape[-1])
    x[0, :32] = 0.0  # an all-zero block
    x[-1, 5] = 50.0  # an outlier
    return x.reshape(shape).astype(np.float32)


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 96), (128, 1024)])
def test_quantize_matches_gguf_package(name: str, shape: tuple[int, ...]) -> None:
    x = _weights(shape, seed=len(shape) + shape[-1])
    ref = gguf.quants.quantize(x, TYPES[name])
    ours = quantize_gguf(torch.from_numpy(x), name)
    assert ours.dtype == torch.uint8
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k"])
def test_dequantize_matches_gguf_package(name: str) -> None:
    x = _weights((48, 512), seed=7)
    # the gguf package has no Q4_K quantizer: use the llama.cpp golden bytes
    data = np.load(GOLDEN)["q4_k"] if name == "q4_k" else gguf.quants.quantize(x, TYPES[name])
    ref = gguf.quants.dequantize(data, TYPES[name])
    ours = dequantize_gguf(torch.from_numpy(data), name)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_q4_k_matches_llama_cpp_reference() -> None:
    """Bytes produced by llama.cpp's quantize_row_q4_K_ref (see data/README.md)."""
    golden = np.load(GOLDEN)
    ours = quantize_gguf(torch.from_numpy(golden["x"].astype(np.float32)), "q4_k").numpy()
    np.testing.assert_array_equal(ours, golden["q4_k"])


def test_q4_k_roundtrip_error_is_small() -> None:
    x = _weights((32, 512), seed=11)
    x[-1, 5] = 0.5
    deq = gguf.quants.dequantize(quantize_gguf(torch.from_numpy(x), "q4_k").numpy(), QT.Q4_K)
    rel = np.linalg.norm(deq - x) / np.linalg.norm(x)
    assert rel < 0.12  # ~4.5 bits per weight


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k"])
def test_bad_shapes_raise(name: str) -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        quantize_gguf(torch.zeros(4, 48), name)
    with pytest.raises(ConfigError, match="whole"):
        dequantize_gguf(torch.zeros(4, 7, dtype=torch.uint8), name)
    with pytest.raises(ConfigError, match="unknown GGUF block type"):
        quantize_gguf(torch.zeros(4, 256), "q5_k")
