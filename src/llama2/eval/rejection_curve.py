"""The rejection-sampling curves of the Llama 2 paper (Figs. 7 and 8): how much best-of-N gains.

For held-out instruction-suite prompts, `k` samples per prompt are drawn at each temperature
(`llama2.train.rollout.sample_responses`) and scored with the reward models (`RewardScorer`, R_c; the
`refuse` task counts as a safety prompt). For N in 1, 2, 4, ..., k (and k itself), over the first N
samples of every prompt, averaged over prompts:

- `max_reward` / `median_reward`: the max and the median reward among the N (Fig. 7: the gap between
  them is what rejection sampling harvests; Fig. 8: its dependence on temperature);
- reward-chosen: the highest-reward sample (what rejection sampling keeps), its exact match
  (`InstructItem.check`) as `reward_em`;
- the checker control (ceiling): a correct sample when any of the N is correct (the highest-reward
  correct one), else the reward-chosen one: `checker_reward` and `checker_em` (= pass@N);
- the random control (floor): a uniformly random sample among the N, taken in expectation (the mean
  reward and the share of correct samples among the N) so the floor carries no sampling noise:
  `random_reward` and `random_em`.

Samples are prefixes: the first N of the same k draws, so every curve is over the same samples and
`max_reward` can only grow with N. `curve_points` is a pure function over plain lists, testable
without models. Output: a markdown table (stdout), JSON (`out_json`) and a PNG (`out_png`, Agg).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.data.instruct_suite import TASKS, generate_items
from llama2.errors import ConfigError
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.reward_scoring import RewardScorer
from llama2.train.rollout import sample_responses


@dataclass
class RejectionCurveConfig:
    """`llama2 eval rejection-curve`: best-of-N reward and exact match against N and temperature."""

    model: str = field(default="chat", metadata={"help": "policy: checkpoint path or embedded name"})
    reward_helpful: Path = field(default=Path("reward_helpful"), metadata={"help": "helpfulness RM folder"})
    reward_safety: Path = field(default=Path("reward_safety"), metadata={"help": "safety RM folder"})
    n_per_task: int = field(default=10, metadata={"help": "held-out instruction-suite prompts per task"})
    k: int = field(default=16, metadata={"help": "samples per prompt and temperature (N goes 1, 2, 4 .. k)"})
    temperatures: list[float] = field(
        default_factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.5], metadata={"help": "paper: 0.6-1.5"}
    )
    seed: int = field(default=1, metadata={"help": "chooses the prompts and seeds the samples"})
    out_json: Path | None = None
    out_png: Path | None = None
    max_new_tokens: int = 24
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.k < 1 or self.n_per_task < 1 or self.max_new_tokens < 1:
            raise ConfigError(
                f"k ({self.k}), n_per_task ({self.n_per_task}) and max_new_tokens ({self.max_new_tokens}) "
                "must be >= 1"
            )
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            raise ConfigError(
                f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}"
            )


@dataclass(frozen=True)
class CurvePoint:
    """Means over prompts of one (temperature, N) cell; see the module docstring."""

    temperature: float
    n: int
    max_reward: float
    median_reward: float
    reward_em: float
    checker_reward: float
    checker_em: float
    random_reward: float
    random_em: float


def n_values(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself when it is not a power of two."""
    ns = [1 << i for i in range(k.bit_length()) if 1 << i <= k]
    return ns if ns[-1] == k else [*ns, k]


def curve_points(
    rewards: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    ns: Sequence[int],
    temperature: float = 0.0,
) -> list[CurvePoint]:
    """The curve cells for `rewards[p][j]` / `correct[p][j]` (sample j of prompt p), one per N in `ns`.

    Raises:
        ConfigError: ragged inputs, no prompts, or an N larger than the samples per prompt.
    """
    if not rewards or len(rewards) != len(correct):
        raise ConfigError(
            f"need one reward and one correctness row per prompt, got {len(rewards)}/{len(correct)}"
        )
    k = min(len(r) for r in rewards)
    if any(len(r) != len(c) for r, c in zip(rewards, correct, strict=True)) or any(
        n < 1 or n > k for n in ns
    ):
        raise ConfigError(
            f"every prompt needs as many rewards as checks, and 1 <= N <= {k}; got ns {list(ns)}"
        )
    points = []
    for n in ns:
        cells: list[tuple[float, ...]] = []
        for r_row, c_row in zip(rewards, correct, strict=True):
            r, c = list(r_row[:n]), list(c_row[:n])
            chosen = max(range(n), key=lambda j: (r[j], -j))  # highest reward, first on ties
            right = [j for j in range(n) if c[j]]
            checked = max(right, key=lambda j: (r[j], -j)) if right else chosen
            cells.append(
                (max(r), statistics.median(r), float(c[chosen]), r[checked], float(bool(right)),
                 statistics.fmean(r), sum(c) / n)
            )  # fmt: skip
        means = [statistics.fmean(col) for col in zip(*cells, strict=True)]
        points.append(CurvePoint(temperature, n, *means))
    return points


def markdown_table(points: Sequence[CurvePoint]) -> str:
    """One row per (temperature, N)."""
    head = (
        "| temp | N | max R | median R | EM reward-chosen | EM checker | EM random | R checker | R random |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {p.temperature:g} | {p.n} | {p.max_reward:.3f} | {p.median_reward:.3f} | {p.reward_em:.1%} | "
        f"{p.checker_em:.1%} | {p.random_em:.1%} | {p.checker_reward:.3f} | {p.random_reward:.3f} |"
        for p in points
    ]
    return "\n".join([head, *rows])


def plot_curves(points: Sequence[CurvePoint], path: Path) -> Path | None:
    """Reward (max and median of N) and exact match (reward-chosen, checker, random) against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_r, ax_em) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, t in enumerate(sorted({p.temperature for p in points})):
        pts = [p for p in points if p.temperature == t]
        ns = [p.n for p in pts]
        color = f"C{i}"
        ax_r.plot(ns, [p.max_reward for p in pts], "o-", color=color, label=f"max, T={t:g}")
        ax_r.plot(ns, [p.median_reward for p in pts], "--", color=color, label=f"median, T={t:g}")
        ax_em.plot(ns, [p.reward_em for p in pts], "o-", color=color, label=f"reward-chosen, T={t:g}")
        ax_em.plot(ns, [p.checker_em for p in pts], ":", color=color, label=f"checker, T={t:g}")
        ax_em.plot(ns, [p.random_em for p in pts], "--", color=color, label=f"random, T={t:g}")
    for ax, ylabel in ((ax_r, "reward R_c"), (ax_em, "exact match")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N samples")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Rejection sampling: best of N")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_rejection_curve(cfg: RejectionCurveConfig) -> dict[str, Any]:
    """Sample, score and tabulate (see the module docstring); returns the JSON report."""
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, dtype=torch.float32, progress=False)
    tok_path = require_tokenizer(loaded.tokenizer_path, None, cfg.model, "save the policy with one")
    tokenizer = Tokenizer.from_file(tok_path)
    scorer = RewardScorer.load(cfg.reward_helpful, cfg.reward_safety, tokenizer, device=device)
    model = loaded.model.to(device).eval()
    items = generate_items("heldout", cfg.n_per_task, cfg.seed, tasks=cfg.tasks)
    dialogs = [it.prompt_dialog for it in items]
    flags = [it.task == "refuse" for it in items]
    points: list[CurvePoint] = []
    for t in cfg.temperatures:
        samples = sample_responses(
            model,
            tokenizer,
            dialogs,
            n=cfg.k,
            temperature=t,
            seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens,
        )
        flat = [(i, s.text) for i, row in enumerate(samples) for s in row]
        scores = scorer.score(
            [dialogs[i] for i, _ in flat], [r for _, r in flat], [flags[i] for i, _ in flat]
        )
        r_c: list[float] = scores.r_c.float().cpu().tolist()  # (n_items * k,)
        rewards = [r_c[i * cfg.k : (i + 1) * cfg.k] for i in range(len(items))]
        correct = [[it.check(s.text) for s in row] for it, row in zip(items, samples, strict=True)]
        points += curve_points(rewards, correct, n_values(cfg.k), temperature=t)
    print(markdown_table(points))
    report: dict[str, Any] = {
        "model": str(cfg.model),
        "prompts": len(items),
        "k": cfg.k,
        "temperatures": list(cfg.temperatures),
        "points": [asdict(p) for p in points],
    }
    if cfg.out_png is not None:
        png = plot_curves(points, Path(cfg.out_png))
        report["png"] = None if png is None else str(png)
    if cfg.out_json is not None:
        out_json = Path(cfg.out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
