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
import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llama2.bench_memory import (
    bytes_per_token,
    measure_bandwidth,
    peak_rss_bytes,
    reset_peak_rss,
    weight_bytes,
)
from llama2.bench_models import (
    available_memory_bytes,
    estimate_weight_bytes,
    load_checkpoint_model,
    make_quant_config,
    random_model,
)
from llama2.bench_report import BenchResult, format_pm, format_table, mean_std, write_json
from llama2.config import PRESETS
from llama2.dtypes import DTYPE_NAMES, dtype_name, parse_dtype
from llama2.errors import ConfigError, GenerationError
from llama2.model import Transformer
from llama2.outpath import check_output_path
from llama2.quant import QuantConfig, parse_quant_specs


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
        _log(progress, f"[bench] {what}: pp{pp}: {format_pm(result.pp_tps)} t/s ({len(pp_times)} reps)")
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
        _log(progress, f"[bench] {what}: tg{n}: {format_pm(result.tg_tps)} t/s ({len(tg_times)} reps)")
    model.clear_caches()
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def bench_config(
    *,
    model: str | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    scheme: str | QuantConfig | None = None,
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
    label_scheme = None if qcfg is None else qcfg.spec()  # `int4,groupsize=64`: parses back to qcfg
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
            f"[bench] building {preset} ({dtype_name(dtype or torch.float32)}, {label_scheme or 'no quant'})",
        )
        need = estimate_weight_bytes(args, dtype or torch.float32, qcfg)
        avail = available_memory_bytes()
        if avail is not None and need > 0.9 * avail:
            raise ConfigError(
                f"preset {preset} in {dtype_name(dtype or torch.float32)}/{label_scheme or 'float'} needs "
                "about "
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
                scheme=label_scheme,
                load_s=load_s,
                bandwidth_gbs=bandwidth_gbs,
                progress=progress,
                budget_s=budget_s,
            )
    finally:
        del net
        gc.collect()


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
        help=f"comma-separated dtypes of the float weights: {', '.join(DTYPE_NAMES)} (default: the "
        "checkpoint's own; float32 for --preset)",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        help="comma-separated quantization specs, 'none' for float weights (int8, int4, nf4, q8_0, q4_0, "
        "q4_k; options follow their scheme as everywhere: none,int8,int4,groupsize=64,nf4); one row per "
        "dtype x scheme",
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
    if args.json is not None:
        check_output_path(args.json, folder=False, what="--json")  # before minutes of benchmarking
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
    schemes: list[QuantConfig | None] = [None]
    if args.quantize:  # every scheme parsed (so validated) before time is spent on the first
        schemes = parse_quant_specs(args.quantize)
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
