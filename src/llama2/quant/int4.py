"""Weight-only int4, groupwise asymmetric, as gpt-fast's `WeightOnlyInt4Linear` does it.

Per group of `groupsize` input values in a row: scale = max(max - min, 1e-6) / 15 and
zero = min + 8 * scale, both rounded to bfloat16; codes q = clamp(round((w - (zero - 8 * scale)) /
scale), 0, 15); dequantized w = (q - 8) * scale + zero. Scales and zeros are packed as gpt-fast's
`scales_and_zeros` (K / groupsize, N, 2) bfloat16.

Storage is device-independent: two codes per byte along the input dimension (even column in the
low nibble), (N, K / 2) uint8. On CPU the `llama2.quant.kernels` int4 kernel reads exactly this
layout (torch's `_weight_int4pack_mm_for_cpu` was measured slower and needs a second, repacked
copy of the weight); elsewhere the forward dequantizes and calls a dense matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama2.errors import ConfigError

INT4_GROUPSIZES = (32, 64, 128, 256)


def _check(w_shape: tuple[int, ...], groupsize: int) -> None:
    if groupsize not in INT4_GROUPSIZES:
        raise ConfigError(f"int4 groupsize must be one of {INT4_GROUPSIZES}, got {groupsize}")
    if len(w_shape) != 2:
        raise ConfigError(f"int4 quantization expects a 2-D weight (out, in), got shape {w_shape}")
    if w_shape[1] % groupsize:
        raise ConfigError(
            f"int4 needs in_features divisible by the groupsize; "
            f"got in_features={w_shape[1]}, groupsize={groupsize}"
        )


def quantize_int4(w: Tensor, groupsize: int = 128) -> tuple[Tensor, Tensor]:
    """Groupwise asymmetric 4-bit quantization of a (N, K) weight.

    Args:
        w: float weight (out_features N, in_features K); K must be a multiple of groupsize.
        groupsize: input values per (scale, zero) pair: 32, 64, 128 or 256.

    Returns:
        (packed, scales_and_zeros): uint8 (N, K/2) codes (even column in the low nibble) and
        bfloat16 (K/groupsize, N, 2) [scale, zero] pairs.
    """
    _check(tuple(w.shape), groupsize)
    from llama2.quant.kernels import quantize as fast  # bit-identical C++ quantizers

    if fast.fast_quantize_usable(w):
        return fast.fast_quantize_int4(w, groupsize)
    n, k = w.shape
    groups = w.detach().float().reshape(-1, groupsize)  # (N*K/gs, gs)
    max_val = groups.amax(dim=1, keepdim=True)
    min_val = groups.amin(dim=1, keepdim=True)
    scales_f = (max_val - min_val).clamp(min=1e-6) / 15  # (N*K/gs, 1)
    zeros = (min_val + scales_f * 8).to(torch.bfloat16)  # from the unrounded scale, as gpt-fast
    scales = scales_f.to(torch.bfloat16)
    # gpt-fast rounds with bf16 arithmetic on a bf16 weight; we round in float32 with the same bf16
    # scales/zeros (never worse, and identical for bf16 weights in all but rare ties).
    lowest = zeros.float() - scales.float() * 8
    q = groups.sub(lowest).div(scales.float()).round().clamp(0, 15).to(torch.uint8).reshape(n, k)  # (N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
    sz = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], dim=2)  # (N, K/gs, 2)
    return packed, sz.transpose(0, 1).contiguous()  # (K/gs, N, 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int32 codes in [0, 15]."""
    lo = (packed & 0xF).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)  # (N, K)


def dequantize_int4(
    packed: Tensor, scales_and_zeros: Tensor, groupsize: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(q - 8) * scale + zero per group, computed in float32 and cast to `dtype`. Returns (N, K)."""
    q = unpack_int4(packed)  # (N, K)
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, K/gs, 2)
    scales, zeros = sz[..., 0:1], sz[..., 1:2]  # (N, K/gs, 1) each
    w = (q.reshape(n, k // groupsize, groupsize) - 8).float() * scales + zeros  # (N, K/gs, gs)
    return w.reshape(n, k).to(dtype)
