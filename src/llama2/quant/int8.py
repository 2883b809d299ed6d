"""Weight-only int8: symmetric, one scale per output channel (scale = absmax / 127).

As gpt-fast's `WeightOnlyInt8Linear`: the int8 weight is cast to the activation dtype and the
per-channel scale multiplies the matmul's output, `y = (x @ q.T) * scale`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama2.errors import ConfigError

INT8_MAX = 127


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize a 2-D weight (out_features, in_features) per output channel.

    Args:
        w: float weight (N, K).

    Returns:
        (q, scales): int8 (N, K) codes in [-127, 127] and float32 (N,) scales, w ~= q * scales[:, None].
    """
    if w.dim() != 2:
        raise ConfigError(f"int8 quantization expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    from llama2.quant.kernels import quantize as fast  # bit-identical C++ quantizers

    if fast.fast_quantize_usable(w):
        return fast.fast_quantize_int8(w)
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1)  # (N,)
    scales = (absmax / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # (N,); all-zero rows stay 0
    q = torch.round(wf / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # (N, K)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scales per row, in `dtype`. q: (N, K) int8; scales: (N,)."""
    return (q.float() * scales.float()[:, None]).to(dtype)
