"""Rejection sampling with a perfect judge: the control that tells a weak reward model from a weak recipe.

Runs `llama2.train.rejection.run_rejection` with the same config file as the real stage, but the best
of the K samples is chosen by the instruction suite's program checkers (1 for a right answer, a refusal
on a harmful prompt, the reference answer on a benign one; ties broken by the real R_c, so the reward
models are still loaded) instead of by R_c alone. Everything else — prompts, seeds, samples, pooling,
the SFT of each iteration — is identical, so the two models differ only in who picks the best sample.

    python benchmarks/rs_checker_control.py scripts/configs/recipe/rejection.toml runs/recipe/rs_checker

Then `llama2 eval recipe --stages rs-checker=runs/recipe/rs_checker/model ...` puts it in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llama2.chat import Message
from llama2.data.instruct_suite import generate_items
from llama2.data.safety_suite import benign_alarming_prompts, harmful_prompts
from llama2.tokenizer import Tokenizer
from llama2.train.rejection import RejectionConfig, run_rejection
from llama2.train.reward_scoring import RewardScorer, Scores
from llama2.train.run_config import config_from_dict


def _key(dialog: Sequence[Message]) -> str:
    return json.dumps(list(dialog), sort_keys=True, ensure_ascii=False)


def checkers(cfg: RejectionConfig) -> dict[str, Callable[[str], bool]]:
    """Prompt key -> its checker, for exactly the prompts `build_prompts` draws from `cfg`."""
    out: dict[str, Callable[[str], bool]] = {}
    for item in generate_items("train", cfg.n_per_task, cfg.seed) if cfg.n_per_task else []:
        out.setdefault(_key(item.prompt_dialog), item.check)
    safety = (harmful_prompts("train", cfg.n_harmful, cfg.seed) if cfg.n_harmful else []) + (
        benign_alarming_prompts("train", cfg.n_benign, cfg.seed) if cfg.n_benign else []
    )
    for p in safety:
        out.setdefault(_key(p.dialog), p.check)
    return out


class CheckerScorer:
    """R_c replaced by checker(response) + R_c / 2 (a right answer always wins; R_c breaks ties)."""

    def __init__(self, real: RewardScorer, checks: dict[str, Callable[[str], bool]]) -> None:
        self.real, self.checks = real, checks

    def score(
        self, dialogs: Sequence[Sequence[Message]], responses: Sequence[str], is_safety: Sequence[bool]
    ) -> Scores:
        s = self.real.score(dialogs, responses, is_safety)
        ok = torch.tensor(
            [float(self.checks[_key(d)](r)) for d, r in zip(dialogs, responses, strict=True)]
        )  # (N,) 1.0 where the checker accepts
        return Scores(r_h=s.r_h, r_s=s.r_s, r_c=ok + s.r_c / 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="the rejection stage's TOML (as the real stage ran)")
    ap.add_argument("out_dir", type=Path, help="run folder of the control (not the real stage's)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    data = tomllib.loads(args.config.read_text(encoding="utf-8"))
    cfg = config_from_dict(RejectionConfig, data)
    loop = dataclasses.replace(cfg.loop, out_dir=args.out_dir)
    cfg = dataclasses.replace(cfg, resume=args.resume, loop=loop)
    from llama2.checkpoint.load import load_model

    tok_path = load_model(cfg.model, progress=False).tokenizer_path
    if tok_path is None:
        raise SystemExit(f"no tokenizer next to {cfg.model}")
    real = RewardScorer.load(cfg.reward_helpful, cfg.reward_safety, Tokenizer.from_file(tok_path))
    result = run_rejection(cfg, scorer=CheckerScorer(real, checkers(cfg)))
    print(f"control model: {result.model_dir}")


if __name__ == "__main__":
    main()
