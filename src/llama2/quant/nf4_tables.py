"""The lookup table of bitsandbytes' CPU 8-bit blockwise quantizer (NF4's double quantization), shared
by the pure-torch reference (`llama2.quant.nf4`) and the C++ quantizer (`llama2.quant.kernels.quantize`)
so that neither imports the other."""

from __future__ import annotations

import torch
from torch import Tensor

LUT_SIZE = 65536  # bins of bitsandbytes' CPU 8-bit quantization lookup table over [-1, 1]


def quantize_lut(code: Tensor) -> Tensor:
    """For each of 65536 evenly spaced values in [-1, 1], the index of the nearest code (int64).

    Args:
        code: sorted (K,) float32 code book in [-1, 1] (K <= 256).

    Returns:
        (65536,) int64: the count of code midpoints below each value.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])  # (K-1,) float32
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)  # (65536,)
    val = -1.0 + (2.0 * i) / (LUT_SIZE - 1)  # float32 ops, as in the C++ table builder
    return torch.searchsorted(midpoints, val, right=False)  # count of midpoints < val
