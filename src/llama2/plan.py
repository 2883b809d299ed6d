"""Memory plan: how many bytes a model needs for a scheme, context and batch, before loading anything.

`estimate_memory(args, scheme=..., dtype=..., max_seq_len=..., batch_size=...)` returns a `MemoryPlan`:

- weights, from the storage layouts in `llama2.quant` (per (N, K) linear, N = out, K = in features):
  float `N*K*itemsize`; int8 `N*K + 4N` (fp32 scale per row); int4 `N*K/2 + 4*N*K/g` (bf16 scale and
  zero per group of g); nf4 `ceil(N*K/2) + 4*ceil(N*K/64)` (fp32 absmax per block), or with double
  quantization `ceil(N*K/2) + nb + 4*ceil(nb/256) + 1028` (uint8 absmax, fp32 nested absmax per 256
  blocks, the 256-entry fp32 code and the fp32 offset); GGUF blocks `N*K/32*34` (q8_0),
  `N*K/32*18` (q4_0), `N*K/256*144` (q4_k). Embeddings, norms and (unless quantized) the output head
  stay in `dtype`.
- the KV cache: `2 * n_layers * batch * seq * n_kv_heads * head_dim * itemsize(kv_dtype)`;
- activations: the peak of tensors alive during one prefill forward of `batch x max_seq_len` tokens
  from position 0, as `Generator` runs it (`Generator._forward(..., last_only=True)`: only the last
  position goes through the output head, so logits are `batch x vocab`, not `batch x seq x vocab`;
  `full_logits=True` plans for the full (B, T, V) float32 logits of `eval perplexity` or `echo`).
  The peak is the largest of the per-stage live sets of the eager model (attention norm, rotary,
  attention with its float copy of the boolean mask inside SDPA, the SwiGLU feed-forward with three
  (B, T, ffn) tensors alive), plus each quantized linear's transient dequantization buffers, which
  are measured once per scheme on a small probe layer (so the plan follows the kernels actually in
  use).

`check_fits(plan, device)` raises `OutOfMemoryError` naming the total, what is free and what to
change. `add_arguments` / `run` are the `llama2 plan` command (headers only: no tensor is read).
"""

from __future__ import annotations

import argparse
import functools
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llama2.config import PRESETS, ModelArgs, preset
from llama2.errors import ConfigError, OutOfMemoryError
from llama2.model.kv_cache import default_cache_dtype
from llama2.quant.convert import BLOCK_LINEARS, QuantConfig
from llama2.quant.gguf_blocks import BLOCK_SIZES
from llama2.quant.nf4 import NESTED_BLOCKSIZE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MARGIN = 0.10  # check_fits keeps this fraction of the available memory free


# =================================================================================== weights
def quantized_linear_bytes(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bytes of the buffers of one quantized (out_features, in_features) linear (see module docstring).

    Raises:
        ConfigError: the scheme does not apply to this shape (e.g. in_features not a multiple of the
            int4 group size or of the GGUF block).
    """
    n, k = out_features, in_features
    s = config.scheme
    if s == "int8":
        return n * k + 4 * n  # int8 codes + float32 scale per row
    if s == "int4":
        g = config.groupsize
        if k % g:
            raise ConfigError(f"int4 groupsize {g} does not divide in_features {k}")
        return n * (k // 2) + (k // g) * n * 2 * 2  # uint8 (N, K/2) + bf16 (K/g, N, 2)
    if s == "nf4":
        numel = n * k
        nblocks = -(-numel // config.blocksize)
        packed = (numel + 1) // 2
        if not config.double_quant:
            return packed + 4 * nblocks  # float32 absmax per block
        nested = -(-nblocks // NESTED_BLOCKSIZE)
        return packed + nblocks + 4 * nested + 256 * 4 + 4  # uint8 absmax, fp32 nested, code, offset
    block, nbytes = BLOCK_SIZES[s]
    if k % block:
        raise ConfigError(f"{s} needs in_features divisible by {block}, got {k}")
    return n * (k // block) * nbytes


def _linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear."""
    d, kv, f = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    return {
        "wq": (d, d),
        "wk": (kv, d),
        "wv": (kv, d),
        "wo": (d, d),
        "w1": (f, d),
        "w2": (d, f),
        "w3": (f, d),
    }


# ================================================================================ the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs (see the module docstring). Every `*_bytes` field is an int.

    Attributes:
        args: the model shape.
        scheme: the QuantConfig, or None for float weights.
        dtype: dtype of float weights and activations.
        max_seq_len, batch_size: the KV-cache and prefill shape planned for.
        kv_dtype: dtype of the KV cache.
        linear_bytes: the block linears (wq..w3) of every layer, quantized or not.
        embedding_bytes: `tok_embeddings`.
        norm_bytes: every RMSNorm weight.
        output_bytes: the output head (quantized when `scheme.include_output`).
        kv_cache_bytes: keys and values of every layer.
        activation_bytes: the peak transient memory of a prefill of `batch_size x max_seq_len`.
        notes: layers a scheme could not apply to, and other caveats.
    """

    args: ModelArgs
    scheme: QuantConfig | None
    dtype: torch.dtype
    max_seq_len: int
    batch_size: int
    kv_dtype: torch.dtype
    linear_bytes: int
    embedding_bytes: int
    norm_bytes: int
    output_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def other_weight_bytes(self) -> int:
        """Embeddings + norms + output head."""
        return self.embedding_bytes + self.norm_bytes + self.output_bytes

    @property
    def weight_bytes(self) -> int:
        return self.linear_bytes + self.other_weight_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) for the table."""
        label = "float" if self.scheme is None else self.scheme.scheme
        return [
            (f"weights: block linears ({label})", self.linear_bytes),
            ("weights: embeddings + norms + output", self.other_weight_bytes),
            ("weights: total", self.weight_bytes),
            (f"KV cache ({_dtype_name(self.kv_dtype)})", self.kv_cache_bytes),
            ("activations (prefill)", self.activation_bytes),
            ("total", self.total_bytes),
        ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {name}")
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}") from None


def as_quant_config(scheme: str | QuantConfig | None, include_output: bool = False) -> QuantConfig | None:
    """None / 'none' -> None; a scheme name -> its default QuantConfig; a QuantConfig as is."""
    if scheme is None or isinstance(scheme, QuantConfig):
        return scheme
    if scheme.lower() in ("none", "", "float"):
        return None
    return QuantConfig(scheme.lower(), include_output=include_output)


def estimate_memory(
    args: ModelArgs,
    *,
    scheme: str | QuantConfig | None,
    dtype: torch.dtype,
    max_seq_len: int,
    batch_size: int,
    kv_dtype: torch.dtype | None = None,
    include_output: bool = False,
    full_logits: bool = False,
    measure_kernels: bool = False,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """Plan the memory of `args` loaded with `scheme` in `dtype`, with a `batch_size x max_seq_len` cache.

    Args:
        args: the model shape (from a checkpoint's header or a preset).
        scheme: None for float weights, a scheme name ("nf4", ...) or a QuantConfig.
        dtype: dtype of the float weights (embeddings, norms, unquantized linears) and activations.
        max_seq_len: positions of the KV cache and length of the planned prefill.
        batch_size: sequences decoded together.
        kv_dtype: KV-cache dtype; default as `Transformer.setup_caches` (`default_cache_dtype`):
            float32 on CPU, elsewhere the output head's dtype (float32 when it is quantized).
        include_output: quantize the output head too (when `scheme` is a name; a QuantConfig says it).
        full_logits: plan for (B, T, vocab) float32 logits (perplexity, echo) instead of the last
            position's only (generation).
        measure_kernels: measure the quantized layers' transient buffers on probe layers (about a
            second) instead of using `default_linear_cost`.
        device: where the model will run (it sets the default KV-cache dtype).

    Raises:
        ConfigError: non-positive sizes or an unknown scheme/dtype.
    """
    if max_seq_len <= 0 or batch_size <= 0:
        raise ConfigError(f"max_seq_len and batch_size must be positive, got {max_seq_len} and {batch_size}")
    dtype = parse_dtype(dtype)
    config = as_quant_config(scheme, include_output)
    s = dtype.itemsize
    notes: list[str] = []
    linear = 0
    float_linears: set[str] = set()
    for name, (n, k) in _linear_shapes(args).items():
        if config is None:
            linear += n * k * s
            float_linears.add(name)
            continue
        try:
            linear += quantized_linear_bytes(n, k, config)
        except ConfigError as err:
            raise ConfigError(f"cannot quantize {name} ({n}x{k}) with {config.scheme}: {err}") from err
    linear *= args.n_layers
    d, v = args.dim, args.vocab_size
    head_quantized = config is not None and config.include_output
    if head_quantized and config is not None:
        try:
            output = quantized_linear_bytes(v, d, config)
        except ConfigError as err:
            raise ConfigError(f"cannot quantize output ({v}x{d}) with {config.scheme}: {err}") from err
    else:
        output = v * d * s
    if kv_dtype is None:
        kv_dtype = default_cache_dtype(None if head_quantized else dtype, device)
    kv = 2 * args.n_layers * batch_size * max_seq_len * args.kv_heads * args.head_dim * kv_dtype.itemsize
    act = activation_bytes(
        args, config, dtype, max_seq_len, batch_size, kv_dtype, full_logits, measure_kernels
    )
    return MemoryPlan(
        args=args,
        scheme=config,
        dtype=dtype,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        kv_dtype=kv_dtype,
        linear_bytes=linear,
        embedding_bytes=v * d * s,
        norm_bytes=(2 * args.n_layers + 1) * d * s,
        output_bytes=output,
        kv_cache_bytes=kv,
        activation_bytes=act,
        notes=tuple(notes),
    )


# =============================================================================== activations
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


# ================================================================================== fitting
def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can be allocated now on `device`: CPU `MemAvailable` (else free pages), CUDA free memory."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "meta":
        return 1 << 62
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _suggestions(plan: MemoryPlan, budget: int) -> list[str]:
    out: list[str] = []
    fixed = plan.weight_bytes
    per_seq_pos = (plan.kv_cache_bytes + plan.activation_bytes) / (plan.batch_size * plan.max_seq_len)
    if fixed < budget:
        fit_len = int((budget - fixed) / (per_seq_pos * plan.batch_size))
        if 0 < fit_len < plan.max_seq_len:
            out.append(f"a shorter context (--max-seq-len {fit_len} or less)")
        if plan.batch_size > 1:
            fit_b = int((budget - fixed) / (per_seq_pos * plan.max_seq_len))
            if fit_b >= 1:
                out.append(f"a smaller batch (--batch-size {fit_b} or less)")
    four_bit = plan.scheme is not None and plan.scheme.scheme in ("int4", "nf4", "q4_0", "q4_k")
    if not four_bit:
        nf4 = estimate_memory(
            plan.args,
            scheme="nf4",
            dtype=plan.dtype,
            max_seq_len=plan.max_seq_len,
            batch_size=plan.batch_size,
            kv_dtype=plan.kv_dtype,
        )
        out.append(f"a 4-bit scheme (--quantize nf4: {format_bytes(nf4.total_bytes)} in all)")
    if plan.dtype == torch.float32:
        out.append("bfloat16 weights (--dtype bfloat16)")
    return out


def check_fits(
    plan: MemoryPlan, device: torch.device | str | None = None, margin: float = DEFAULT_MARGIN
) -> None:
    """Raise `OutOfMemoryError` if `plan.total_bytes` exceeds (1 - margin) of what `device` has free.

    Args:
        plan: from `estimate_memory`.
        device: where the model will live (default CPU).
        margin: fraction of the available memory to keep free (default 10%).

    Raises:
        OutOfMemoryError: the model will not fit; the message names the total, the free memory and
            the options that would fit (shorter context, smaller batch, 4-bit weights).
        ConfigError: margin outside [0, 1).
    """
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"margin must be in [0, 1), got {margin}")
    avail = available_memory(device)
    budget = int(avail * (1.0 - margin))
    if plan.total_bytes <= budget:
        return
    dev = torch.device(device if device is not None else "cpu")
    parts = ", ".join(f"{label} {format_bytes(n)}" for label, n in plan.rows()[:-1] if "total" not in label)
    tips = _suggestions(plan, budget)
    raise OutOfMemoryError(
        f"the model needs about {format_bytes(plan.total_bytes)} ({parts}) but {dev} has "
        f"{format_bytes(avail)} available ({format_bytes(budget)} after a {margin:.0%} margin); "
        + ("try " + "; or ".join(tips) if tips else "use a machine with more memory")
    )


# ====================================================================================== CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`llama2 plan`'s options (the lead's cli.py calls this)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="checkpoint path or embedded model (base, chat, code)")
    src.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a named model shape")
    parser.add_argument("--quantize", default=None, help="int8, int4, nf4, q8_0, q4_0, q4_k (default: none)")
    parser.add_argument("--quantize-output", action="store_true", help="also quantize the output head")
    parser.add_argument("--groupsize", type=int, default=128, help="int4 group size (default: 128)")
    parser.add_argument("--no-double-quant", action="store_true", help="nf4 without double quantization")
    parser.add_argument(
        "--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default: bfloat16)"
    )
    parser.add_argument("--max-seq-len", type=int, default=None, help="context (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default: 1)")
    parser.add_argument("--device", default="cpu", help="device whose free memory to compare against")
    parser.add_argument("--full-logits", action="store_true", help="plan for (B, T, vocab) logits (eval)")


def _args_for(ns: argparse.Namespace) -> tuple[ModelArgs, str]:
    if ns.preset is not None:
        return preset(ns.preset), f"preset {ns.preset}"
    from llama2.assets import resolve_model
    from llama2.checkpoint.load import read_checkpoint

    path = resolve_model(ns.model)
    return read_checkpoint(path).args, str(path)


def run(ns: argparse.Namespace) -> int:
    """Print the memory table for the parsed `add_arguments` options; 0 if it fits, 1 if not."""
    args, source = _args_for(ns)
    config = None
    if ns.quantize is not None and ns.quantize.lower() != "none":
        config = QuantConfig(
            ns.quantize.lower(),
            groupsize=ns.groupsize,
            double_quant=not ns.no_double_quant,
            include_output=ns.quantize_output,
        )
    seq = ns.max_seq_len if ns.max_seq_len is not None else args.max_seq_len
    plan = estimate_memory(
        args,
        scheme=config,
        dtype=parse_dtype(ns.dtype),
        max_seq_len=seq,
        batch_size=ns.batch_size,
        full_logits=ns.full_logits,
        device=ns.device,
    )
    print(format_plan(plan, source, ns.device))
    return 0 if fits(plan, ns.device) else 1


def fits(plan: MemoryPlan, device: torch.device | str | None = None, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether `check_fits` would pass."""
    try:
        check_fits(plan, device, margin)
    except OutOfMemoryError:
        return False
    return True


def format_plan(plan: MemoryPlan, source: str = "", device: torch.device | str | None = "cpu") -> str:
    """The table `llama2 plan` prints."""
    a = plan.args
    scheme = "none" if plan.scheme is None else json_scheme(plan.scheme)
    head = (
        f"{source}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.kv_heads} KV), ffn "
        f"{a.ffn_hidden_dim}, vocab {a.vocab_size}, {_count(a.num_params())} parameters\n"
        f"scheme {scheme}, dtype {_dtype_name(plan.dtype)}, context {plan.max_seq_len}, "
        f"batch {plan.batch_size}"
    )
    avail = available_memory(device)
    rows = [*plan.rows(), (f"available on {device}", avail)]
    width = max(len(label) for label, _ in rows)
    lines = [head, ""]
    for label, n in rows:
        lines.append(f"{label:<{width}}  {format_bytes(n):>11}  {n:>16,}")
    lines.append(f"{'fits (10% margin)':<{width}}  {'yes' if fits(plan, device) else 'no':>11}")
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def json_scheme(config: QuantConfig) -> str:
    """'nf4 (blocksize 64, double quant)' and the like."""
    meta = config.to_metadata()
    extras = [
        f"{k} {v}" for k, v in meta.items() if k not in ("scheme", "compute_dtype") and v not in (None, False)
    ]
    return f"{config.scheme} ({', '.join(extras)})" if extras else config.scheme


__all__ = [
    "BLOCK_LINEARS",
    "MemoryPlan",
    "activation_bytes",
    "add_arguments",
    "as_quant_config",
    "available_memory",
    "check_fits",
    "estimate_memory",
    "fits",
    "format_bytes",
    "format_plan",
    "parse_dtype",
    "peak_allocated",
    "quantized_linear_bytes",
    "run",
]
