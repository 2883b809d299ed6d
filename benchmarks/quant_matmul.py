"""Speed of one linear layer per weight scheme on CPU: decode (M = 1) and prefill (M = 512).

For each scheme (float32 / bfloat16 `nn.Linear`, `DenseLinear` bf16/fp16, int8, int4, NF4,
Q8_0, Q4_0, Q4_K) it prints the stored weight size, the median time at M = 1 and at M = 512, the
effective M = 1 bandwidth (weight bytes / time) and that bandwidth as a fraction of a memory
read-bandwidth reference (`torch.sum` over a 256 MiB float32 buffer) measured in the same run.
All cases are interleaved round by round (reference, then every scheme), so machine load hits
them alike; each figure is the median over rounds of the best of `--iters` calls.

`--copies C` keeps C independent copies of every layer and times calls that run through all of
them (the figure is per layer): with C copies larger than the last-level cache the weights come
from memory, as in a whole model's decode step, instead of staying cache-resident.

Run: `python benchmarks/quant_matmul.py [--k 2048 --n 5632 --prefill 512 --rounds 5 --copies 1
--json PATH]`.
`LLAMA2_NO_KERNELS=1` measures the pure-torch fallback instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from llama2.quant.kernels import kernels_available
from llama2.quant.linear import DenseLinear, GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantizedLinear


def _best_s(fn: Callable[[], Tensor], iters: int) -> float:
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _nbytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])


def _path(mod: nn.Module, m: int) -> str:
    with torch.inference_mode():
        kernel = isinstance(mod, QuantizedLinear | DenseLinear) and mod.kernel_usable()
    if kernel:
        if m > 16:
            return "dequant+fp32 GEMM"
        q8 = isinstance(mod, GGUFLinear)
        q8 = q8 or (isinstance(mod, Int8Linear | Int4Linear) and mod.quantize_activations)
        return "kernel q8-act" if q8 else "kernel float-act"
    if isinstance(mod, QuantizedLinear):
        return "torch dequant"
    return "torch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--k", type=int, default=2048, help="in_features")
    parser.add_argument("--n", type=int, default=5632, help="out_features")
    parser.add_argument("--prefill", type=int, default=512, help="rows of the prefill case (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--iters", type=int, default=10, help="M=1 calls per round (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--copies", type=int, default=1, help="copies of each layer cycled through (M=1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = kernels_available()  # builds on first use, before anything is timed
    torch.manual_seed(0)
    lin = nn.Linear(args.k, args.n, bias=False)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    lin_bf16 = nn.Linear(args.k, args.n, bias=False, dtype=torch.bfloat16)
    lin_f16 = nn.Linear(args.k, args.n, bias=False, dtype=torch.float16)
    with torch.no_grad():
        lin_bf16.weight.copy_(lin.weight)
        lin_f16.weight.copy_(lin.weight)
    int4_float = Int4Linear.from_linear(lin, 128)
    int4_float.quantize_activations = False
    schemes: list[tuple[str, nn.Module, torch.dtype]] = [
        ("fp32 nn.Linear", lin, torch.float32),
        ("bf16 nn.Linear", lin_bf16, torch.bfloat16),
        ("bf16 DenseLinear", DenseLinear.from_linear(lin_bf16), torch.bfloat16),
        ("fp16 DenseLinear", DenseLinear.from_linear(lin_f16), torch.float16),
        ("int8", Int8Linear.from_linear(lin), torch.bfloat16),
        ("int4 g128", Int4Linear.from_linear(lin, 128), torch.bfloat16),
        ("int4 g128 float-act", int4_float, torch.bfloat16),
        ("nf4 b64 dq", NF4Linear.from_linear(lin, 64, True), torch.bfloat16),
        ("q8_0", GGUFLinear.from_linear(lin, "q8_0"), torch.bfloat16),
        ("q4_0", GGUFLinear.from_linear(lin, "q4_0"), torch.bfloat16),
        ("q4_k", GGUFLinear.from_linear(lin, "q4_k"), torch.bfloat16),
    ]
    copies = {name: [mod] + [copy.deepcopy(mod) for _ in range(args.copies - 1)] for name, mod, _ in schemes}
    ref_buf = torch.randn(64 << 20)  # 256 MiB float32
    ref_bytes = ref_buf.numel() * ref_buf.element_size()
    x1 = torch.randn(1, args.k)
    xp = torch.randn(args.prefill, args.k)
    decode: dict[str, list[float]] = {name: [] for name, _, _ in schemes}
    prefill: dict[str, list[float]] = {name: [] for name, _, _ in schemes}
    ref_gbs: list[float] = []
    with torch.inference_mode():
        for _name, mod, dt in schemes:  # warm-up
            mod(x1.to(dt))
        ref_buf.sum()
        for _ in range(args.rounds):
            ref_gbs.append(ref_bytes / _best_s(lambda: ref_buf.sum(), 2) / 1e9)
            for name, _mod, dt in schemes:
                xd = x1.to(dt)
                mods = copies[name]
                t = _best_s(lambda ms=mods, x=xd: [m(x) for m in ms][-1], args.iters)  # type: ignore[misc]
                decode[name].append(t / len(mods))
        for _ in range(min(args.rounds, 3) if args.prefill else 0):
            for name, mod, dt in schemes:
                xpd = xp.to(dt)
                prefill[name].append(_best_s(lambda m=mod, x=xpd: m(x), 1))  # type: ignore[misc]
    bw = statistics.median(ref_gbs)
    rows = []
    for name, mod, _ in schemes:
        nbytes = _nbytes(mod)
        t1 = statistics.median(decode[name])
        gbs = nbytes / t1 / 1e9
        rows.append(
            {
                "scheme": name,
                "path_m1": _path(mod, 1),
                "path_prefill": _path(mod, args.prefill),
                "weight_mib": nbytes / 2**20,
                "ms_m1": t1 * 1e3,
                "gbs_m1": gbs,
                "bandwidth_fraction_m1": gbs / bw,
                "ms_prefill": statistics.median(prefill[name]) * 1e3 if prefill[name] else None,
            }
        )
    print(
        f"linear {args.n}x{args.k}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"kernels {'on' if kernels else 'off'}; bandwidth reference (torch.sum, 256 MiB) {bw:.1f} GB/s; "
        f"median of {args.rounds} rounds; {args.copies} copies of each layer cycled at M=1"
    )
    print(
        f"| {'scheme':<20} | {'M=1 path':<17} | {'MiB':>6} | {'M=1 ms':>7} | {'GB/s':>5} | {'of bw':>5} "
        f"| {'M=' + str(args.prefill) + ' ms':>9} |"
    )
    print(f"|{'-' * 22}|{'-' * 19}|{'-' * 8}|{'-' * 9}|{'-' * 7}|{'-' * 7}|{'-' * 11}|")
    for r in rows:
        pre = f"{r['ms_prefill']:.1f}" if r["ms_prefill"] is not None else "-"
        print(
            f"| {r['scheme']:<20} | {r['path_m1']:<17} | {r['weight_mib']:>6.1f} | {r['ms_m1']:>7.3f} "
            f"| {r['gbs_m1']:>5.1f} | {r['bandwidth_fraction_m1']:>5.2f} | {pre:>9} |"
        )
    if args.json:
        payload = {
            "k": args.k,
            "n": args.n,
            "prefill": args.prefill,
            "threads": torch.get_num_threads(),
            "copies": args.copies,
            "kernels": kernels,
            "bandwidth_gbs": bw,
            "bandwidth_samples_gbs": ref_gbs,
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
