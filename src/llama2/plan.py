"""Memory plan: how many bytes a model needs for a scheme, context and batch, before loading anything.

`estimate_memory(args, scheme=..., dtype=..., max_seq_len=..., batch_size=...)` returns a `MemoryPlan`:

- weights, from the storage layouts in `llama2.quant.registry` (per (N, K) linear, N = out, K = in features):
  float `N*K*itemsize`; int8 `N*K + 4N` (fp32 scale per row); int4 `N*K/2 + 4*N*K/g` (bf16 scale and
  zero per group of g); nf4 `ceil(N*K/2) + 4*ceil(N*K/64)` (fp32 absmax per block), or with double
  quantization `ceil(N*K/2) + nb + 4*ceil(nb/256) + 1028` (uint8 absmax, fp32 nested absmax per 256
  blocks, the 256-entry fp32 code and the fp32 offset); GGUF blocks `N*K/32*34` (q8_0),
  `N*K/32*18` (q4_0), `N*K/256*144` (q4_k). Embeddings, norms and (unless quantized) the output head
  stay in `dtype`.
- the KV cache: `2 * n_layers * batch * seq * n_kv_heads * head_dim * itemsize(kv_dtype)`;
- activations: the peak of tensors alive during one prefill forward of `batch x max_seq_len` tokens
  from position 0, as `Generator` runs it (`lockstep.lockstep_forward(..., last_only=True)`: only the last
  position goes through the output head, so logits are `batch x vocab`, not `batch x seq x vocab`;
  `full_logits=True` plans for the full (B, T, V) float32 logits of `eval perplexity` or `echo`).
  The peak is the largest of the per-stage live sets of the eager model (attention norm, rotary,
  attention with its float copy of the boolean mask inside SDPA, the SwiGLU feed-forward with three
  (B, T, ffn) tensors alive), plus each quantized linear's transient dequantization buffers, which
  are measured once per scheme on a small probe layer (so the plan follows the kernels actually in
  use); see `llama2.plan_activations`.

`estimate_memory` is pure (no file, no device: a stored checkpoint's exact layout comes in as
`WeightBytes`, read from its headers by `llama2.checkpoint.plan`); `check_fits(plan, device)` compares
with what the device has free and raises `OutOfMemoryError` naming the total, what is free and what
to change. The `llama2 plan` command (argument parsing) lives in `llama2.plan_cli`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from llama2.config import ModelArgs
from llama2.dtypes import dtype_name, parse_dtype
from llama2.errors import ConfigError, OutOfMemoryError
from llama2.model.kv_cache import default_cache_dtype
from llama2.plan_activations import (  # re-exported: the plan's activation half
    LinearCost,
    activation_bytes,
    default_linear_cost,
    linear_cost,
    measure_linear_cost,
    peak_allocated,
)
from llama2.quant.convert import BLOCK_LINEARS, QuantConfig, parse_quant_spec
from llama2.quant.registry import get_scheme, storage_bytes

DEFAULT_MARGIN = 0.10  # check_fits keeps this fraction of the available memory free


# =================================================================================== weights
def quantized_linear_bytes(out_features: int, in_features: int, config: QuantConfig) -> int:
    """Bytes of the buffers of one quantized (out_features, in_features) linear: the scheme's storage
    layout in `llama2.quant.registry` (see the module docstring).

    Raises:
        ConfigError: the scheme does not apply to this shape (e.g. in_features not a multiple of the
            int4 group size or of the GGUF block).
    """
    return storage_bytes(out_features, in_features, config)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes known exactly (e.g. from a stored checkpoint's tensor headers), by part.

    Attributes:
        linear: the block linears (wq..w3) of every layer.
        embedding: `tok_embeddings`.
        norm: every RMSNorm weight.
        output: the output head.
        output_quantized: whether the output head is a quantized module (it sets the KV-cache dtype).
    """

    linear: int
    embedding: int
    norm: int
    output: int
    output_quantized: bool = False

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.norm + self.output

    @classmethod
    def from_tensors(cls, sizes: Iterable[tuple[str, int]], output_quantized: bool = False) -> WeightBytes:
        """Sum (parameter name, bytes) pairs by part: `output.*`, `tok_embeddings.*`, `*norm.weight`,
        and the block linears (everything else)."""
        parts = {"linear": 0, "embedding": 0, "norm": 0, "output": 0}
        for name, nbytes in sizes:
            module = name.rsplit(".", 1)[0]
            if module == "output":
                parts["output"] += nbytes
            elif module == "tok_embeddings":
                parts["embedding"] += nbytes
            elif name.endswith("norm.weight"):
                parts["norm"] += nbytes
            else:
                parts["linear"] += nbytes
        return cls(**parts, output_quantized=output_quantized)


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
            (f"KV cache ({dtype_name(self.kv_dtype)})", self.kv_cache_bytes),
            ("activations (prefill)", self.activation_bytes),
            ("total", self.total_bytes),
        ]


def as_quant_config(scheme: str | QuantConfig | None, include_output: bool = False) -> QuantConfig | None:
    """None / 'none' -> None; a spec (`"nf4"`, `"int4,groupsize=64"`, see `parse_quant_spec`) -> its
    QuantConfig (`include_output=True` adds the output head); a QuantConfig as is."""
    if scheme is None or isinstance(scheme, QuantConfig):
        return scheme
    if scheme.strip().lower() in ("none", "", "float"):
        return None
    config = parse_quant_spec(scheme)
    if config is not None and include_output:
        config = dataclasses.replace(config, include_output=True)
    return config


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
    stored: WeightBytes | None = None,
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
        stored: the weights' exact bytes (a stored checkpoint's layout, e.g. GGUF files with mixed
            block types: `llama2.checkpoint.plan.stored_weight_bytes`) instead of computing them from
            `scheme`; `scheme` then only sets the activations' dequantization buffers.

    Raises:
        ConfigError: non-positive sizes, an unknown scheme/dtype, or (without `stored`) a scheme that
            cannot hold a layer's shape.

    A pure function of its arguments: it reads no file and no device.
    """
    if max_seq_len <= 0 or batch_size <= 0:
        raise ConfigError(f"max_seq_len and batch_size must be positive, got {max_seq_len} and {batch_size}")
    dtype = parse_dtype(dtype)
    config = as_quant_config(scheme, include_output)
    weights = stored if stored is not None else planned_weight_bytes(args, config, dtype)
    head_quantized = weights.output_quantized
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
        linear_bytes=weights.linear,
        embedding_bytes=weights.embedding,
        norm_bytes=weights.norm,
        output_bytes=weights.output,
        kv_cache_bytes=kv,
        activation_bytes=act,
    )


def planned_weight_bytes(args: ModelArgs, config: QuantConfig | None, dtype: torch.dtype) -> WeightBytes:
    """The weights of `args` with every block linear (and the head if asked) in `config`'s layout, the
    rest in `dtype` (ConfigError when the scheme cannot hold a layer's shape)."""
    s = dtype.itemsize
    linear = 0
    for name, (n, k) in _linear_shapes(args).items():
        if config is None:
            linear += n * k * s
            continue
        try:
            linear += quantized_linear_bytes(n, k, config)
        except ConfigError as err:
            raise ConfigError(f"cannot quantize {name} ({n}x{k}) with {config.scheme}: {err}") from err
    d, v = args.dim, args.vocab_size
    head_quantized = config is not None and config.include_output
    if head_quantized and config is not None:
        try:
            output = quantized_linear_bytes(v, d, config)
        except ConfigError as err:
            raise ConfigError(f"cannot quantize output ({v}x{d}) with {config.scheme}: {err}") from err
    else:
        output = v * d * s
    return WeightBytes(
        linear=linear * args.n_layers,
        embedding=v * d * s,
        norm=(2 * args.n_layers + 1) * d * s,
        output=output,
        output_quantized=head_quantized,
    )


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


def check_kv_cache_fits(
    args: ModelArgs, batch: int, seq_len: int, weight_dtype: torch.dtype, device: torch.device | str
) -> None:
    """Raise `OutOfMemoryError` before allocating a `batch x seq_len` KV cache (Meta's `Llama.build`
    allocates one up front) when it will not fit in the memory available on `device`."""
    cache_dtype = default_cache_dtype(weight_dtype if weight_dtype.is_floating_point else None, device)
    itemsize = torch.empty((), dtype=cache_dtype).element_size()
    need = 2 * args.n_layers * batch * seq_len * args.kv_heads * args.head_dim * itemsize  # K and V
    free = available_memory(device)
    if need > free:
        raise OutOfMemoryError(
            f"the KV cache of max_batch_size={batch} x max_seq_len={seq_len} needs {format_bytes(need)} "
            f"but {format_bytes(free)} is available; pass a smaller max_batch_size or max_seq_len"
        )


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
    four_bit = plan.scheme is not None and get_scheme(plan.scheme.scheme).bits <= 4
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
        f"scheme {scheme}, dtype {dtype_name(plan.dtype)}, context {plan.max_seq_len}, "
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
    "LinearCost",
    "MemoryPlan",
    "WeightBytes",
    "activation_bytes",
    "as_quant_config",
    "available_memory",
    "check_fits",
    "default_linear_cost",
    "estimate_memory",
    "fits",
    "format_bytes",
    "format_plan",
    "linear_cost",
    "measure_linear_cost",
    "parse_dtype",
    "peak_allocated",
    "planned_weight_bytes",
    "quantized_linear_bytes",
]
