"""Transient memory of a prefill forward: the activations planned by `llama2.plan`, per stage of the eager
model, with each quantized linear's dequantization buffers (a default per scheme, or measured on probe
layers by intercepting torch's allocations). Pure arithmetic except `measure_linear_cost` and
`peak_allocated`, which run small forwards on the CPU."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llama2.config import ModelArgs
from llama2.quant.convert import QuantConfig


class _AllocTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the bytes of new CPU tensor storages created by aten ops, and their peak."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._live and key not in inputs:  # new memory, not an in-place result
                nbytes = storage.nbytes()
                self._live[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storages that `fn` allocates on CPU (and holds at once), by op interception."""
    tracker = _AllocTracker()
    with tracker:
        result = fn()
    del result
    return int(tracker.peak)


@dataclass(frozen=True)
class LinearCost:
    """Transient bytes of one linear forward on an (N, K) weight and T tokens, output included:
    max(peak_per_weight * N*K, held_per_weight * N*K + per_output * N*T + per_input * K*T)."""

    peak_per_weight: float  # dequantization's own peak (T small)
    held_per_weight: float  # weight-sized buffers still alive while the output is written
    per_output: float  # bytes per output element (the output, and e.g. a float32 copy of it)
    per_input: float  # bytes per input element (e.g. a float32 copy of a bfloat16 input)

    def bytes(self, n_out: int, n_in: int, tokens: int) -> float:
        nk = n_out * n_in
        held = self.held_per_weight * nk + (self.per_output * n_out + self.per_input * n_in) * tokens
        return max(self.peak_per_weight * nk, held)


def default_linear_cost(config: QuantConfig | None, dtype: torch.dtype) -> LinearCost:
    """What the quantized modules allocate today (checked against `measure_linear_cost` by the tests):
    a float32 dequantized weight (or chunks of it), a float32 output, and a float32 copy of a
    bfloat16/float16 input."""
    if config is None:
        return LinearCost(0.0, 0.0, float(dtype.itemsize), 0.0)  # a matmul allocates only its output
    up = 4.0 if dtype.itemsize < 4 else 0.0
    return LinearCost(4.0, 4.0, 4.0, up)


def linear_cost(config: QuantConfig | None, dtype: torch.dtype, measure: bool = False) -> LinearCost:
    """`measure_linear_cost` when `measure`, else `default_linear_cost`."""
    return measure_linear_cost(config, dtype) if measure else default_linear_cost(config, dtype)


@functools.lru_cache(maxsize=64)
def measure_linear_cost(config: QuantConfig | None, dtype: torch.dtype) -> LinearCost:
    """The `LinearCost` of a layer quantized with `config` (None: a float `nn.Linear`) in `dtype`,
    measured on 256 x 512 and 512 x 256 probe layers with 1, 256 and 512 tokens (random weights;
    about a second), so it follows whichever kernels the quantized modules use."""
    from torch import nn

    if config is None:
        return default_linear_cost(None, dtype)
    from llama2.quant.convert import quantize_model

    gen = torch.Generator().manual_seed(0)
    probe = QuantConfig(**{**config.to_metadata(), "include_output": False})

    def peak(n: int, k: int, tokens: int) -> int:
        holder = nn.Module()
        holder.wq = nn.Linear(k, n, bias=False, dtype=dtype)
        with torch.no_grad():
            holder.wq.weight.normal_(0.0, 0.02, generator=gen)
        quantize_model(holder, probe)
        layer = holder.wq
        x = torch.randn(tokens, k, generator=gen).to(dtype)
        with torch.no_grad():
            layer(x)  # warm-up: one-off work (code books, repacking) is not per-call workspace
            return peak_allocated(lambda: layer(x))

    t1, t2 = 256, 512
    n, k = 256, 512  # multiples of every block size (q4_k: 256)
    slope_a = (peak(n, k, t2) - peak(n, k, t1)) / (t2 - t1)  # = n * out + k * in
    slope_b = (peak(k, n, t2) - peak(k, n, t1)) / (t2 - t1)  # = k * out + n * in
    per_out = max(0.0, (2 * slope_b - slope_a) / (3 * n))
    per_in = max(0.0, (2 * slope_a - slope_b) / (3 * n))
    held = max(0.0, (peak(n, k, t1) - (per_out * n + per_in * k) * t1) / (n * k))
    top = max(held, peak(n, k, 1) / (n * k))
    return LinearCost(top, held, per_out, per_in)


def activation_bytes(
    args: ModelArgs,
    config: QuantConfig | None,
    dtype: torch.dtype,
    seq_len: int,
    batch_size: int,
    kv_dtype: torch.dtype | None = None,
    full_logits: bool = False,
    measure_kernels: bool = False,
) -> int:
    """Peak transient bytes of one eager prefill forward of (batch_size, seq_len) tokens from position 0.

    Mirrors `llama2.model` stage by stage (per token; s = itemsize(dtype), D = dim, F = ffn width;
    "up" = the float32 copies made when s < 4). A fresh prefill needs no mask (SDPA is causal) and
    reads the rotary table, which is allocated once (max(seq, max_seq_len) x head_dim float32):
      - RMSNorm: its input plus float32 copy and result (8D bytes), or a fused op (sD) in float32;
      - attention: block input and normed x (2sD) plus the larger of the rotary step (q, its float32
        and complex copies, 4D-8D) and the SDPA step (rotated q, k and v, output and its reshaped
        copy, then wo's output and dequantization buffers);
      - feed-forward: block input, attention output, residual and normed input (4sD) plus the
        largest of silu(w1 x), w3 x and their product (3Fs) or a quantized linear with its buffers;
      - head: the normed states and the last position's logits (or all of them with `full_logits`)
        in dtype and float32.
    """
    s = dtype.itemsize
    b, t = batch_size, seq_len
    d, hd, f, v = args.dim, args.head_dim, args.ffn_hidden_dim, args.vocab_size
    kv = args.kv_heads * hd
    lin = linear_cost(
        config, dtype, measure_kernels
    ).bytes  # transient bytes of one (n_out, n_in) linear on T tokens
    f32 = 4
    up = s < f32
    bt = b * t
    table = max(seq_len, args.max_seq_len) * hd * f32  # rotary (cos, sin) table, kept after the first call
    norm = bt * d * (8 if up else s)  # float32 copy + result, cast, scaled; fused in float32
    attn_norm = bt * d * s + norm  # block input + the norm
    rotary = bt * d * s + bt * d * (f32 * up + f32 + s * up)  # q + float32 copy + complex product + cast
    qkv = max(lin(d, d, bt), bt * d * s + lin(kv, d, bt) * 2)  # wq; then wk, wv next to q
    sdpa = bt * (d * s + 2 * kv * s + d * s)  # rotated q, k, v, output
    wo = sdpa + bt * d * s + lin(d, d, bt)  # + reshaped output, wo's output and buffers
    attention = 2 * bt * d * s + max(rotary, qkv, sdpa, wo)
    ffn_norm = 3 * bt * d * s + norm  # block input, attention output, residual + the norm
    ffn = 4 * bt * d * s + max(
        3 * bt * f * s,  # silu(w1 x), w3 x and their product
        bt * f * s + lin(f, d, bt),  # w1 output before silu / w3 while silu(w1 x) is alive
        bt * f * s + lin(d, f, bt),  # w2 on the product
    )
    tokens = bt if full_logits else b  # Generator sends only the last position to the head
    quantized_head = config is not None and config.include_output
    head_out = lin(v, d, tokens) if quantized_head else float(tokens * v * s)
    head = bt * d * s + head_out + (tokens * v * f32 if up else 0)  # normed h, logits, .float()
    final_norm = bt * d * s + norm
    return int(table + max(attn_norm, attention, ffn_norm, ffn, final_norm, head))


__all__ = [
    "LinearCost",
    "activation_bytes",
    "default_linear_cost",
    "linear_cost",
    "measure_linear_cost",
    "peak_allocated",
]
