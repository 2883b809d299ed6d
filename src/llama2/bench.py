"""`llama2 bench`: prompt-processing and text-generation speed, load time and memory, like `llama-bench`.

Measured the way llama.cpp's `llama-bench` measures (so the two tables compare):

- **pp N** (default 512): one forward over N random prompt tokens into an empty KV cache, logits of
  the last position only; tokens/s = N / time.
- **tg N** (default 128): N single-token decode steps from a one-token prompt, greedy; tokens/s =
  N / time. Every step is a full decode step of the real generation loop (`Generator`), sampling
  included.
- each test runs once untimed (warm-up: caches, allocator, `torch.compile`), then `reps` times;
  the table shows mean ± sample standard deviation.

Also reported: load time (reading and quantizing the weights, or building random ones), the model's
weight bytes, the peak resident memory of the process (`VmHWM`, reset before each model where the
kernel allows it), and, given a memory bandwidth, the decode ceiling `bandwidth / bytes read per
token` (every weight once, plus one embedding row) and the fraction of it reached.

Models are a checkpoint (path or embedded name) or a named preset shape (`--preset tinyllama-1.1b`)
with random weights built directly in the target dtype and quantized layer by layer, so a large
preset never exists in float32 unless float32 is what is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2.config import PRESETS, ModelArgs
from llama2.errors import ConfigError, GenerationError
from llama2.model import Transformer
from llama2.model.kv_cache import KVCache
from llama2.quant import QuantConfig, accelerate, quantize_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
INIT_STD = 0.02  # random weights ~ N(0, 0.02^2), as Llama's initialisation


# --------------------------------------------------------------------------------- results
@dataclass
class BenchResult:
    """One benchmarked model configuration.

    Attributes:
        model: what was measured (preset name or checkpoint path).
        dtype: weight/activation dtype name of the unquantized parts.
        scheme: quantization scheme, None for plain float weights.
        threads: torch intra-op threads.
        n_params: parameter count of the model shape.
        weight_bytes: bytes of all weights (parameters and buffers, KV cache excluded).
        bytes_per_token: weight bytes a decode step reads (all but the embedding table, plus one row).
        load_s: seconds to load (or build) and quantize the weights.
        pp: prompt length of the pp test (0: not run).
        tg: generated tokens of the tg test (0: not run).
        pp_tps: prompt tokens/s of each repetition.
        tg_tps: generated tokens/s of each repetition.
        peak_rss_bytes: peak resident memory of the process (VmHWM) after the tests.
        bandwidth_gbs: memory read bandwidth used for the ceilings (GB/s, 1e9 bytes), or None.
        extra: anything a caller wants to record with the row (e.g. the engine's name).
    """

    model: str
    dtype: str
    scheme: str | None
    threads: int
    n_params: int
    weight_bytes: int
    bytes_per_token: int
    load_s: float
    pp: int
    tg: int
    pp_tps: list[float] = field(default_factory=list)
    tg_tps: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    bandwidth_gbs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """The scheme if quantized, else the dtype."""
        return self.scheme or self.dtype

    @property
    def pp_mean(self) -> float:
        return mean_std(self.pp_tps)[0]

    @property
    def pp_std(self) -> float:
        return mean_std(self.pp_tps)[1]

    @property
    def tg_mean(self) -> float:
        return mean_std(self.tg_tps)[0]

    @property
    def tg_std(self) -> float:
        return mean_std(self.tg_tps)[1]

    @property
    def tg_ceiling(self) -> float | None:
        """Decode tokens/s if every step only streamed its weights at the measured bandwidth."""
        if self.bandwidth_gbs is None or self.bytes_per_token <= 0:
            return None
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token

    @property
    def tg_fraction(self) -> float | None:
        """tg tokens/s as a fraction of `tg_ceiling`."""
        ceiling = self.tg_ceiling
        return None if ceiling is None or not self.tg_tps else self.tg_mean / ceiling

    def to_row(self) -> dict[str, Any]:
        """A flat JSON-able dict: the fields plus means, deviations and ceilings."""
        row = dataclasses.asdict(self)
        row.update(
            precision=self.precision,
            pp_mean=self.pp_mean,
            pp_std=self.pp_std,
            tg_mean=self.tg_mean,
            tg_std=self.tg_std,
            tg_ceiling=self.tg_ceiling,
            tg_fraction=self.tg_fraction,
        )
        return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values; NaN mean for none)."""
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), 0.0
    return statistics.fmean(values), statistics.stdev(values)


# --------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """The process's peak resident set size (`VmHWM` in /proc/self/status), 0 where unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss_bytes() -> int:
    """The process's current resident set size (`VmRSS`), 0 where unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset `VmHWM` to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _is_cache_tensor(module: nn.Module) -> bool:
    return isinstance(module, KVCache)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, KV caches excluded (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if _is_cache_tensor(module):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def bytes_per_token(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything except the embedding table, plus one row of it."""
    emb = model.tok_embeddings.weight
    emb_bytes = emb.numel() * emb.element_size()
    row = emb.shape[1] * emb.element_size()
    return weight_bytes(model) - emb_bytes + row


# --------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(
    size_bytes: int = 1 << 30, reps: int = 7, threads: int | None = None
) -> tuple[float, list[float]]:
    """Memory read bandwidth in GB/s (1e9 bytes/s): median over `reps` `torch.sum` passes of a buffer.

    The buffer (float32, default 1 GiB) is far larger than the caches, so each sum streams it from
    DRAM; one untimed pass first faults the pages in.

    Args:
        size_bytes: buffer size.
        reps: timed passes.
        threads: torch intra-op threads to use (default: the current setting); restored afterwards.

    Returns:
        (median GB/s, every pass's GB/s).
    """
    if size_bytes < 4 or reps < 1:
        raise ConfigError(f"bandwidth needs size_bytes >= 4 and reps >= 1, got {size_bytes}, {reps}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_bytes // 4, dtype=torch.float32)
        torch.sum(buf)
        rates: list[float] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.sum(buf)
            rates.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        del buf
    finally:
        torch.set_num_threads(old)
    return statistics.median(rates), rates


# --------------------------------------------------------------------------------- models
def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name (`float32`, `bfloat16`, `float16`, or `fp32`/`bf16`/`f16`)."""
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)} (or fp32, bf16, f16)")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def make_quant_config(
    scheme: str | None, include_output: bool = False, groupsize: int | None = None
) -> QuantConfig | None:
    """A `llama2.quant.QuantConfig` for `scheme` (None: no quantization)."""
    if scheme is None:
        return None
    kwargs: dict[str, Any] = {"include_output": include_output}
    if groupsize is not None:
        kwargs["groupsize"] = groupsize
    return QuantConfig(scheme, **kwargs)


@torch.no_grad()
def _init_random_(module: nn.Module, gen: torch.Generator) -> None:
    """Fill a freshly materialised module in place: norms 1, everything else N(0, INIT_STD^2)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or (name == "weight" and p.dim() == 1):
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def random_model(
    args: ModelArgs,
    dtype: torch.dtype = torch.float32,
    *,
    quantize: QuantConfig | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Transformer:
    """A `Transformer` of shape `args` with random weights, built in `dtype` on the CPU.

    The model is created on the `meta` device and materialised one block at a time, each block's
    linears quantized (with `quantize`, a `QuantConfig`) before the next exists, so peak memory is
    the final model plus one float block.

    Args:
        args: the shape (e.g. `PRESETS["tinyllama-1.1b"]`).
        dtype: dtype of the float weights (embeddings, norms, unquantized linears).
        quantize: a `llama2.quant.QuantConfig` or None.
        seed: random seed of the weights.
        progress: print one line per block on stderr.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype)
    for name in ("tok_embeddings", "norm", "output"):
        part = getattr(model, name).to_empty(device="cpu")
        _init_random_(part, gen)
        setattr(model, name, part)
    if quantize is not None and quantize.include_output:
        holder = nn.Module()  # quantize_model takes a top-level `output` only; the blocks are still meta
        holder.output = model.output
        quantize_model(holder, quantize)
        model.output = holder.output
    blocks = model.layers
    for i in range(len(blocks)):
        block = blocks[i].to_empty(device="cpu")
        _init_random_(block, gen)
        if quantize is not None:
            quantize_model(block, quantize)
        blocks[i] = block
        if progress and sys.stderr.isatty():
            print(f"\r  building block {i + 1}/{len(blocks)}", end="", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    accelerate(model)  # bf16/fp16 linears -> the CPU kernels, as load_model does
    return model.eval()


# bytes per weight of each scheme's quantized linears (scales included; int4 at groupsize 128)
_SCHEME_BYTES = {"int8": 1.0, "int4": 0.53, "nf4": 0.52, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k": 144 / 256}


def estimate_weight_bytes(args: ModelArgs, dtype: torch.dtype, quantize: QuantConfig | None) -> int:
    """Approximate bytes of a model of shape `args` (float parts in `dtype`, linears per `quantize`)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = args.num_params()
    emb_out = 2 * args.vocab_size * args.dim
    if quantize is None:
        return total * elem
    linears = total - emb_out - (2 * args.n_layers + 1) * args.dim
    per = _SCHEME_BYTES.get(quantize.scheme, 1.0)
    head = args.vocab_size * args.dim
    floats = total - linears - (head if quantize.include_output else 0)
    quantized = linears + (head if quantize.include_output else 0)
    return int(floats * elem + quantized * per)


def available_memory_bytes() -> int | None:
    """Bytes the CPU can allocate now (`llama2.plan.available_memory`)."""
    from llama2.plan import available_memory

    return available_memory("cpu")


def load_checkpoint_model(
    path: str | Path,
    dtype: torch.dtype | None,
    quantize: QuantConfig | None,
    max_seq_len: int | None,
    progress: bool,
) -> Transformer:
    """Load a checkpoint with `llama2.checkpoint.load.load_model`, quantizing tensor by tensor while
    loading (`quantize`: a `QuantConfig` or None), so the float model never exists in full."""
    from llama2.assets import resolve_model
    from llama2.checkpoint.load import load_model

    loaded = load_model(
        resolve_model(path), dtype=dtype, max_seq_len=max_seq_len, progress=progress, quantize=quantize
    )
    return loaded.model.eval()


# --------------------------------------------------------------------------------- timing
class _NullTokenizer:
    """The generator's tokenizer interface with no EOS (generation always runs to the limit)."""

    eos_id = -1

    def decode(self, ids: Sequence[int]) -> str:
        return ""


class _NullDetokenizer:
    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def _null_detok(tokenizer: Any) -> _NullDetokenizer:
    return _NullDetokenizer()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def time_calls(
    fn: Callable[[], object],
    reps: int,
    warmup: int = 1,
    budget_s: float | None = None,
    on_rep: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Seconds of each of up to `reps` calls of `fn`, after `warmup` untimed calls.

    With `budget_s`, stops early once another call would take the timed total past it (at least
    one call is always timed). `on_rep(i, seconds)` is called after each timed call.
    """
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(reps):
        if budget_s is not None and out and sum(out) + out[-1] > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if on_rep is not None:
            on_rep(len(out), out[-1])
    return out


def bench_model(
    model: Transformer,
    *,
    pp: int = 512,
    tg: int = 128,
    reps: int = 3,
    warmup: bool = True,
    seed: int = 0,
    label: str = "model",
    scheme: str | None = None,
    load_s: float = 0.0,
    bandwidth_gbs: float | None = None,
    progress: bool = False,
    budget_s: float | None = None,
) -> BenchResult:
    """Measure pp and tg tokens/s of a model through the generation loop (see the module docstring).

    Args:
        model: the model, in eval mode, on its device.
        pp: prompt tokens of the pp test (0 skips it).
        tg: generated tokens of the tg test (0 skips it).
        reps: timed repetitions of each test.
        warmup: run each test once untimed first (tg: min(tg, 16) tokens).
        seed: seed of the random prompt tokens.
        label: the `model` field of the result.
        scheme: the quantization scheme to record (None: float weights).
        load_s: load time to record.
        bandwidth_gbs: memory bandwidth for the ceilings, or None.
        progress: print progress lines on stderr.
        budget_s: soft cap on the timed seconds of each test: repetitions stop once another would
            pass it (at least one always runs), and a tg test whose warm-up speed says one
            repetition alone would pass it generates fewer tokens (`result.tg`; the asked count is
            kept in `result.extra["tg_asked"]`). None: no cap, exactly what was asked.

    Returns:
        A `BenchResult` (peak memory read after the tests).
    """
    from llama2.generation import Generator, SamplingParams

    if pp < 0 or tg < 0 or reps < 1:
        raise ConfigError(f"need pp >= 0, tg >= 0 and reps >= 1; got pp={pp}, tg={tg}, reps={reps}")
    args = model.args
    ctx = max(pp + 1, tg + 1)
    if ctx > args.max_seq_len:
        raise ConfigError(
            f"pp={pp}/tg={tg} need {ctx} positions but the model's context is {args.max_seq_len}"
        )
    device = model.tok_embeddings.weight.device
    emb_dtype = model.tok_embeddings.weight.dtype
    wbytes = weight_bytes(model)
    bpt = bytes_per_token(model)
    model.setup_caches(1, ctx)
    gen = Generator(model, _NullTokenizer(), max_seq_len=ctx, detokenizer_factory=_null_detok)
    greedy = SamplingParams(temperature=0.0)
    rng = torch.Generator().manual_seed(seed)
    prompt: list[int] = torch.randint(0, args.vocab_size, (max(pp, 1),), generator=rng).tolist()
    bos = [1 % args.vocab_size]

    def run_pp() -> None:
        gen.generate([prompt[:pp]], 1, greedy)

    def run_tg(n: int) -> None:
        res = gen.generate([bos], n, greedy)
        if len(res[0].tokens) != n:
            raise GenerationError(f"tg generated {len(res[0].tokens)} tokens, expected {n}")

    result = BenchResult(
        model=label,
        dtype=dtype_name(emb_dtype),
        scheme=scheme,
        threads=torch.get_num_threads(),
        n_params=args.num_params(),
        weight_bytes=wbytes,
        bytes_per_token=bpt,
        load_s=load_s,
        pp=pp,
        tg=tg,
        bandwidth_gbs=bandwidth_gbs,
        extra={"device": str(device)},
    )
    what = f"{label} {result.precision}"

    if pp > 0:
        if warmup:
            _log(progress, f"[bench] {what}: pp{pp} warm-up")
            run_pp()
        pp_times = time_calls(
            run_pp,
            reps,
            warmup=0,
            budget_s=budget_s,
            on_rep=lambda i, t: _log(progress, f"[bench] {what}: pp{pp} rep {i}/{reps}: {pp / t:.2f} t/s"),
        )
        result.pp_tps = [pp / t for t in pp_times]
        _log(progress, f"[bench] {what}: pp{pp}: {_fmt_pm(result.pp_tps)} t/s ({len(pp_times)} reps)")
    if tg > 0:
        n = tg
        if warmup:
            _log(progress, f"[bench] {what}: tg warm-up")
            n_warm = min(tg, 16)
            warm_tps = n_warm / time_calls(lambda: run_tg(n_warm), 1, warmup=0)[0]
            if budget_s is not None and tg / warm_tps > budget_s:
                n = max(n_warm, int(budget_s * warm_tps))
                result.tg = n
                result.extra["tg_asked"] = tg
                _log(progress, f"[bench] {what}: tg{tg} would take {tg / warm_tps:.0f} s; measuring tg{n}")
        tg_times = time_calls(
            lambda: run_tg(n),
            reps,
            warmup=0,
            budget_s=budget_s,
            on_rep=lambda i, t: _log(progress, f"[bench] {what}: tg{n} rep {i}/{reps}: {n / t:.2f} t/s"),
        )
        result.tg_tps = [n / t for t in tg_times]
        _log(progress, f"[bench] {what}: tg{n}: {_fmt_pm(result.tg_tps)} t/s ({len(tg_times)} reps)")
    model.clear_caches()
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def bench_config(
    *,
    model: str | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    scheme: str | None = None,
    include_output: bool = False,
    groupsize: int | None = None,
    pp: int = 512,
    tg: int = 128,
    reps: int = 3,
    warmup: bool = True,
    seed: int = 0,
    bandwidth_gbs: float | None = None,
    progress: bool = False,
    budget_s: float | None = None,
) -> BenchResult:
    """Load (or build) one model configuration, time its loading, and `bench_model` it.

    Exactly one of `model` (checkpoint path or embedded name) and `preset` (a `PRESETS` name, random
    weights) must be given. The peak-memory counter is reset first (where the kernel allows it), so
    `peak_rss_bytes` covers this configuration only.
    """
    if (model is None) == (preset is None):
        raise ConfigError("give exactly one of a model (checkpoint path or name) and a preset shape")
    qcfg = make_quant_config(scheme, include_output, groupsize)
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        args = PRESETS[preset]
        ctx = max(pp + 1, tg + 1)
        if ctx > args.max_seq_len:
            args = args.replace(max_seq_len=ctx)
        _log(
            progress,
            f"[bench] building {preset} ({dtype_name(dtype or torch.float32)}, {scheme or 'no quant'})",
        )
        need = estimate_weight_bytes(args, dtype or torch.float32, qcfg)
        avail = available_memory_bytes()
        if avail is not None and need > 0.9 * avail:
            raise ConfigError(
                f"preset {preset} in {dtype_name(dtype or torch.float32)}/{scheme or 'float'} needs about "
                f"{need / 2**30:.1f} GiB of weights but only {avail / 2**30:.1f} GiB of memory is available; "
                "choose a smaller preset or a quantization scheme"
            )
        net = random_model(args, dtype or torch.float32, quantize=qcfg, seed=seed, progress=progress)
        label = preset
    elif model is not None:
        _log(progress, f"[bench] loading {model}")
        ctx = max(pp + 1, tg + 1)
        net = load_checkpoint_model(model, dtype, qcfg, None, progress)
        if ctx > net.args.max_seq_len:  # speed does not depend on it; positions are explicit
            _log(progress, f"[bench] {model}'s context is {net.args.max_seq_len}; extending it to {ctx}")
            net.args = net.args.replace(max_seq_len=ctx)
        label = str(model)
    load_s = time.perf_counter() - t0
    _log(progress, f"[bench] loaded in {load_s:.1f} s; {weight_bytes(net) / 2**20:.0f} MiB of weights")
    try:
        with torch.inference_mode():
            return bench_model(
                net,
                pp=pp,
                tg=tg,
                reps=reps,
                warmup=warmup,
                seed=seed,
                label=label,
                scheme=scheme,
                load_s=load_s,
                bandwidth_gbs=bandwidth_gbs,
                progress=progress,
                budget_s=budget_s,
            )
    finally:
        del net
        gc.collect()


# --------------------------------------------------------------------------------- table
def _fmt_pm(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def format_table(results: Sequence[BenchResult]) -> str:
    """A Markdown table of results, one row per configuration."""
    head = [
        "model", "precision", "threads", "weights MiB", "load s", "peak RSS MiB",
        "pp t/s", "tg t/s", "tg ceiling t/s", "tg % of ceiling",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        ceiling = r.tg_ceiling
        frac = r.tg_fraction
        cells = [
            r.model,
            r.precision + (f" ({r.dtype})" if r.scheme else ""),
            str(r.threads),
            f"{r.weight_bytes / 2**20:.0f}",
            f"{r.load_s:.1f}",
            f"{r.peak_rss_bytes / 2**20:.0f}",
            f"{_fmt_pm(r.pp_tps)}" + (f" (pp{r.pp})" if r.pp else ""),
            f"{_fmt_pm(r.tg_tps)}" + (f" (tg{r.tg})" if r.tg else ""),
            "-" if ceiling is None else f"{ceiling:.1f}",
            "-" if frac is None else f"{100 * frac:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(results: Sequence[BenchResult], path: Path | str, meta: dict[str, Any] | None = None) -> None:
    """Write `{"meta": ..., "rows": [result.to_row(), ...]}` to `path`."""
    doc = {"meta": meta or {}, "rows": [r.to_row() for r in results]}
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------- CLI
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `llama2 bench`'s options to a parser (the lead's cli.py calls this)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or file, or an embedded model name (base, chat, code)",
    )
    src.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="a named model shape with random weights instead of a checkpoint (e.g. tinyllama-1.1b)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated dtypes of the float weights: float32, bfloat16, float16 (default: the "
        "checkpoint's own; float32 for --preset)",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        help="comma-separated quantization schemes, 'none' for float weights (int8, int4, nf4, q8_0, q4_0, "
        "q4_k); one row per dtype x scheme",
    )
    parser.add_argument("--quantize-output", action="store_true", help="also quantize the output head")
    parser.add_argument("--groupsize", type=int, default=None, help="int4 group size (default: 128)")
    parser.add_argument(
        "-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test (0: skip)"
    )
    parser.add_argument(
        "-n", "--n-gen", type=int, default=128, help="generated tokens of the tg test (0: skip)"
    )
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="timed repetitions of each test")
    parser.add_argument("-t", "--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--bandwidth",
        default=None,
        help="memory bandwidth in GB/s for the decode ceiling, or 'measure' (1 GiB torch.sum, median of 7)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="soft cap in seconds per test: fewer repetitions (and a shorter tg if one alone would "
        "pass it); default: none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and prompt tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run `llama2 bench` with parsed `add_arguments` options; prints the table, returns 0."""
    if args.model is None and args.preset is None:
        raise ConfigError("llama2 bench needs --model PATH|NAME or --preset NAME (e.g. --preset 110m)")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    dtypes: list[torch.dtype | None]
    if args.dtype:
        dtypes = [parse_dtype(d) for d in _csv(args.dtype)]
    else:
        dtypes = [torch.float32 if args.preset is not None else None]
    schemes: list[str | None] = [None]
    if args.quantize:
        schemes = [None if s.lower() == "none" else s.lower() for s in _csv(args.quantize)]
        for s in schemes:
            make_quant_config(s)  # validate every scheme before spending time on the first
    bandwidth: float | None = None
    if args.bandwidth is not None:
        if str(args.bandwidth).lower() == "measure":
            _log(progress, "[bench] measuring memory bandwidth")
            bandwidth, _ = measure_bandwidth(threads=torch.get_num_threads())
            _log(progress, f"[bench] bandwidth: {bandwidth:.1f} GB/s")
        else:
            try:
                bandwidth = float(args.bandwidth)
            except ValueError:
                raise ConfigError(
                    f"--bandwidth must be a number (GB/s) or 'measure', got {args.bandwidth!r}"
                ) from None
    results: list[BenchResult] = []
    for dtype in dtypes:
        for scheme in schemes:
            results.append(
                bench_config(
                    model=args.model,
                    preset=args.preset,
                    dtype=dtype,
                    scheme=scheme,
                    include_output=args.quantize_output,
                    groupsize=args.groupsize,
                    pp=args.n_prompt,
                    tg=args.n_gen,
                    reps=args.repetitions,
                    warmup=not args.no_warmup,
                    seed=args.seed,
                    bandwidth_gbs=bandwidth,
                    progress=progress,
                    budget_s=args.budget,
                )
            )
    print(format_table(results))
    if bandwidth is not None:
        print(
            f"\nmemory bandwidth: {bandwidth:.1f} GB/s; tg ceiling = bandwidth / weight bytes read per token"
        )
    if args.json is not None:
        write_json(results, args.json, {"bandwidth_gbs": bandwidth, "torch": torch.__version__})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m llama2.bench`), same options as `llama2 bench`."""
    parser = argparse.ArgumentParser(
        prog="llama2 bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_arguments(parser)
    with contextlib.suppress(BrokenPipeError):
        return run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "BenchResult",
    "add_arguments",
    "bench_config",
    "bench_model",
    "bytes_per_token",
    "estimate_weight_bytes",
    "format_table",
    "make_quant_config",
    "mean_std",
    "measure_bandwidth",
    "peak_rss_bytes",
    "random_model",
    "reset_peak_rss",
    "run",
    "time_calls",
    "weight_bytes",
    "write_json",
]
