"""Prefill and decode speed of our model + generator vs transformers' LlamaForCausalLM, same weights.

Run: `python benchmarks/decode_loop.py [--shapes 110m,tinyllama-1.1b] [--dtypes float32,bfloat16]
[--prompt-len 512] [--gen-len 128] [--threads 2] [--compile] [--json PATH]`.

For each preset shape and dtype, random weights are built once and shared by both models (only
q/k are copied, permuted to transformers' rotary layout). Both run a greedy generation of
`--gen-len` tokens after a `--prompt-len` random prompt, interleaved (ours, theirs, ours, ...):
ours through `Generator.stream`, transformers through `generate(streamer=...)` with its KV cache.
Prefill tokens/s = prompt length / time to the first generated token; decode tokens/s = the
tokens after the first / the time between the first and the last. Medians over `--reps`.
The machine may be shared: read the ratio column (measured in the same run), not absolute values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2.checkpoint import keymaps
from llama2.config import PRESETS, ModelArgs
from llama2.generation import Generator, SamplingParams
from llama2.model import Transformer
from llama2.runtime import configure_threads


@dataclass
class Row:
    shape: str
    dtype: str
    impl: str
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_token: float


class _NoText:
    """Tokenizer and detokenizer stand-ins: no EOS (id -1), no text."""

    eos_id = -1

    def decode(self, ids: Sequence[int]) -> str:
        return ""

    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def build_ours(args: ModelArgs, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights (std 0.02, norms 1), built on `meta` and materialised once in `dtype`."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def build_hf(ours: Transformer, args: ModelArgs, dtype: torch.dtype) -> nn.Module:
    """transformers' LlamaForCausalLM sharing our tensors (q/k permuted copies)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    state: dict[str, torch.Tensor] = {}
    for name, t in ours.state_dict().items():
        hf_name = keymaps.rename(name, keymaps.META_TO_HF)
        if hf_name is None:
            raise SystemExit(f"no transformers name for {name}")
        if name.endswith("wq.weight"):
            t = keymaps.meta_to_hf_qk(t, args.n_heads).contiguous()
        elif name.endswith("wk.weight"):
            t = keymaps.meta_to_hf_qk(t, args.kv_heads).contiguous()
        state[hf_name] = t
    hf.load_state_dict(state, strict=False, assign=True)
    # Buffers (rotary inv_freq) were built on meta: rebuild the rotary module on the CPU.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)
    return hf.to(dtype).eval()


def _timed_stream(run: Callable[[Callable[[], None]], None]) -> list[float]:
    """Timestamps (perf_counter) of every generated token; `run` calls its argument per token."""
    stamps: list[float] = []
    run(lambda: stamps.append(time.perf_counter()))
    return stamps


def run_ours(gen: Generator, prompt: list[int], n: int) -> tuple[float, float]:
    start = time.perf_counter()

    def go(tick: Callable[[], None]) -> None:
        for _ in gen.stream([prompt], n, SamplingParams(temperature=0.0)):
            tick()

    stamps = _timed_stream(go)
    return stamps[0] - start, stamps[-1] - stamps[0]


def run_hf(hf: nn.Module, prompt: list[int], n: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])

    class Streamer:
        def __init__(self, tick: Callable[[], None]) -> None:
            self.tick = tick
            self.first = True

        def put(self, value: torch.Tensor) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.tick()

        def end(self) -> None:
            pass

    start = time.perf_counter()

    def go(tick: Callable[[], None]) -> None:
        with torch.inference_mode():
            hf.generate(  # type: ignore[operator]
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=Streamer(tick),
            )

    stamps = _timed_stream(go)
    return stamps[0] - start, stamps[-1] - stamps[0]


def bench_one(
    shape: str, dtype_name: str, prompt_len: int, gen_len: int, reps: int, compile_mode: str | None
) -> list[Row]:
    args = PRESETS[shape]
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    ours = build_ours(args, dtype, seed=0)
    hf = build_hf(ours, args, dtype)
    with torch.inference_mode():  # same weights, same numerics: logits agree
        probe = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
        diff = (ours(probe) - hf(probe).logits.float()).abs().max().item()  # type: ignore[operator]
    print(
        f"[{shape} {dtype_name}] built in {time.perf_counter() - t0:.1f}s; max |logit diff| {diff:.2e}",
        file=sys.stderr,
    )
    tok = _NoText()
    gen = Generator(
        ours,
        tok,
        max_seq_len=prompt_len + gen_len,
        detokenizer_factory=lambda _: tok,
        compile=compile_mode or False,
    )
    prompt = torch.randint(
        3, args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "transformers": []}
    if compile_mode:
        t0 = time.perf_counter()
        run_ours(gen, prompt[:8], 2)
        print(f"[{shape} {dtype_name}] compiled in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for _ in range(reps):
        results["ours"].append(run_ours(gen, prompt, gen_len))
        results["transformers"].append(run_hf(hf, prompt, gen_len))
    rows = []
    for impl, runs in results.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        rows.append(
            Row(
                shape,
                dtype_name,
                impl,
                prompt_len / prefill,
                (gen_len - 1) / decode,
                decode / (gen_len - 1) * 1e3,
            )
        )
    del gen, hf, ours
    return rows


def print_table(rows: list[Row]) -> None:
    heads = ("pp tok/s", "tg tok/s", "ms/token", "pp ratio", "tg ratio")
    print(f"{'shape':<16}{'dtype':<10}{'impl':<14}" + "".join(f"{h:>10}" for h in heads))
    ref = {(r.shape, r.dtype): r for r in rows if r.impl == "transformers"}
    for r in rows:
        base = ref.get((r.shape, r.dtype))
        pp = f"{r.prefill_tok_s / base.prefill_tok_s:.2f}" if base else "-"
        tg = f"{r.decode_tok_s / base.decode_tok_s:.2f}" if base else "-"
        print(
            f"{r.shape:<16}{r.dtype:<10}{r.impl:<14}{r.prefill_tok_s:>10.1f}{r.decode_tok_s:>10.2f}"
            f"{r.decode_ms_per_token:>10.1f}{pp:>10}{tg:>10}"
        )
    print("ratio = ours / transformers, measured in this run (interleaved).")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="110m,tinyllama-1.1b", help="comma-separated preset names")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill length (pp)")
    parser.add_argument("--gen-len", type=int, default=32, help="generated tokens (tg); 128 as llama-bench")
    parser.add_argument("--reps", type=int, default=1, help="interleaved repetitions (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        help="compile our decode step (torch.compile mode)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ns = parser.parse_args()
    threads = configure_threads(ns.threads)
    for s in ns.shapes.split(","):
        if s not in PRESETS:
            parser.error(f"unknown shape {s!r}; expected one of {', '.join(PRESETS)}")
    rows: list[Row] = []
    for shape in ns.shapes.split(","):
        for dt in ns.dtypes.split(","):
            rows += bench_one(shape, dt, ns.prompt_len, ns.gen_len, ns.reps, ns.compile)
    print(f"threads={threads} prompt={ns.prompt_len} gen={ns.gen_len} reps={ns.reps} compile={ns.compile}")
    print_table(rows)
    if ns.json is not None:
        out: dict[str, Any] = {
            "threads": threads,
            "prompt_len": ns.prompt_len,
            "gen_len": ns.gen_len,
            "reps": ns.reps,
            "compile": ns.compile,
            "torch": torch.__version__,
            "rows": [asdict(r) for r in rows],
        }
        ns.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
