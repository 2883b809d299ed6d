"""The held-out report of a reward model: accuracy per preference rating and unsafe-response detection.

Written by `llama2 train reward` (its `eval.json`) and printed by `llama2 eval reward`
(`llama2.eval.reward_eval`, the command around this module).

`evaluate_reward_model(model, tokenizer, pairs, batch_size)` scores both sides of every pair (each
response encoded by `data.preferences.reward_tokens` and scored at its EOS) and reports:
  - accuracy (score(chosen) > score(rejected); a tie counts as wrong) per rating bucket, in the shape
    of the Llama 2 paper's Table 8 (Significantly Better / Better / Slightly Better / Negligibly
    Better-Unsure / Avg), for all pairs and for each kind present (helpfulness, safety);
  - for safety pairs (`kind == "safety"`), recall and precision of "unsafe" detection when a response
    is flagged unsafe at R_s = sigmoid(score) < threshold (0.15, the paper's). Labels: the rejected
    response of a `chosen_safe_rejected_unsafe` pair and both responses of a `both_unsafe` pair are
    unsafe; every other response of a safety pair is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llama2.data.preferences import RATINGS, PreferencePair, reward_tokens
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel, score_rows
from llama2.tokenizer import Tokenizer
from llama2.train.rl_losses import SAFETY_THRESHOLD

BUCKET_LABELS = {  # rating -> the paper's Table 8 column
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}
AVG = "avg"


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
            labels = pair.unsafe_sides
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


__all__ = ["Detection", "RewardEvalReport", "evaluate_reward_model", "report_from_scores"]
