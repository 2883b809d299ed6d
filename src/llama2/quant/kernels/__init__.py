"""Fused CPU kernels for the quantized (and bfloat16/float16) linear layers.

`kernel_linear(x, out_features, mv, dequant)` is the one entry point the modules use:

- up to `MV_MAX_ROWS` activation rows (decode), a matrix-vector kernel streams the stored weight
  once (`torch.ops.llama2_kernels.*_mv`, C++ with AVX2, threads from torch's pool);
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
    "set_kernels_disabled",
]


def _available_eager() -> bool:
    return kernels_ready()


# torch.compile treats the answer as a constant instead of tracing the build/env logic
_available: Callable[[], bool] = torch.compiler.assume_constant_result(_available_eager)  # type: ignore[no-untyped-call]


def kernels_enabled(x: Tensor, weight: Tensor) -> bool:
    """Whether a forward with input `x` over stored tensor `weight` can use the CPU kernels."""
    if not (x.is_cpu and weight.is_cpu):
        return False
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        return False  # the ops have no backward; autograd takes the torch path
    return _available()


def kernel_linear(
    x: Tensor,
    out_features: int,
    mv: Callable[[Tensor], Tensor],
    dequant: Callable[[int, int], Tensor],
) -> Tensor:
    """y = x @ W.T in float32 through the kernels.

    Args:
        x: (..., K) activations, any float dtype.
        out_features: N, the weight's rows.
        mv: (M, K) contiguous float32 -> (M, N) float32, the matrix-vector kernel.
        dequant: (row0, row1) -> (row1 - row0, K) float32 rows of the weight.

    Returns:
        (..., N) float32.
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
    return out if x.dim() == 2 else out.reshape(*lead, out_features)


def _ops() -> torch._ops._OpNamespace:
    return torch.ops.llama2_kernels


def gguf_linear(x: Tensor, weight: Tensor, qtype: str) -> Tensor:
    """x (..., K) @ dequantize_gguf(weight).T, with Q8_0-quantized activations when M is small."""
    qid = GGUF_QTYPE_IDS[qtype]
    ops = _ops()
    mv_op = ops.q8_0_mv if qid == 0 else ops.q4_0_mv if qid == 1 else ops.q4_k_mv
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: mv_op(x2, weight),
        lambda r0, r1: ops.gguf_dequant(weight, qid, r0, r1),
    )


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, quantize_activations: bool = True) -> Tensor:
    """x (..., K) @ (weight * scales[:, None]).T; weight (N, K) int8, scales (N,) float32.

    With `quantize_activations` (and K % 32 == 0) the decode kernel quantizes x to Q8_0 blocks
    and uses integer dot products (llama.cpp's method, ~2x less work per weight byte); otherwise
    it multiplies float32 activations with the decoded weight.
    """
    ops = _ops()
    s = scales.to(torch.float32).contiguous()
    mv_op = ops.int8_q8_mv if quantize_activations and weight.shape[1] % 32 == 0 else ops.int8_mv
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: mv_op(x2, weight, s),
        lambda r0, r1: ops.int8_dequant(weight, s, r0, r1),
    )


def int4_linear(
    x: Tensor, weight: Tensor, scales_and_zeros: Tensor, groupsize: int, quantize_activations: bool = True
) -> Tensor:
    """x (..., K) @ dequantize_int4(weight, scales_and_zeros, groupsize).T.

    `quantize_activations` as for `int8_linear` (groupsize is always a multiple of 32).
    """
    ops = _ops()
    mv_op = ops.int4_q8_mv if quantize_activations else ops.int4_mv
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
    """x (..., K) @ dequantize_nf4(...).T for a (N, K) NF4 weight with K % blocksize == 0."""
    ops = _ops()
    n, k = shape
    return kernel_linear(
        x,
        n,
        lambda x2: ops.nf4_mv(x2, packed, n, k, absmax, nested_absmax, nested_code, offset, code, blocksize),
        lambda r0, r1: ops.nf4_dequant(
            packed, n, k, absmax, nested_absmax, nested_code, offset, code, blocksize, r0, r1
        ),
    )


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K) @ weight.T for a bfloat16/float16 (N, K) weight, in float32."""
    ops = _ops()
    return kernel_linear(
        x,
        weight.shape[0],
        lambda x2: ops.dense_mv(x2, weight),
        lambda r0, r1: ops.dense_dequant(weight, r0, r1),
    )
