"""Rejection-sampling curves: the cells of a hand-built example worked out by hand, max-of-N
non-decreasing in N and the checker control never below the reward-chosen exact match (random data),
and `run_rejection_curve` end to end on a tiny random policy with tiny random reward models."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from llama2.checkpoint.reward_io import save_reward_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.eval.rejection_curve import (
    RejectionCurveConfig,
    curve_points,
    n_values,
    run_rejection_curve,
)
from llama2.model import Transformer
from llama2.model.reward import RewardModel

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"


def test_hand_built_example() -> None:
    rewards = [[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.6, 0.7]]
    correct = [[True, False, False, True], [False, True, False, False]]
    got = curve_points(rewards, correct, [1, 2, 4])
    cols = ("max_reward", "median_reward", "reward_em", "checker_reward", "checker_em", "random_reward",
            "random_em")  # fmt: skip
    want = {  # worked out by hand, see the comments
        # N=1: the first samples only
        1: (0.45, 0.45, 0.5, 0.45, 0.5, 0.45, 0.5),
        # N=2: reward picks 0.9 (wrong) and 0.8 (wrong); the checker picks 0.1 and 0.2 (both right)
        2: (0.85, 0.5, 0.0, 0.15, 1.0, 0.5, 0.5),
        # N=4: medians 0.4 and 0.65; checker: the best correct ones 0.3 and 0.2; random em (2/4 + 1/4) / 2
        4: (0.85, 0.525, 0.0, 0.25, 1.0, (0.45 + 0.575) / 2, 0.375),
    }
    for p in got:
        assert tuple(getattr(p, c) for c in cols) == pytest.approx(want[p.n]), p.n
    assert all(p.checker_em >= p.reward_em for p in got)


def test_max_of_n_grows_and_checker_is_a_ceiling() -> None:
    rng = random.Random(0)
    k = 16
    rewards = [[rng.random() for _ in range(k)] for _ in range(30)]
    correct = [[rng.random() < 0.3 for _ in range(k)] for _ in range(30)]
    pts = curve_points(rewards, correct, n_values(k))
    assert [p.n for p in pts] == [1, 2, 4, 8, 16]
    assert all(a.max_reward <= b.max_reward for a, b in itertools.pairwise(pts))
    assert all(a.checker_em <= b.checker_em for a, b in itertools.pairwise(pts))
    assert all(p.checker_em >= p.reward_em and p.checker_em >= p.random_em for p in pts)
    assert all(p.max_reward >= p.median_reward and p.max_reward >= p.random_reward for p in pts)
    assert pts[-1].max_reward == pytest.approx(sum(max(r) for r in rewards) / 30)


def test_n_values_and_errors() -> None:
    assert n_values(1) == [1] and n_values(8) == [1, 2, 4, 8] and n_values(6) == [1, 2, 4, 6]
    with pytest.raises(ConfigError):
        curve_points([[0.1, 0.2]], [[True]], [1])
    with pytest.raises(ConfigError):
        curve_points([[0.1, 0.2]], [[True, False]], [4])
    with pytest.raises(ConfigError, match="temperatures"):
        RejectionCurveConfig(temperatures=[])


def test_run_rejection_curve_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
    policy = save_checkpoint(Transformer(args), args, tmp_path / "policy", tokenizer_path=TOKENIZER)
    rms = []
    for objective in ("helpfulness", "safety"):
        rm = RewardModel(Transformer(args))
        torch.nn.init.normal_(rm.head.weight, std=1.0)
        rms.append(save_reward_model(rm, tmp_path / objective, TOKENIZER, {"objective": objective}))
    cfg = RejectionCurveConfig(
        model=str(policy), reward_helpful=rms[0], reward_safety=rms[1], n_per_task=2, k=4,
        temperatures=[0.7, 1.3], tasks=["add", "refuse"], max_new_tokens=4, out_json=tmp_path / "c.json",
        out_png=tmp_path / "c.png",
    )  # fmt: skip
    report = run_rejection_curve(cfg)
    assert json.loads((tmp_path / "c.json").read_text()) == report
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts = report["points"]
    assert [(p["temperature"], p["n"]) for p in pts] == [(t, n) for t in (0.7, 1.3) for n in (1, 2, 4)]
    for t in (0.7, 1.3):
        maxes = [p["max_reward"] for p in pts if p["temperature"] == t]
        assert maxes == sorted(maxes) and all(0 < m < 1 for m in maxes)
    assert all(p["checker_em"] >= p["reward_em"] for p in pts)
    out = capsys.readouterr().out
    assert out.count("\n| 0.7 |") == 3 and "EM checker" in out
