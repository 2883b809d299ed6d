"""Memory read bandwidth with torch's threads: the ceiling decode speed is measured against.

`torch.sum` over a 1 GiB float32 buffer (far beyond the caches, so every pass streams DRAM), one
untimed pass first, median of several. The decode ceiling of a model is this bandwidth divided by
the weight bytes one decode step reads. The function is `llama2.bench.measure_bandwidth`; this
script prints it for each requested thread count.

Run: `python benchmarks/bandwidth.py [--threads 1,2] [--mib 1024] [--reps 7] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llama2.bench import measure_bandwidth


def bandwidth_gbs(threads: int | None = None, mib: int = 1024, reps: int = 7) -> float:
    """Median read bandwidth in GB/s (1e9 bytes/s) with `threads` torch threads (default: current)."""
    return measure_bandwidth(mib << 20, reps, threads)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--threads", default=str(torch.get_num_threads()), help="comma-separated thread counts"
    )
    parser.add_argument("--mib", type=int, default=1024, help="buffer size in MiB")
    parser.add_argument("--reps", type=int, default=7, help="timed passes (median reported)")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args()
    rows = []
    print("| threads | median GB/s | min | max |\n|---|---|---|---|")
    for t in (int(x) for x in a.threads.split(",") if x.strip()):
        med, all_rates = measure_bandwidth(a.mib << 20, a.reps, t)
        rows.append({"threads": t, "gbs": med, "samples": all_rates, "mib": a.mib})
        print(f"| {t} | {med:.1f} | {min(all_rates):.1f} | {max(all_rates):.1f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
