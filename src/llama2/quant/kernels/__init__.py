"""Fused CPU kernels for the quantized (and bfloat16/float16) linear layers.

The per-scheme functions (`gguf_linear`, `int8_linear`, `int4_linear`, `nf4_linear`,
`dense_linear`) are what the modules call; they return x's dtype (computed in float32, rounded
once at the end):

- up to `MV_MAX_ROWS` activation rows (decode), a matrix-vector kernel streams the stored weight
  once (`torch.ops.llama2_kernels.*_mv`, C++ with AVX2, threads from torch's pool); the op takes
  float32/bfloat16/float16 x of any leading shape and returns x's dtype, so a decode call is one
  op call with no conversions or reshapes in Python;
- more rows (prefill), the weight is dequantized to float32 in row chunks of at most
  `CHUNK_ELEMENTS` values (`*_dequant`) and multiplied with torch's float32 GEMM, which on a CPU
  without native bfloat16 is several times faster than torch's bfloat16 GEMM.

Numerics of the decode kernels (the GEMM path is always "dequantize, then float32 matmul"):
- NF4, bfloat16 and float16 weights (and int8/int4 with `quantize_activations=False`) are
  decoded to float32 in registers and multiplied with float32 activations, float32 accumulation:
  the values of "dequantize, then float32 matmul" up to summation order.
- Q8_0, Q4_0, Q4_K, and int8/int4 by default, quantize each activation row to Q8_0 blocks of 32
  first (ggml's reference quantizer, as the `gguf` package), then take integer dot products, as
  llama.cpp does for its quantized types. The activation's relative rounding error is about
  0.2-0.5% per block, an order of magnitude below the weight's 4-bit error; measured it is ~2x
  faster per weight byte than decoding the weight to float32 on this AVX2 CPU.

`kernels_enabled(x)` says whether a call with this input may use them (CPU, no autograd through
the input, the extension built); see `build.py` for building and the `LLAMA2_NO_KERNELS` switch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2.quant.kernels.build import (
    cache_dir,
    compile_flags,
    kernels_available,
    kernels_disabled,
    kernels_ready,
    set_kernels_disabled,
)

MV_MAX_ROWS = 16  # activation rows up to which the matrix-vector kernels beat dequantize + GEMM
CHUNK_ELEMENTS = 1 << 22  # float32 weight values dequantized at once on the GEMM path (16 MiB)
GGUF_QTYPE_IDS = {"q8_0": 0, "q4_0": 1, "q4_k": 2}

__all__ = [
    "CHUNK_ELEMENTS",
    "MV_MAX_ROWS",
    "cache_dir",
    "compile_flags",
    "kernel_linear",
    "kernels_available",
    "kernels_disabled",
    "kernels_enabled",
    "prepare_for_compile",
    "set_kernels_disabled",
]


def _available_eager() -> bool:
    return kernels_ready()


_available: Callable[[], bool] = _available_eager  # replaced by `prepare_for_compile`


def prepare_for_compile() -> None:
    """Call before `torch.compile` traces code that may run the kernels: torch.compile then treats
    "are the kernels available" as a constant instead of tracing the build/environment logic. Not
    done at import, because it imports torch._dynamo (about a second, half of every command's start-up).
    """
    global _available
    if _available is _available_eager:
        _available = torch.compiler.assume_constant_result(_available_eager)  # type: ignore[no-untyped-call]


def kernels_enabled(x: Tensor, weight: Tensor) -> bool:
    """Whether a forward with input `x` over stored tensor `weight` can use the CPU kernels."""
    if not (x.is_cpu and weight.is_cpu):
        return False
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        return False  # the ops have no backward; autograd takes the torch path
    return _available()


_MV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # x dtypes the *_mv ops take as is


def _mv_ready(x: Tensor) -> bool:
    """Whether `x` (..., K) goes straight to a matrix-vector op: at most `MV_MAX_ROWS` rows, a dtype
    the op reads, contiguous, and (only while torch.compile traces, whose shape functions are 2-D)
    two-dimensional. The op returns (..., N) in x's dtype."""
    k = x.shape[-1]
    return (
        x.dtype in _MV_DTYPES
        and (x.numel() <= MV_MAX_ROWS * k if k else True)
        and x.is_contiguous()
        and (x.dim() == 2 or not torch.compiler.is_compiling())
    )


def kernel_linear(
    x: Tensor,
    out_features: int,
    mv: Callable[[Tensor], Tensor],
    dequant: Callable[[int, int], Tensor],
) -> Tensor:
    """y = x @ W.T through the kernels, in x's dtype (computed in float32, rounded once).

    The per-scheme wrappers below call the matrix-vector op directly when `_mv_ready(x)`; this is
    the general path (more rows, other dtypes or layouts, tracing).

    Args:
        x: (..., K) activations, any float dtype.
        out_features: N, the weight's rows.
        mv: (M, K) contiguous float32 -> (M, N) float32, the matrix-vector kernel.
        dequant: (row0, row1) -> (row1 - row0, K) float32 rows of the weight.

    Returns:
        (..., N) in x's dtype.
    """
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.dtype != torch.float32:
        x2 = x2.to(torch.float32)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] <= MV_MAX_ROWS:
        out = mv(x2)  # (M, N)
    else:
        step = max(1, CHUNK_ELEMENTS // max(1, x2.shape[1]))
        if step >= out_features:
            out = F.linear(x2, dequant(0, out_features))
        else:
            parts = [
                F.linear(x2, dequant(r, min(r + step, out_features))) for r in range(0, out_features, step)
            ]
            out = torch.cat(parts, dim=1)  # (M, N)
    out = out if x.dim() == 2 else out.reshape(*lead, out_features)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _ops() -> torch._ops._OpNamespace:
    return torch.ops.llama2_kernels


def gguf_linear(x: Tensor, weight: Tensor, qtype: str) -> Tensor:
    """x (..., K) @ dequantize_gguf(weight).T in x's dtype, Q8_0-quantized activations when M is small."""
    qid = GGUF_QTYPE_IDS[qtype]
    ops = _ops()
    mv_op = ops.q8_0_mv if qid == 0 else ops.q4_0_mv if qid == 1 else ops.q4_k_mv
    if _mv_ready(x):
        return mv_op(x, weight)  # type: ignore[no-any-return]
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: mv_op(x2, weight),
        lambda r0, r1: ops.gguf_dequant(weight, qid, r0, r1),
    )


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, quantize_activations: bool = True) -> Tensor:
    """x (..., K) @ (weight * scales[:, None]).T in x's dtype; weight (N, K) int8, scales (N,).

    With `quantize_activations` (and K % 32 == 0) the decode kernel quantizes x to Q8_0 blocks
    and uses integer dot products (llama.cpp's method, ~2x less work per weight byte); otherwise
    it multiplies float32 activations with the decoded weight.
    """
    ops = _ops()
    s = scales if scales.dtype == torch.float32 and scales.is_contiguous() else scales.float().contiguous()
    mv_op = ops.int8_q8_mv if quantize_activations and weight.shape[1] % 32 == 0 else ops.int8_mv
    if _mv_ready(x):
        return mv_op(x, weight, s)  # type: ignore[no-any-return]
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: mv_op(x2, weight, s),
        lambda r0, r1: ops.int8_dequant(weight, s, r0, r1),
    )


def int4_linear(
    x: Tensor, weight: Tensor, scales_and_zeros: Tensor, groupsize: int, quantize_activations: bool = True
) -> Tensor:
    """x (..., K) @ dequantize_int4(weight, scales_and_zeros, groupsize).T in x's dtype.

    `quantize_activations` as for `int8_linear` (groupsize is always a multiple of 32).
    """
    ops = _ops()
    mv_op = ops.int4_q8_mv if quantize_activations else ops.int4_mv
    if _mv_ready(x):
        return mv_op(x, weight, scales_and_zeros, groupsize)  # type: ignore[no-any-return]
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: mv_op(x2, weight, scales_and_zeros, groupsize),
        lambda r0, r1: ops.int4_dequant(weight, scales_and_zeros, groupsize, r0, r1),
    )


def nf4_linear(
    x: Tensor,
    packed: Tensor,
    shape: tuple[int, int],
    absmax: Tensor,
    blocksize: int,
    code: Tensor,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """x (..., K) @ dequantize_nf4(...).T in x's dtype, for a (N, K) NF4 weight with K % blocksize == 0."""
    ops = _ops()
    n, k = shape
    if _mv_ready(x):
        return ops.nf4_mv(  # type: ignore[no-any-return]
            x, packed, n, k, absmax, nested_absmax, nested_code, offset, code, blocksize
        )
    return kernel_linear(
        x,
        n,
        lambda x2: ops.nf4_mv(x2, packed, n, k, absmax, nested_absmax, nested_code, offset, code, blocksize),
        lambda r0, r1: ops.nf4_dequant(
            packed, n, k, absmax, nested_absmax, nested_code, offset, code, blocksize, r0, r1
        ),
    )


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K) @ weight.T in x's dtype for a bfloat16/float16 (N, K) weight, computed in float32."""
    ops = _ops()
    if _mv_ready(x):
        return ops.dense_mv(x, weight)  # type: ignore[no-any-return]
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: ops.dense_mv(x2, weight),
        lambda r0, r1: ops.dense_dequant(weight, r0, r1),
    )
