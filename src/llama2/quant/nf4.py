"""QLoRA's 4-bit NormalFloat (NF4) with optional double quantization, bit-identical to bitsandbytes.

The numerics follow bitsandbytes' CPU backend (checked against `bitsandbytes` 0.50):

- NF4 (`quantize_4bit(quant_type="nf4")`): each block of `blocksize` values (row-major over the
  flattened tensor, the last block may be short) is scaled by `1 / absmax` (computed in float32,
  absmax clamped to 1e-38), clamped to [-1, 1] and mapped to the NF4 code whose float32 midpoints
  bracket it (a value exactly on a midpoint goes to the lower code). Two codes share a byte, the
  first (even) element in the high nibble. The packed tensor has shape (ceil(n / 2), 1).
- Double quantization (`compress_statistics=True`): the float32 absmax vector minus its mean
  (`offset`) is quantized with the signed 8-bit dynamic map (`create_dynamic_map(signed=True)`)
  in blocks of 256. bitsandbytes' CPU kernel rounds through a 65536-entry lookup table over
  [-1, 1] built from the code's float32 midpoints; that exact procedure is reproduced here.
- Dequantization: `code[q] * absmax` in float32, then cast to the output dtype (round to nearest
  even); nested absmax is `code8[q] * absmax2 + offset` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llama2.errors import ConfigError
from llama2.quant.nf4_tables import LUT_SIZE, quantize_lut

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, appendix E), as float32.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # block size of the 8-bit double quantization of absmax (QLoRA uses 256)


def nf4_code(device: torch.device | str | None = None) -> Tensor:
    """The NF4 code book (16,) float32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The 8-bit dynamic quantization map (Dettmers 2015), sorted, (2**total_bits,) float32.

    Same construction as `bitsandbytes.functional.create_dynamic_map`: for exponent i the
    fraction range [0.1, 1] is split into equal bins whose float32 midpoints are scaled by
    10**(i - max_exponent_bits + 1); 0 and 1 are added and the list is sorted.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_items = (
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else (2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        )
        boundaries = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # float32
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data.append(0)
    data.append(1.0)
    if len(data) != 2**total_bits:
        raise ConfigError(f"dynamic map has {len(data)} entries; expected {2**total_bits}")
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, int]:
    """Pad a flat float32 tensor with zeros to whole blocks: -> (nblocks, blocksize), n."""
    n = flat.numel()
    pad = (-n) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize), n


def _block_absmax(flat: Tensor, blocksize: int) -> Tensor:
    """Per-block max |x| over real elements only (padding is zero, which never wins over |x| >= 0)."""
    blocks, _ = _blocks(flat, blocksize)
    return blocks.abs().amax(dim=1)  # (nblocks,)


# ------------------------------------------------------------------------------ 8-bit blockwise
def quantize_blockwise_8bit(
    x: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization with a 256-entry code, as bitsandbytes' CPU kernel does it.

    Args:
        x: float tensor of any shape (read in float32).
        code: sorted (256,) float32 code book in [-1, 1].
        blocksize: values per absmax block.

    Returns:
        (q, absmax): uint8 codes with x's shape and float32 absmax (ceil(n / blocksize),).
    """
    from llama2.quant.kernels import quantize as fast  # bit-identical C++ quantizers

    if code.numel() <= 256 and code.device.type == "cpu" and fast.fast_quantize_usable(x):
        return fast.fast_quantize_blockwise_8bit(x, code, blocksize)
    flat = x.detach().reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)  # (nb,)
    blocks, n = _blocks(flat, blocksize)  # (nb, bs)
    inv = 1.0 / absmax  # float32; inf where absmax == 0 (handled below)
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)  # (nb, bs)
    idx = (((v + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5).to(torch.int64)  # trunc toward zero, (nb, bs)
    q = quantize_lut(code.float())[idx.clamp(0, LUT_SIZE - 1)]  # (nb, bs)
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.to(torch.uint8).reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise_8bit(
    q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> Tensor:
    """Inverse of `quantize_blockwise_8bit`: code[q] * absmax per block, float32, q's shape."""
    vals = code.float()[q.reshape(-1).long()]  # (n,)
    blocks, n = _blocks(vals, blocksize)  # (nb, bs)
    return (blocks * absmax.float()[:, None]).reshape(-1)[:n].reshape(q.shape)


# ----------------------------------------------------------------------------------------- NF4
@dataclass
class NF4Tensor:
    """A tensor in NF4, laid out as bitsandbytes' `quantize_4bit` returns it.

    Attributes:
        packed: (ceil(n / 2), 1) uint8, two 4-bit codes per byte (first element in the high nibble).
        absmax: (nblocks,) float32 scales, or uint8 codes of them when double-quantized.
        shape: the original shape.
        dtype: the original dtype (the default dequantization dtype).
        blocksize: values per absmax block.
        nested_absmax: (ceil(nblocks / 256),) float32 scales of the quantized absmax, or None.
        nested_code: (256,) float32 dynamic map used for absmax, or None.
        offset: () float32 mean subtracted from absmax before quantizing it, or None.
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in NF4_BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize must be one of {NF4_BLOCKSIZES}, got {blocksize}")


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize a float32/bfloat16/float16 tensor to NF4 (bitsandbytes `quantize_4bit`, nf4).

    Args:
        w: tensor to quantize (any shape).
        blocksize: values per absmax block (QLoRA uses 64).
        double_quant: also quantize the absmax values to 8 bits (blocks of 256, mean offset).

    Returns:
        The packed codes and scales.
    """
    _check_blocksize(blocksize)
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"NF4 quantizes float32, bfloat16 or float16 tensors, got {w.dtype}")
    from llama2.quant.kernels import quantize as fast  # bit-identical C++ quantizers

    if fast.fast_quantize_usable(w):
        packed, absmax = fast.fast_quantize_nf4(w, blocksize)
    else:  # the reference
        packed, absmax = _nf4_codes(w, blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    dyn = create_dynamic_map(signed=True).to(w.device)
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dyn, NESTED_BLOCKSIZE)
    return NF4Tensor(packed, qabsmax, w.shape, w.dtype, blocksize, nested_absmax, dyn, offset)


def _nf4_codes(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """The pure-torch NF4 codes (ceil(n / 2), 1) uint8 and float32 absmax of `w` flattened."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    whole = flat[:full].view(-1, blocksize)  # (nb_full, bs)
    absmax = whole.abs().amax(dim=1)  # (nb_full,)
    scaled = (whole * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)  # (full,)
    if full < n:  # a short last block: bitsandbytes clamps its absmax and divides instead
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1.0, 1.0)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    code = nf4_code(w.device)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,)
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (n_even,)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # (n/2, 1)
    return packed, absmax


def nf4_absmax(t: NF4Tensor) -> Tensor:
    """The float32 per-block scales of `t` (undoing double quantization if used)."""
    if t.nested_absmax is None:
        return t.absmax.float()
    if t.nested_code is None or t.offset is None:
        raise ConfigError("a double-quantized NF4 tensor needs nested_code and offset")
    absmax = dequantize_blockwise_8bit(t.absmax, t.nested_absmax, t.nested_code, NESTED_BLOCKSIZE)
    return absmax + t.offset.float()


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize to `dtype` (default: the original dtype), as bitsandbytes `dequantize_4bit`."""
    n = t.shape.numel()
    q = t.packed.reshape(-1)
    codes = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:n].long()  # (n,)
    vals = nf4_code(q.device)[codes]  # (n,) float32
    blocks, _ = _blocks(vals, t.blocksize)  # (nb, bs)
    out = (blocks * nf4_absmax(t)[:, None]).reshape(-1)[:n]
    return out.reshape(t.shape).to(dtype or t.dtype)
