"""`llama2 bench`'s results: one `BenchResult` per configuration, the Markdown table and the JSON rows."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2.checkpoint.save import atomic_write
from llama2.outpath import write_error


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


# --------------------------------------------------------------------------------- table
def format_pm(values: Sequence[float]) -> str:
    """`mean ± std` of the values, `-` for none."""
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
            f"{format_pm(r.pp_tps)}" + (f" (pp{r.pp})" if r.pp else ""),
            f"{format_pm(r.tg_tps)}" + (f" (tg{r.tg})" if r.tg else ""),
            "-" if ceiling is None else f"{ceiling:.1f}",
            "-" if frac is None else f"{100 * frac:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(results: Sequence[BenchResult], path: Path | str, meta: dict[str, Any] | None = None) -> None:
    """Write `{"meta": ..., "rows": [result.to_row(), ...]}` to `path`."""
    doc = {"meta": meta or {}, "rows": [r.to_row() for r in results]}
    data = (json.dumps(doc, indent=2, default=str) + "\n").encode("utf-8")

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    try:
        atomic_write(Path(path), write)
    except OSError as e:
        raise write_error("--json", path, e) from None


__all__ = ["BenchResult", "format_pm", "format_table", "mean_std", "write_json"]
