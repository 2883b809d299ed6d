"""Training metrics: one JSON object per line in `metrics.jsonl`, a loss-curve PNG (train and
validation loss against step) and `metrics.png` (one subplot per named stage metric, e.g. `kl`),
rewritten as training goes (matplotlib's Agg backend, no display).

New records are appended to the log; emptying or cutting it (a fresh run, a resume) and every redraw
of the PNG write a temporary file and rename it over the old one (`atomic_write`), so a kill or a
full disk leaves the previous file whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llama2.checkpoint.save import atomic_write
from llama2.train.checkpointing import write_text_atomic

# Keys the loop writes in every record; any other numeric key is a stage's named metric.
RESERVED_KEYS = frozenset(
    {"step", "split", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "time_s"}
)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


class MetricsLogger:
    """Appends records to `<out_dir>/metrics.jsonl` and draws `<out_dir>/loss.png`.

    Records are dicts with at least `step`, `split` ("train" or "val") and `loss`.
    """

    def __init__(
        self,
        out_dir: Path,
        jsonl_name: str = "metrics.jsonl",
        png_name: str = "loss.png",
        metrics_png_name: str = "metrics.png",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / jsonl_name
        self.png_path = self.out_dir / png_name
        self.metrics_png_path = self.out_dir / metrics_png_name

    def reset(self) -> None:
        """Start a fresh log (a new run in this folder)."""
        write_text_atomic(self.path, "")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a run resumed from the checkpoint at `step` rewrites them)."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill; the resume rewrites it
        return out

    def plot(self) -> Path | None:
        """Redraw the loss curve; returns its path (None when matplotlib is missing or nothing is logged)."""
        records = self.read()
        if not records:
            return None
        plt = _pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return self.png_path

    def metric_names(self, records: list[dict[str, Any]] | None = None) -> list[str]:
        """Named stage metrics in the log (numeric keys other than `RESERVED_KEYS`), first-seen order."""
        names: dict[str, None] = {}
        for r in self.read() if records is None else records:
            for k, v in r.items():
                if k not in RESERVED_KEYS and isinstance(v, int | float) and not isinstance(v, bool):
                    names[k] = None
        return list(names)

    def plot_metrics(self) -> Path | None:
        """Redraw `metrics.png`: one subplot per named metric, train and val points against step.
        None (and no file) when no named metric is logged or matplotlib is missing."""
        records = self.read()
        names = self.metric_names(records)
        plt = _pyplot() if names else None
        if plt is None:
            return None
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for i, name in enumerate(names):
            ax = axes[i // cols][i % cols]
            for split, style in (("train", "-"), ("val", "o-")):
                pts = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, label=split, markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        for j in range(len(names), rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.metrics_png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return self.metrics_png_path

    def plot_all(self) -> None:
        """Redraw `loss.png` and (when named metrics are logged) `metrics.png`."""
        self.plot()
        self.plot_metrics()
