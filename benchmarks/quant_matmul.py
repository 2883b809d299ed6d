"""Decode-shape (1 x K @ K x N) speed of each quantized linear vs float nn.Linear, on CPU.

Run: `python benchmarks/quant_matmul.py [--k 2048 --n 5632 --iters 50]`. Prints a table of the
median forward time per scheme. Indicative only: results depend on the CPU and its current load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from llama2.quant.linear import GGUFLinear, Int4Linear, Int8Linear, NF4Linear


def _median_ms(fn: Callable[[], torch.Tensor], iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=2048, help="in_features")
    parser.add_argument("--n", type=int, default=5632, help="out_features")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    lin = nn.Linear(args.k, args.n, bias=False)
    x32 = torch.randn(1, args.k)
    rows: list[tuple[str, str, float, float]] = []
    mb = lambda t: t.numel() * t.element_size() / 2**20  # noqa: E731

    with torch.no_grad():
        lin_bf16 = nn.Linear(args.k, args.n, bias=False).to(torch.bfloat16)
        lin_bf16.weight.copy_(lin.weight)
        ms = _median_ms(lambda: lin(x32), args.iters)
        rows.append(("float32 nn.Linear", "float32", mb(lin.weight), ms))
        xb = x32.bfloat16()
        ms = _median_ms(lambda: lin_bf16(xb), args.iters)
        rows.append(("bf16 nn.Linear", "bfloat16", mb(lin_bf16.weight), ms))
        candidates: list[tuple[str, nn.Module]] = [
            ("int8", Int8Linear.from_linear(lin)),
            ("int4 g128 (CPU kernel)", Int4Linear.from_linear(lin, 128, use_kernel=True)),
            ("int4 g128 (dequant)", Int4Linear.from_linear(lin, 128, use_kernel=False)),
            ("nf4 b64 double-quant", NF4Linear.from_linear(lin, 64, True)),
            ("q8_0", GGUFLinear.from_linear(lin, "q8_0")),
            ("q4_0", GGUFLinear.from_linear(lin, "q4_0")),
            ("q4_k", GGUFLinear.from_linear(lin, "q4_k")),
        ]
        for name, mod in candidates:
            size = sum(mb(b) for b in mod.buffers())
            for dtype in (torch.float32, torch.bfloat16):
                x = x32.to(dtype)
                ms = _median_ms(lambda m=mod, inp=x: m(inp), args.iters)  # type: ignore[misc]
                rows.append((name, str(dtype).removeprefix("torch."), size, ms))

    print(
        f"decode matmul 1x{args.k} @ {args.k}x{args.n}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.iters}"
    )
    print(f"{'scheme':<26}{'activations':<12}{'weight MiB':>11}{'ms':>10}")
    for name, dt, size, ms in rows:
        print(f"{name:<26}{dt:<12}{size:>11.1f}{ms:>10.3f}")


if __name__ == "__main__":
    main()
