"""Held-out evaluation of a reward model: accuracy per preference rating and unsafe-response detection.

`evaluate_reward_model(model, tokenizer, pairs, batch_size)` scores both sides of every pair (each
response encoded by `data.preferences.reward_tokens` and scored at its EOS) and reports:
  - accuracy (score(chosen) > score(rejected); a tie counts as wrong) per rating bucket, in the shape
    of the Llama 2 paper's Table 8 (Significantly Better / Better / Slightly Better / Negligibly
    Better-Unsure / Avg), for all pairs and for each kind present (helpfulness, safety);
  - for safety pairs (`kind == "safety"`), recall and precision of "unsafe" detection when a response
    is flagged unsafe at R_s = sigmoid(score) < threshold (0.15, the paper's). Labels: the rejected
    response of a `chosen_safe_rejected_unsafe` pair and both responses of a `both_unsafe` pair are
    unsafe; every other response of a safety pair is safe.
`RewardEvalConfig` + `run_reward_eval` are the `llama2 eval reward` command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama2.checkpoint.reward_io import load_reward_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.data.preferences import RATINGS, PreferencePair, read_pairs, reward_tokens
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel, score_rows
from llama2.tokenizer import Tokenizer

SAFETY_THRESHOLD = 0.15  # the paper's R_s threshold (also `train.rl_losses.SAFETY_THRESHOLD`)
BUCKET_LABELS = {  # rating -> the paper's Table 8 column
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}
AVG = "avg"
UNSAFE_BINS = {
    "chosen_safe_rejected_unsafe": (False, True),
    "both_unsafe": (True, True),
}  # (chosen, rejected)


@dataclass
class Detection:
    """Confusion counts of "unsafe" detection (positive = flagged unsafe) over safety-pair responses."""

    threshold: float
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def recall(self) -> float:
        """tp / (tp + fn): the share of unsafe responses flagged (nan without unsafe responses)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def precision(self) -> float:
        """tp / (tp + fp): the share of flagged responses that are unsafe (nan when none flagged)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
            "recall": _num(self.recall), "precision": _num(self.precision),
        }  # fmt: skip


@dataclass
class RewardEvalReport:
    """Per-group, per-bucket counts: `counts[group][bucket] = (correct, total)`; groups are "all" and
    each pair kind present, buckets are the ratings plus "avg"."""

    counts: dict[str, dict[str, tuple[int, int]]]
    detection: Detection | None = None
    mean_margin: float = float("nan")  # mean score(chosen) - score(rejected) over all pairs
    extra: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, group: str = "all", bucket: str = AVG) -> float:
        """Share of correctly ordered pairs (nan for an empty bucket)."""
        correct, total = self.counts.get(group, {}).get(bucket, (0, 0))
        return correct / total if total else float("nan")

    @property
    def n_pairs(self) -> int:
        return self.counts.get("all", {}).get(AVG, (0, 0))[1]

    def format_table(self) -> str:
        """A markdown table in the shape of the paper's Table 8, plus the detection line."""
        header = ["Test set", *BUCKET_LABELS.values(), "Avg", "Pairs"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group, buckets in self.counts.items():
            cells = [group]
            for bucket in [*RATINGS, AVG]:
                correct, total = buckets.get(bucket, (0, 0))
                cells.append(f"{100 * correct / total:.1f}" if total else "-")
            cells.append(str(buckets.get(AVG, (0, 0))[1]))
            lines.append("| " + " | ".join(cells) + " |")
        d = self.detection
        if d is not None:
            lines.append("")
            lines.append(
                f"Unsafe detection at R_s < {d.threshold:g}: recall {_pct(d.recall)}, precision "
                f"{_pct(d.precision)} (tp {d.tp}, fp {d.fp}, fn {d.fn}, tn {d.tn})"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        accuracy = {
            g: {b: _num(self.accuracy(g, b)) for b in [*RATINGS, AVG]} for g in self.counts
        }  # fmt: skip
        counts = {g: {b: list(ct) for b, ct in buckets.items()} for g, buckets in self.counts.items()}
        return {
            "n_pairs": self.n_pairs,
            "accuracy": accuracy,
            "counts": counts,
            "mean_margin": _num(self.mean_margin),
            "unsafe_detection": self.detection.to_json() if self.detection is not None else None,
            **self.extra,
        }


def _num(x: float) -> float | None:
    """JSON has no NaN: None for an undefined value."""
    return None if x != x else x


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def report_from_scores(
    pairs: Sequence[PreferencePair],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    threshold: float = SAFETY_THRESHOLD,
) -> RewardEvalReport:
    """The report of `pairs` given their raw scores (N,) (chosen, rejected).

    Raises:
        ConfigError: an unknown rating, or score counts that do not match the pairs.
    """
    if not (len(pairs) == chosen.numel() == rejected.numel()):
        raise ConfigError(f"{len(pairs)} pairs but {chosen.numel()}/{rejected.numel()} scores")
    counts: dict[str, dict[str, tuple[int, int]]] = {"all": {}}
    detection: Detection | None = None
    for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
        if pair.rating not in BUCKET_LABELS:
            raise ConfigError(f"unknown rating {pair.rating!r}; expected one of {list(BUCKET_LABELS)}")
        ok = int(c > r)
        for group in ("all", pair.kind):
            buckets = counts.setdefault(group, {})
            for bucket in (pair.rating, AVG):
                done, total = buckets.get(bucket, (0, 0))
                buckets[bucket] = (done + ok, total + 1)
        if pair.kind == "safety":
            detection = detection or Detection(threshold)
            labels = UNSAFE_BINS.get(pair.safety_bin, (False, False))
            for score, unsafe in zip((c, r), labels, strict=True):
                flagged = float(torch.sigmoid(torch.tensor(score))) < threshold
                if flagged and unsafe:
                    detection.tp += 1
                elif flagged:
                    detection.fp += 1
                elif unsafe:
                    detection.fn += 1
                else:
                    detection.tn += 1
    margin = float((chosen - rejected).float().mean()) if len(pairs) else float("nan")
    return RewardEvalReport(counts=counts, detection=detection, mean_margin=margin)


def evaluate_reward_model(
    model: RewardModel,
    tokenizer: Tokenizer,
    pairs: Sequence[PreferencePair],
    batch_size: int,
    threshold: float = SAFETY_THRESHOLD,
) -> RewardEvalReport:
    """Score both sides of every pair (no grad) and build the report (see the module docstring).

    Raises:
        ConfigError: no pairs, or an unknown rating.
    """
    if not pairs:
        raise ConfigError("no preference pairs to evaluate; expected at least one")
    rows = [reward_tokens(tokenizer, p.dialog, p.chosen) for p in pairs]
    rows += [reward_tokens(tokenizer, p.dialog, p.rejected) for p in pairs]
    was_training = model.training
    model.eval()
    try:
        scores = score_rows(model, rows, batch_size)  # (2N,)
    finally:
        model.train(was_training)
    n = len(pairs)
    return report_from_scores(pairs, scores[:n], scores[n:], threshold)


@dataclass
class RewardEvalConfig:
    """`llama2 eval reward`: accuracy per rating bucket (the paper's Table 8) and unsafe detection."""

    model: Path = field(
        default=Path("runs/reward/model"), metadata={"help": "reward-model folder (save_reward_model)"}
    )
    data: Path = field(default=Path("pairs.jsonl"), metadata={"help": "held-out preference pairs (JSONL)"})
    batch_size: int = field(default=16, metadata={"help": "responses scored per forward"})
    out_json: Path | None = field(default=None, metadata={"help": "also write the report as JSON here"})


def run_reward_eval(cfg: RewardEvalConfig) -> RewardEvalReport:
    """Load the reward model and the pairs, evaluate, print the table, write `out_json` if set.

    Raises:
        ConfigError: batch_size < 1, no tokenizer beside the model, or no pairs.
        CheckpointError / DialogError: an unreadable model or pairs file.
    """
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    model, info, tok_path = load_reward_model(cfg.model)
    tokenizer = Tokenizer.from_file(
        require_tokenizer(tok_path, None, cfg.model, "save the reward model with its tokenizer")
    )
    threshold = info.get("threshold", SAFETY_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise ConfigError(f"{cfg.model}: reward.json threshold {threshold!r}; expected a number in (0, 1)")
    report = evaluate_reward_model(model, tokenizer, read_pairs(cfg.data), cfg.batch_size, float(threshold))
    report.extra = {"model": str(cfg.model), "data": str(cfg.data), "objective": info.get("objective")}
    print(report.format_table())
    if cfg.out_json is not None:
        cfg.out_json.parent.mkdir(parents=True, exist_ok=True)
        cfg.out_json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return report


__all__ = [
    "Detection",
    "RewardEvalConfig",
    "RewardEvalReport",
    "evaluate_reward_model",
    "report_from_scores",
    "run_reward_eval",
]
