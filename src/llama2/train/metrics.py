"""Training metrics: one JSON object per line in `metrics.jsonl`, and a loss-curve PNG (train and
validation loss against step) rewritten as training goes (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends records to `<out_dir>/metrics.jsonl` and draws `<out_dir>/loss.png`.

    Records are dicts with at least `step`, `split` ("train" or "val") and `loss`.
    """

    def __init__(self, out_dir: Path, jsonl_name: str = "metrics.jsonl", png_name: str = "loss.png") -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / jsonl_name
        self.png_path = self.out_dir / png_name

    def reset(self) -> None:
        """Start a fresh log (a new run in this folder)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a run resumed from the checkpoint at `step` rewrites them)."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

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
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png_path.with_name(f".{self.png_path.name}.tmp{os.getpid()}.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png_path)
        return self.png_path
