"""Fast C++ weight quantizers (`csrc/quantize.cpp`), bit-identical to the pure-torch ones.

The torch quantizers in `llama2.quant` (`quantize_int8`, `quantize_int4`, `quantize_nf4`,
`quantize_blockwise_8bit`, `quantize_gguf`) are the reference; each calls the matching function
here first when `fast_quantize_usable(x)` says so (a CPU float32/bfloat16/float16 tensor, the
extension built, `LLAMA2_NO_KERNELS` unset) and returns exactly the same tensors, about 10-1000x
sooner (quantizing a 7B model while loading takes about a minute instead of up to hours).

The extension is built separately from the matmul kernels (`build.py`), with the same compiler
flags (`-ffp-contract=off`: no fused multiply-add, which would change float32 results), into
`$LLAMA2_KERNEL_CACHE/quantize-<key>` (default `~/.cache/llama2/kernels/quantize-<key>`), the key
hashing the source, the torch version and the flags. It registers `torch.ops.llama2_quantize.*`.
A failed build warns once and the torch path is used.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from llama2.quant.kernels.build import build_extension, cache_dir, load_once
from llama2.quant.nf4_tables import quantize_lut

_SOURCE = Path(__file__).with_name("csrc") / "quantize.cpp"
_NAMESPACE = "llama2_quantize"
_PREFIX = "quantize-"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_state: dict[str, bool] = {}
_luts: dict[bytes, Tensor] = {}


def quantize_cache_dir() -> Path:
    """The build directory of the quantizer extension for this source, torch version and CPU."""
    return cache_dir(_SOURCE, _PREFIX)


def fast_quantize_available() -> bool:
    """Load (building on first use) the quantizer extension; False when disabled or the build failed."""
    return load_once(
        _state, _lock, lambda: build_extension(_SOURCE, _NAMESPACE, _PREFIX), "fast CPU quantizers"
    )


def fast_quantize_usable(x: Tensor) -> bool:
    """Whether the fast quantizers may take `x`: a non-empty CPU float tensor, extension built."""
    return x.device.type == "cpu" and x.dtype in _FLOAT_DTYPES and x.numel() > 0 and fast_quantize_available()


def _prep(x: Tensor) -> Tensor:
    return x.detach().contiguous()


def fast_quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """As `quantize_int8` (a validated 2-D weight): int8 (N, K) codes, float32 (N,) scales."""
    q, scales = torch.ops.llama2_quantize.int8_quantize(_prep(w))
    return q, scales


def fast_quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """As `quantize_int4` (validated shape): uint8 (N, K/2) codes, bfloat16 (K/gs, N, 2) scales/zeros."""
    packed, sz = torch.ops.llama2_quantize.int4_quantize(_prep(w), groupsize)
    return packed, sz


def fast_quantize_nf4(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """NF4 codes and float32 absmax of `w` flattened, as `quantize_nf4` before double quantization.

    Returns:
        (packed (ceil(n / 2), 1) uint8, absmax (ceil(n / blocksize),) float32); a short last block's
        absmax is clamped to 1e-38 as bitsandbytes does.
    """
    packed, absmax = torch.ops.llama2_quantize.nf4_quantize(_prep(w), blocksize)
    return packed, absmax


def _lut(code: Tensor) -> Tensor:
    c = code.detach().float().cpu().contiguous()
    key = c.numpy().tobytes()
    if key not in _luts:
        _luts[key] = quantize_lut(c).to(torch.uint8)  # (65536,) indices in [0, 255]
    return _luts[key]


def fast_quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """As `quantize_blockwise_8bit`: uint8 codes with x's shape and float32 absmax per block."""
    flat = x.detach().reshape(-1).float().contiguous()
    q, absmax = torch.ops.llama2_quantize.blockwise8_quantize(flat, _lut(code), blocksize)
    return q.reshape(x.shape), absmax


_GGUF_OPS = {  # qtype -> (op, values per block, bytes per block)
    "q8_0": ("q8_0_quantize", 32, 34),
    "q4_0": ("q4_0_quantize", 32, 18),
    "q4_k": ("q4_k_quantize", 256, 144),
}


def fast_quantize_gguf(x: Tensor, qtype: str) -> Tensor:
    """As `quantize_gguf` (validated qtype and row length): uint8 (..., K / block * block_bytes)."""
    name, bs, ts = _GGUF_OPS[qtype]
    out: Tensor = getattr(torch.ops.llama2_quantize, name)(_prep(x))
    return out.reshape(*x.shape[:-1], x.shape[-1] // bs * ts)
