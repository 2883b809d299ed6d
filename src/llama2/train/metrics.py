"""Training metrics: one JSON object per line in `metrics.jsonl`, and a loss-curve PNG (train and
validation loss against step) rewritten as training goes (matplotlib's Agg backend, no display).

New records are appended to the log; emptying or cutting it (a fresh run, a resume) and every redraw
of the PNG write a temporary file and rename it over the old one (`atomic_write`), so a kill or a
full disk leaves the previous file whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama2.checkpoint.save import atomic_write
from llama2.train.checkpointing import write_text_atomic


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
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return self.png_path
