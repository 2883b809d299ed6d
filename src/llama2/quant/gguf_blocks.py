"""GGUF block formats Q8_0, Q4_0 and Q4_K in torch (vectorised over blocks).

Byte layouts are ggml's (little-endian), one row of blocks per tensor row, so a quantized
(N, K) weight is a (N, K / block_size * type_size) uint8 tensor exactly as a GGUF file stores it:

- Q8_0, 32 values in 34 bytes: d (fp16), qs[32] (int8); x = d * q.
- Q4_0, 32 values in 18 bytes: d (fp16), qs[16]; byte j holds q[j] (low nibble) and q[j + 16]
  (high nibble); x = d * (q - 8).
- Q4_K, 256 values in 144 bytes: d (fp16), dmin (fp16), scales[12] (eight 6-bit scales and eight
  6-bit mins), qs[128]; sub-block j of 32 values: x = d * sc_j * q - dmin * m_j; bytes 32c..32c+31
  hold sub-block 2c (low nibbles) and 2c + 1 (high nibbles).

Quantizers reproduce llama.cpp's reference `quantize_row_*_ref` (ggml-quants.c) operation by
operation in float32: Q8_0 rounds half away from zero, Q4_0 truncates `x / d + 8.5`, and Q4_K runs
`make_qkx2_quants` (a 21-step search of the scale and min per 32 values, weighted least squares),
with each float32 sum accumulated in C's sequential order so the bytes match the C code built
without fused multiply-add. Dequantizers give the same float32 values as `gguf.quants.dequantize`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from llama2.errors import ConfigError

GGUFType = Literal["q8_0", "q4_0", "q4_k"]


class GGUFBlock(NamedTuple):
    """One GGUF block type's geometry, as ggml's `GGML_QUANT_SIZES` and `ggml_type` enum state it."""

    ggml_type: int  # the `ggml_type` number stored in a GGUF tensor header
    values: int  # weights per block
    nbytes: int  # bytes per block (the layouts in the module docstring)


# The one statement of the GGUF block geometry this package reads and writes (see the docstring).
GGUF_BLOCKS: dict[str, GGUFBlock] = {
    "q8_0": GGUFBlock(ggml_type=8, values=32, nbytes=2 + 32),  # fp16 d + 32 int8
    "q4_0": GGUFBlock(ggml_type=2, values=32, nbytes=2 + 16),  # fp16 d + 32 nibbles
    "q4_k": GGUFBlock(ggml_type=12, values=256, nbytes=2 + 2 + 12 + 128),  # d, dmin, scales, 256 nibbles
}
# name -> (values per block, bytes per block)
BLOCK_SIZES: dict[str, tuple[int, int]] = {name: (b.values, b.nbytes) for name, b in GGUF_BLOCKS.items()}
QK_K = GGUF_BLOCKS["q4_k"].values


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _check_qtype(qtype: str) -> tuple[int, int]:
    if qtype not in BLOCK_SIZES:
        raise ConfigError(f"unknown GGUF block type {qtype!r}; expected one of {', '.join(BLOCK_SIZES)}")
    return BLOCK_SIZES[qtype]


def _to_blocks(x: Tensor, qtype: str) -> tuple[Tensor, tuple[int, ...]]:
    bs, ts = _check_qtype(qtype)
    if x.shape[-1] % bs:
        raise ConfigError(
            f"{qtype} needs rows whose length is a multiple of {bs}, got shape {tuple(x.shape)}"
        )
    out_shape = (*x.shape[:-1], x.shape[-1] // bs * ts)
    return x.detach().float().reshape(-1, bs).contiguous(), out_shape  # (nblocks, bs)


def _from_bytes(data: Tensor, qtype: str) -> tuple[Tensor, tuple[int, ...]]:
    bs, ts = _check_qtype(qtype)
    if data.dtype != torch.uint8 or data.shape[-1] % ts:
        raise ConfigError(
            f"{qtype} data must be uint8 rows of whole {ts}-byte blocks, "
            f"got {data.dtype} shape {tuple(data.shape)}"
        )
    out_shape = (*data.shape[:-1], data.shape[-1] // ts * bs)
    return data.reshape(-1, ts), out_shape  # (nblocks, ts)


def _fp16_bytes(v: Tensor) -> Tensor:
    """(nb,) float32 -> (nb, 2) uint8, little-endian fp16 (round to nearest even, as ggml)."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _fp16_from(b: Tensor) -> Tensor:
    """(nb, 2) uint8 -> (nb,) float32."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _round_half_away(v: Tensor) -> Tensor:
    """C's roundf: round half away from zero, exactly (no a + 0.5 double rounding)."""
    a = v.abs()
    f = torch.floor(a)
    return torch.copysign(f + torch.floor(2 * (a - f)), v)


# ---------------------------------------------------------------------------------------- Q8_0
def quantize_q8_0(x: Tensor) -> Tensor:
    """Quantize (..., K) floats, K % 32 == 0, to Q8_0 bytes (..., K / 32 * 34)."""
    blocks, shape = _to_blocks(x, "q8_0")  # (nb, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / _f32(127.0)  # (nb, 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    qs = _round_half_away(blocks * inv).to(torch.int8).view(torch.uint8)  # (nb, 32)
    return torch.cat([_fp16_bytes(d), qs], dim=1).reshape(shape)


def dequantize_q8_0(data: Tensor) -> Tensor:
    """Q8_0 bytes (..., nbytes) -> float32 (..., K)."""
    blocks, shape = _from_bytes(data, "q8_0")
    d = _fp16_from(blocks[:, :2])  # (nb,)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (nb, 32)
    return (q * d[:, None]).reshape(shape)


# ---------------------------------------------------------------------------------------- Q4_0
def quantize_q4_0(x: Tensor) -> Tensor:
    """Quantize (..., K) floats, K % 32 == 0, to Q4_0 bytes (..., K / 32 * 18)."""
    blocks, shape = _to_blocks(x, "q4_0")  # (nb, 32)
    imax = blocks.abs().argmax(dim=1, keepdim=True)  # first index of the largest |x|
    signed_max = blocks.gather(1, imax)  # (nb, 1)
    d = signed_max / _f32(-8.0)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (nb, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)  # (nb, 16)
    return torch.cat([_fp16_bytes(d), qs], dim=1).reshape(shape)


def dequantize_q4_0(data: Tensor) -> Tensor:
    """Q4_0 bytes (..., nbytes) -> float32 (..., K)."""
    blocks, shape = _from_bytes(data, "q4_0")
    d = _fp16_from(blocks[:, :2])  # (nb,)
    qs = blocks[:, 2:]  # (nb, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).to(torch.int8) - 8  # (nb, 32)
    return (d[:, None] * q.float()).reshape(shape)


# ---------------------------------------------------------------------------------------- Q4_K
def _seq_sum(t: Tensor) -> Tensor:
    """Sum over the last dim left to right in float32, as a C loop `acc += t[i]` does. (S, n) -> (S,).

    numpy's `add.accumulate` is strictly sequential in the array's dtype (unlike `sum`, which is
    pairwise, or torch's CPU cumsum, which accumulates float32 in double).
    """
    cols = t.t().contiguous().numpy()  # (n, S): each step adds one column for all rows at once
    acc = np.add.accumulate(cols, axis=0, dtype=np.float32)  # (n, S)
    return torch.from_numpy(acc[-1].copy())


def _make_qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """llama.cpp's `make_qkx2_quants` (use_mad=false) on rows of x with weights w, both (S, n).

    Returns (scale (S,), the_min (S,) = -min >= 0, L (S, n) float32 codes in [0, nmax]).
    """
    fmax = _f32(float(nmax))
    mn = x.amin(dim=1).clamp(max=0.0)  # (S,)  min is never above 0
    mx = x.amax(dim=1)  # (S,)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    degenerate = mx == mn
    iscale = fmax / (mx - mn)  # (S,)
    scale = 1.0 / iscale
    levels = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)  # (S, n)
    diff = scale[:, None] * levels + mn[:, None] - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = _f32(float(num)) / (mx - mn)  # uses the current (possibly refined) min
        laux = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)  # (S, n)
        wl = w * laux
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * laux)
        sum_xl = _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        diff = this_scale[:, None] * laux + this_min[:, None] - x
        cur = _seq_sum(w * (diff * diff))
        better = (det > 0) & (cur < best)
        levels = torch.where(better[:, None], laux, levels)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    levels = torch.where(degenerate[:, None], torch.zeros_like(levels), levels)
    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    return scale, -mn, levels


def _nearest_u8_min63(v: Tensor) -> Tensor:
    """C's `uint8_t l = nearest_int(v); l = MIN(63, l)` (wraps negatives like the C cast)."""
    return (torch.round(v).to(torch.int64) & 0xFF).clamp(max=63)


def quantize_q4_k(x: Tensor) -> Tensor:
    """Quantize (..., K) floats, K % 256 == 0, to Q4_K bytes (..., K / 256 * 144)."""
    blocks, shape = _to_blocks(x, "q4_k")  # (nb, 256)
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 8, 32)  # (S, 32) sub-blocks
    # torch's float32 CPU sqrt is not correctly rounded; sqrt in float64 then rounding is (= C sqrtf)
    av_x = torch.sqrt((_seq_sum(sub * sub) / _f32(32.0)).double()).float()  # (S,)
    weights = av_x[:, None] + sub.abs()  # (S, 32)
    scales, mins, levels = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    # C starts both maxima at +0 and only replaces on `>`: never -0 (which would flip dmin's sign bit)
    max_scale = scales.amax(dim=1)  # (nb,)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = mins.amax(dim=1)
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, _f32(63.0) / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _f32(63.0) / max_min, torch.zeros_like(max_min))
    ls = _nearest_u8_min63(inv_scale[:, None] * scales)  # (nb, 8) int64 in [0, 63]
    lm = _nearest_u8_min63(inv_min[:, None] * mins)
    packed_scales = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    ).to(torch.uint8)  # (nb, 12)
    d16 = (max_scale / _f32(63.0)).to(torch.float16)
    dmin16 = (max_min / _f32(63.0)).to(torch.float16)
    d = d16.float()[:, None] * ls.float()  # (nb, 8)
    dm = dmin16.float()[:, None] * lm.float()
    d, dm = d.reshape(-1, 1), dm.reshape(-1, 1)  # (S, 1)
    requant = torch.round((sub + dm) / d).clamp(0, 15)  # (S, 32)
    levels = (
        torch.where(d == 0, levels, requant).to(torch.uint8).reshape(nb, 4, 2, 32)
    )  # (nb, chunk, half, 32)
    qs = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(nb, 128)
    out = torch.cat(
        [d16.reshape(-1, 1).view(torch.uint8), dmin16.reshape(-1, 1).view(torch.uint8), packed_scales, qs],
        dim=1,
    )
    return out.reshape(shape)


def q4_k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Unpack (nb, 12) uint8 into the 6-bit scales and mins, each (nb, 8) uint8."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]  # (nb, 4) each
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mins


def dequantize_q4_k(data: Tensor) -> Tensor:
    """Q4_K bytes (..., nbytes) -> float32 (..., K)."""
    blocks, shape = _from_bytes(data, "q4_k")
    nb = blocks.shape[0]
    d = _fp16_from(blocks[:, 0:2])  # (nb,)
    dmin = _fp16_from(blocks[:, 2:4])
    sc, m = q4_k_scale_min(blocks[:, 4:16])  # (nb, 8)
    dl = (d[:, None] * sc.float()).reshape(nb, 8, 1)
    ml = (dmin[:, None] * m.float()).reshape(nb, 8, 1)
    qs = blocks[:, 16:].reshape(nb, 4, 1, 32)  # (nb, chunk, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(nb, 8, 32).float()  # (nb, sub, 32)
    return (dl * q - ml).reshape(shape)


# ------------------------------------------------------------------------------------- generic
_QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_k": quantize_q4_k}
_DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0, "q4_k": dequantize_q4_k}


def quantize_gguf(x: Tensor, qtype: str) -> Tensor:
    """Quantize (..., K) floats to the GGUF block type `qtype` ("q8_0", "q4_0" or "q4_k")."""
    bs, _ = _check_qtype(qtype)
    from llama2.quant.kernels import quantize as fast  # bit-identical C++ quantizers

    if x.dim() > 0 and x.shape[-1] % bs == 0 and fast.fast_quantize_usable(x):
        return fast.fast_quantize_gguf(x, qtype)
    return _QUANTIZE[qtype](x)


def dequantize_gguf(data: Tensor, qtype: str) -> Tensor:
    """Dequantize GGUF `qtype` bytes (..., nbytes) to float32 (..., K)."""
    _check_qtype(qtype)
    return _DEQUANTIZE[qtype](data)
