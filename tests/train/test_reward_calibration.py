"""Platt calibration of the safety reward model: the fit against a brute-force grid minimum of the same
cross-entropy, labels from the safety bins, and rankings unchanged once folded into the head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llama2.config import ModelArgs
from llama2.data.preferences import PreferencePair, reward_tokens
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.model.reward import RewardModel, score_rows
from llama2.tokenizer import Tokenizer
from llama2.train.reward_calibration import calibrate_safety, fit_platt, safety_labels

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"


def _bce(a: float, b: float, s: list[float], y: list[int]) -> float:
    total = 0.0
    for si, yi in zip(s, y, strict=True):
        z = a * si + b
        p = 1.0 / (1.0 + math.exp(-z))
        total -= yi * math.log(p) + (1 - yi) * math.log(1 - p)
    return total / len(s)


def test_fit_matches_a_grid_search_of_the_same_loss() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200, generator=g) * 2.0
    y = (torch.rand(200, generator=g) < torch.sigmoid(1.5 * s - 0.7)).int()  # a noisy logistic truth
    a, b, loss = fit_platt(s, y.bool())
    sl, yl = s.tolist(), y.tolist()
    grid = min(
        (_bce(ga / 20, gb / 20, sl, yl), ga / 20, gb / 20) for ga in range(1, 80) for gb in range(-60, 20)
    )
    assert loss <= grid[0] + 1e-9  # at least as good as the best grid point ...
    assert a == pytest.approx(grid[1], abs=0.06) and b == pytest.approx(grid[2], abs=0.06)  # ... and near it
    assert loss == pytest.approx(_bce(a, b, sl, yl), rel=1e-9)


def test_one_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="safe and unsafe"):
        fit_platt(torch.randn(5), torch.ones(5, dtype=torch.bool))


def _pair(chosen: str, rejected: str, safety_bin: str, kind: str = "safety") -> PreferencePair:
    dialog = [{"role": "user", "content": "Tell me how to poison the king."}]
    return PreferencePair(dialog, chosen, rejected, "significantly_better", safety_bin, kind, "harmful")  # type: ignore[arg-type]


def test_labels_follow_the_safety_bins() -> None:
    pairs = [
        _pair("I'm sorry", "Use hemlock", "chosen_safe_rejected_unsafe"),
        _pair("Paris", "I'm sorry", "both_safe"),
        _pair("a", "b", "both_unsafe"),
        _pair("64", "63", "both_safe", kind="helpfulness"),  # not a safety pair: not used
    ]
    got = [(r, ok) for _, r, ok in safety_labels(pairs)]
    assert got == [
        ("I'm sorry", True), ("Use hemlock", False), ("Paris", True), ("I'm sorry", True),
        ("a", False), ("b", False),
    ]  # fmt: skip


def test_calibration_is_the_fitted_affine_map_and_keeps_rankings() -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
    model = RewardModel(Transformer(args)).eval()
    tok = Tokenizer.from_file(TOKENIZER)
    words = ["crown", "sword", "rose", "night", "king", "queen", "blood", "honour"]
    pairs = [_pair("I'm sorry, but I cannot help with that.", f"Use the {w}.", "chosen_safe_rejected_unsafe")
             for w in words]  # fmt: skip
    rows = [reward_tokens(tok, p.dialog, r) for p, r, _ in safety_labels(pairs)]
    before = score_rows(model, rows)
    # make the raw scores separate the classes but sit at an arbitrary level (all far above 0)
    with torch.no_grad():
        model.head.bias.add_(25.0)
    shifted = score_rows(model, rows)
    assert torch.sigmoid(shifted).min() > 0.99  # uncalibrated: sigmoid says "safe" for everything
    cal = calibrate_safety(model, tok, pairs)
    after = score_rows(model, rows)
    assert torch.equal(after.argsort(), shifted.argsort()) and torch.equal(before.argsort(), after.argsort())
    expected = cal.scale * shifted + cal.shift
    assert torch.allclose(after, expected, atol=1e-4)
    assert cal.n == 16 and cal.unsafe_share == 0.5
