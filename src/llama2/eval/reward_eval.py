"""`llama2 eval reward`: a reward model's held-out report (`llama2.train.reward_report`: accuracy per
rating bucket in the shape of the paper's Table 8, and unsafe detection at R_s < threshold) printed as
a table and optionally written as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llama2.checkpoint.reward_io import load_reward_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.data.preferences import read_pairs
from llama2.errors import ConfigError
from llama2.tokenizer import Tokenizer
from llama2.train.reward_report import (
    Detection,
    RewardEvalReport,
    evaluate_reward_model,
    report_from_scores,
)
from llama2.train.rl_losses import SAFETY_THRESHOLD


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
