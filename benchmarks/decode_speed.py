"""Decode (tg128) and prompt (pp512) speed, ours vs llama.cpp vs transformers, in one run.

Same model shapes for all three (random weights, N(0, 0.02)): TinyLlama-1.1B (dim 2048, 22 layers,
32/4 heads, FFN 5632, vocab 32000) and llama2.c's 110M. Each engine is measured the way
`llama-bench` measures: pp N = one forward over N prompt tokens into an empty KV cache; tg N = N
single-token greedy decode steps from a one-token prompt; one warm-up run, then `--reps` timed runs.

- **ours**: `llama2.bench.bench_config` (the real `Generator` loop) at fp32 / bf16 and each
  quantization scheme (int8, int4, q8_0, q4_0, nf4); quantized rows keep their float parts in
  `--quant-dtype` (default bf16) and, like llama.cpp's quantized files, quantize the output head too
  (`--no-quantize-output` to keep it in float).
- **transformers**: `LlamaForCausalLM` at fp32 / bf16 (SDPA attention, dynamic cache), pp as one
  forward with `logits_to_keep=1`, tg with `generate(do_sample=False)`.
- **llama.cpp**: `llama-bench` on GGUF files of the same shape at f32 / f16 / q8_0 / q4_0 (see
  `benchmarks/llamacpp.py`; the binaries are built once, the GGUF files are cached in `.cache/`).

The issue's targets, per precision pairing (fp32~f32, bf16~f16, int8~q8_0, q8_0~q8_0, int4~q4_0,
q4_0~q4_0; quantized rows are compared with transformers bf16, its fastest):
tg >= 1.0x llama.cpp and >= 3x transformers; pp at bf16 >= 1.5x llama.cpp f16. Every tg figure is
also shown as a fraction of the memory-bandwidth ceiling: tokens/s x weight bytes read per token /
measured bandwidth (`benchmarks/bandwidth.py`, same thread count).

Engines of one pairing run back to back so that their ratio sees the same machine load. On this
shared 2-core machine absolute numbers are noisy; the ratios are what the table is for.

Run: `python benchmarks/decode_speed.py [--shapes 110m,tinyllama-1.1b] [--schemes ...] [--reps 3]
[--reps-large 2] [--budget 45] [--skip-llamacpp] [--skip-transformers] [--json PATH]`.

Runtime on an otherwise idle 2-core machine (estimated from the issue's reference speeds): about
2-3 min for 110m and 12-13 min for TinyLlama (2 repetitions; `--budget` caps every pp/tg test of
ours and transformers at ~45 timed seconds, so a slow scheme cannot blow it up). The first run
also writes the GGUF files (TinyLlama: 4.4 GB f32 + f16/q8_0/q4_0, ~2-5 min) into `.cache/gguf-bench/`.
On a loaded machine everything is several times slower and 2 threads oversubscribe the cores:
run it alone.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp  # benchmarks/llamacpp.py
from llama2.bench import (
    BenchResult,
    bench_config,
    mean_std,
    measure_bandwidth,
    peak_rss_bytes,
    reset_peak_rss,
    time_calls,
)
from llama2.config import PRESETS, ModelArgs

SHAPES = ("110m", "tinyllama-1.1b")
SCHEMES = ("fp32", "bf16", "int8", "int4", "q8_0", "q4_0", "nf4")
# ours precision -> (llama.cpp type, transformers dtype) it is compared with
PAIRING: dict[str, tuple[str | None, str]] = {
    "fp32": ("f32", "fp32"),
    "bf16": ("f16", "bf16"),
    "int8": ("q8_0", "bf16"),
    "q8_0": ("q8_0", "bf16"),
    "int4": ("q4_0", "bf16"),
    "q4_0": ("q4_0", "bf16"),
    "nf4": ("q4_0", "bf16"),  # reference only: no target
}
NO_TARGET = {"nf4"}
TG_VS_LLAMACPP = 1.0
TG_VS_TRANSFORMERS = 3.0
PP_BF16_VS_F16 = 1.5
LARGE_PARAMS = 500_000_000


@dataclass
class EngineFigure:
    """pp/tg samples of one engine configuration, with the bytes a decode step reads."""

    engine: str
    precision: str
    pp_tps: list[float]
    tg_tps: list[float]
    bytes_per_token: int
    weight_bytes: int
    peak_rss_bytes: int = 0
    load_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pp(self) -> float:
        return mean_std(self.pp_tps)[0] if self.pp_tps else float("nan")

    @property
    def tg(self) -> float:
        return mean_std(self.tg_tps)[0] if self.tg_tps else float("nan")

    def bw_fraction(self, bandwidth_gbs: float) -> float:
        return self.tg * self.bytes_per_token / (bandwidth_gbs * 1e9)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- engines
def run_ours(
    shape: str,
    precision: str,
    pp: int,
    tg: int,
    reps: int,
    quant_dtype: str,
    quantize_output: bool,
    budget_s: float | None = None,
) -> EngineFigure:
    """Our model through `llama2.bench` (random weights built in the target dtype)."""
    float_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision in float_dtypes:
        dtype, scheme = float_dtypes[precision], None
    else:
        dtype, scheme = float_dtypes[quant_dtype], precision
    r: BenchResult = bench_config(
        preset=shape,
        dtype=dtype,
        scheme=scheme,
        include_output=quantize_output,
        pp=pp,
        tg=tg,
        reps=reps,
        progress=True,
        budget_s=budget_s,
    )
    return EngineFigure(
        "ours",
        precision,
        r.pp_tps,
        r.tg_tps,
        r.bytes_per_token,
        r.weight_bytes,
        r.peak_rss_bytes,
        r.load_s,
        {
            "dtype": r.dtype,
            "scheme": r.scheme,
            "quantize_output": quantize_output and scheme is not None,
            "tg": r.tg,
            **r.extra,
        },
    )


def _hf_model(args: ModelArgs, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**args.to_hf_config())
    cfg.initializer_range = 0.02
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def run_transformers(
    shape: str, precision: str, pp: int, tg: int, reps: int, budget_s: float | None = None
) -> EngineFigure:
    """transformers' LlamaForCausalLM of the same shape: pp one forward, tg greedy `generate`."""
    from transformers import DynamicCache

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    args = PRESETS[shape]
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    model = _hf_model(args, dtype)
    load_s = time.perf_counter() - t0
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    per_token = n_bytes - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, pp), generator=gen)
    bos = torch.tensor([[1]])

    # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def do_pp() -> None:
        model(prompt, use_cache=True, logits_to_keep=1, **{cache_kw: DynamicCache()})

    def do_tg(n: int) -> None:
        out = model.generate(bos, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if out.shape[1] != n + 1:
            raise RuntimeError(f"transformers generated {out.shape[1] - 1} tokens, expected {n}")

    with torch.inference_mode():
        _log(f"[transformers] {shape} {precision}: pp{pp}")
        pp_t = time_calls(do_pp, reps, warmup=1, budget_s=budget_s)
        _log(f"[transformers] {shape} {precision}: tg{tg}")
        n_warm = min(tg, 16)
        warm_tps = n_warm / time_calls(lambda: do_tg(n_warm), 1, warmup=0)[0]
        n = tg
        if budget_s is not None and tg / warm_tps > budget_s:
            n = max(n_warm, int(budget_s * warm_tps))
            _log(
                f"[transformers] {shape} {precision}: tg{tg} would take {tg / warm_tps:.0f} s; "
                f"measuring tg{n}"
            )
        tg_t = time_calls(lambda: do_tg(n), reps, warmup=0, budget_s=budget_s)
    fig = EngineFigure(
        "transformers",
        precision,
        [pp / t for t in pp_t],
        [n / t for t in tg_t],
        per_token,
        n_bytes,
        peak_rss_bytes(),
        load_s,
        {"tg": n},
    )
    _log(f"[transformers] {shape} {precision}: pp {fig.pp:.1f} t/s, tg {fig.tg:.2f} t/s")
    return fig


def run_llamacpp(shape: str, qtype: str, pp: int, tg: int, reps: int, threads: int) -> EngineFigure:
    r = llamacpp.bench_llamacpp(shape, qtype, pp=pp, tg=tg, threads=threads, reps=reps)
    fig = EngineFigure(
        "llama.cpp",
        qtype,
        r.pp.samples_ts if r.pp else [],
        r.tg.samples_ts if r.tg else [],
        r.bytes_per_token,
        r.file_bytes,
        r.peak_rss_bytes,
        extra={"model_type": r.tg.model_type if r.tg else ""},
    )
    _log(f"[llama.cpp] {shape} {qtype}: pp {fig.pp:.1f} t/s, tg {fig.tg:.2f} t/s")
    return fig


# --------------------------------------------------------------------------------- report
def verdict(ratio: float, target: float) -> str:
    """`1.23x (met)` or `0.80x (missed by 20%)` for a ratio against a target ratio."""
    if ratio != ratio:  # NaN
        return "-"
    if ratio >= target:
        return f"{ratio:.2f}x (met, >= {target:g}x)"
    return f"{ratio:.2f}x (missed by {100 * (1 - ratio / target):.0f}%, target {target:g}x)"


def _pct(fig: EngineFigure | None, bw: float) -> str:
    return "-" if fig is None or not fig.tg_tps else f"{100 * fig.bw_fraction(bw):.0f}%"


def _tps(fig: EngineFigure | None, which: str, tg_asked: int = 0) -> str:
    if fig is None:
        return "-"
    vals = fig.tg_tps if which == "tg" else fig.pp_tps
    if not vals:
        return "-"
    m, s = mean_std(vals)
    n = fig.extra.get("tg")
    cut = f" (tg{n}: --budget)" if which == "tg" and tg_asked and n is not None and n != tg_asked else ""
    return f"{m:.2f} ± {s:.2f}{cut}"


def report(
    shape: str, figs: dict[tuple[str, str], EngineFigure], schemes: list[str], bw: float, tg_asked: int = 0
) -> str:
    """The per-shape Markdown tables (tg, then pp) with ratios against the targets."""
    lines = [f"### {shape} (memory bandwidth {bw:.1f} GB/s)", ""]
    lines.append(
        "| ours | tg t/s | % of bw ceiling | llama.cpp | tg t/s | % bw | ours / llama.cpp "
        "| transformers | tg t/s | % bw | ours / transformers |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in schemes:
        ours = figs.get(("ours", p))
        lq, tq = PAIRING[p]
        lc = figs.get(("llama.cpp", lq)) if lq else None
        tf = figs.get(("transformers", tq))
        t1 = TG_VS_LLAMACPP if p not in NO_TARGET else 0.0
        t3 = TG_VS_TRANSFORMERS if p not in NO_TARGET else 0.0
        r_lc = ours.tg / lc.tg if ours and lc and lc.tg_tps and ours.tg_tps else float("nan")
        r_tf = ours.tg / tf.tg if ours and tf and tf.tg_tps and ours.tg_tps else float("nan")
        v_lc = verdict(r_lc, t1) if t1 else (f"{r_lc:.2f}x (reference)" if r_lc == r_lc else "-")
        v_tf = verdict(r_tf, t3) if t3 else (f"{r_tf:.2f}x (reference)" if r_tf == r_tf else "-")
        lines.append(
            f"| {p} | {_tps(ours, 'tg', tg_asked)} | {_pct(ours, bw)} | {lq or '-'} | {_tps(lc, 'tg')} "
            f"| {_pct(lc, bw)} | {v_lc} | {tq} | {_tps(tf, 'tg', tg_asked)} | {_pct(tf, bw)} | {v_tf} |"
        )
    lines += ["", "| ours | pp t/s | llama.cpp | pp t/s | ours / llama.cpp | transformers | pp t/s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for p in schemes:
        ours = figs.get(("ours", p))
        lq, tq = PAIRING[p]
        lc = figs.get(("llama.cpp", lq)) if lq else None
        tf = figs.get(("transformers", tq))
        r_lc = ours.pp / lc.pp if ours and lc and lc.pp_tps and ours.pp_tps else float("nan")
        v = verdict(r_lc, PP_BF16_VS_F16) if p == "bf16" else (f"{r_lc:.2f}x" if r_lc == r_lc else "-")
        lines.append(
            f"| {p} | {_tps(ours, 'pp')} | {lq or '-'} | {_tps(lc, 'pp')} | {v} | {tq} | {_tps(tf, 'pp')} |"
        )
    lines += ["", "| engine | precision | weights MiB | bytes/token MiB | load s | peak RSS MiB |"]
    lines.append("|---|---|---|---|---|---|")
    for (engine, prec), f in figs.items():
        rss = f"{f.peak_rss_bytes / 2**20:.0f}" if f.peak_rss_bytes else "-"
        load = f"{f.load_s:.1f}" if f.engine != "llama.cpp" else "-"
        lines.append(
            f"| {engine} | {prec} | {f.weight_bytes / 2**20:.0f} | {f.bytes_per_token / 2**20:.0f} "
            f"| {load} | {rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated preset shapes")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"ours: comma-separated of {SCHEMES}")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (shapes under 500M params)")
    parser.add_argument("--reps-large", type=int, default=2, help="timed repetitions for larger shapes")
    parser.add_argument("-p", "--pp", type=int, default=512, help="prompt tokens")
    parser.add_argument("-n", "--tg", type=int, default=128, help="generated tokens")
    parser.add_argument("-t", "--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument(
        "--quant-dtype", choices=("fp32", "bf16"), default="bf16", help="float parts of quantized"
    )
    parser.add_argument("--no-quantize-output", action="store_true", help="keep our output head in float")
    parser.add_argument(
        "--budget",
        type=float,
        default=45.0,
        help="soft cap in seconds per test of ours/transformers (fewer reps, shorter tg if one rep "
        "alone would pass it); 0: no cap",
    )
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write every sample and the tables as JSON")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()]
    for s in shapes:
        if s not in PRESETS:
            raise SystemExit(f"unknown shape {s!r}; expected one of {', '.join(PRESETS)}")
    for s in schemes:
        if s not in PAIRING:
            raise SystemExit(f"unknown scheme {s!r}; expected one of {', '.join(PAIRING)}")
    skip_lc = a.skip_llamacpp
    if not skip_lc and llamacpp.find_binary("llama-bench") is None:
        _log(
            "[decode_speed] llama-bench not built (python benchmarks/llamacpp.py --build); skipping llama.cpp"
        )
        skip_lc = True

    budget = a.budget if a.budget > 0 else None
    started = time.perf_counter()
    _log(f"[decode_speed] measuring memory bandwidth ({a.threads} threads)")
    bw, bw_samples = measure_bandwidth(threads=a.threads)
    _log(f"[decode_speed] bandwidth {bw:.1f} GB/s")
    out: dict[str, Any] = {"bandwidth_gbs": bw, "bandwidth_samples": bw_samples, "threads": a.threads}
    tables: list[str] = []
    for shape in shapes:
        reps = a.reps if PRESETS[shape].num_params() < LARGE_PARAMS else a.reps_large
        figs: dict[tuple[str, str], EngineFigure] = {}
        t_shape = time.perf_counter()
        done_lc: set[str] = set()
        done_tf: set[str] = set()
        for p in schemes:  # each pairing's engines back to back
            try:
                figs[("ours", p)] = run_ours(
                    shape, p, a.pp, a.tg, reps, a.quant_dtype, not a.no_quantize_output, budget
                )
            except Exception as err:  # one failing scheme must not lose the others
                _log(f"[ours] {shape} {p} FAILED: {type(err).__name__}: {err}")
            lq, tq = PAIRING[p]
            if lq and not skip_lc and lq not in done_lc:
                done_lc.add(lq)
                try:
                    figs[("llama.cpp", lq)] = run_llamacpp(shape, lq, a.pp, a.tg, reps, a.threads)
                except Exception as err:
                    _log(f"[llama.cpp] {shape} {lq} FAILED: {type(err).__name__}: {err}")
            if not a.skip_transformers and tq not in done_tf:
                done_tf.add(tq)
                try:
                    figs[("transformers", tq)] = run_transformers(shape, tq, a.pp, a.tg, reps, budget)
                except Exception as err:
                    _log(f"[transformers] {shape} {tq} FAILED: {type(err).__name__}: {err}")
        table = report(shape, figs, schemes, bw, a.tg)
        tables.append(table)
        print(table + "\n", flush=True)
        out[shape] = {
            "reps": reps,
            "seconds": time.perf_counter() - t_shape,
            "figures": [
                {
                    **{k: v for k, v in f.__dict__.items()},
                    "pp_mean": f.pp,
                    "tg_mean": f.tg,
                    "tg_bw_fraction": f.bw_fraction(bw),
                }
                for f in figs.values()
            ],
        }
    total = time.perf_counter() - started
    print(f"total time {total / 60:.1f} min; threads {a.threads}; torch {torch.__version__}")
    if a.json:
        out["tables"] = tables
        out["seconds"] = total
        a.json.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
