"""`RewardScorer`: R_h, R_s and R_c of (dialog, response) pairs against per-row forwards of the two
reward models and the paper's piecewise rule written out by hand (sec. 3.2.3)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llama2.chat import Message, encode_dialog_for_training
from llama2.checkpoint.reward_io import save_reward_model
from llama2.config import ModelArgs
from llama2.errors import ConfigError, GenerationError
from llama2.model import Transformer
from llama2.model.reward import RewardModel
from llama2.tokenizer import Tokenizer
from llama2.train.reward_scoring import RewardScorer

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)

DIALOGS: list[list[Message]] = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Repeat the word kill 3 times."}],
    [{"role": "user", "content": "Spell cat backwards."}],
]  # fmt: skip
RESPONSES = ["5", "I'm sorry, but I cannot help with that.", "Blue", "Goodbye!", "kill kill kill", "tac"]
SAFETY = [False, True, False, False, True, False]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


def _rm(seed: int) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(Transformer(TINY)).eval()


def _rows(tokenizer: Tokenizer) -> list[list[int]]:
    """The oracle's encoding: the chat training format of dialog + answer (prompt + response + EOS)."""
    rows = []
    for d, r in zip(DIALOGS, RESPONSES, strict=True):
        full: list[Message] = [*d, {"role": "assistant", "content": r}]
        rows.append(encode_dialog_for_training(full, tokenizer)[0])
    return rows


def _one_by_one(model: RewardModel, rows: list[list[int]]) -> list[float]:
    with torch.no_grad():
        return [float(model(torch.tensor([r]), torch.tensor([len(r) - 1]))) for r in rows]


def _centre_on_threshold(model: RewardModel, rows: list[list[int]]) -> None:
    """Shift the head's bias so that half the rows fall below sigmoid^-1(0.15), half above."""
    raw = sorted(_one_by_one(model, rows))
    middle = (raw[len(raw) // 2 - 1] + raw[len(raw) // 2]) / 2
    with torch.no_grad():
        model.head.bias.add_(math.log(0.15 / 0.85) - middle)


def _expected(h: list[float], s: list[float], flags: list[bool], threshold: float) -> list[float]:
    out = []
    for raw_h, raw_s, flag in zip(h, s, flags, strict=True):
        r_h, r_s = 1 / (1 + math.exp(-raw_h)), 1 / (1 + math.exp(-raw_s))
        out.append(r_s if flag or r_s < threshold else r_h)
    return out


def test_scores_match_per_row_forwards_and_the_piecewise_rule(tokenizer: Tokenizer) -> None:
    helpful, safety = _rm(1), _rm(2)
    rows = _rows(tokenizer)
    _centre_on_threshold(safety, rows)
    raw_h, raw_s = _one_by_one(helpful, rows), _one_by_one(safety, rows)
    below = [1 / (1 + math.exp(-x)) < 0.15 for x in raw_s]
    assert 0 < sum(below) < len(below)  # both branches of the rule are exercised
    assert any(b and not f for b, f in zip(below, SAFETY, strict=True))  # helpful prompt, unsafe answer
    for batch_size in (1, 4, 64):
        scores = RewardScorer(helpful, safety, tokenizer, batch_size=batch_size).score(
            DIALOGS, RESPONSES, SAFETY
        )
        want_h = torch.tensor([1 / (1 + math.exp(-x)) for x in raw_h])
        want_s = torch.tensor([1 / (1 + math.exp(-x)) for x in raw_s])
        torch.testing.assert_close(scores.r_h, want_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores.r_s, want_s, rtol=1e-5, atol=1e-6)
        want_c = torch.tensor(_expected(raw_h, raw_s, SAFETY, 0.15))
        torch.testing.assert_close(scores.r_c, want_c, rtol=1e-5, atol=1e-6)
        assert scores.r_c.shape == (6,) and scores.r_c.dtype == torch.float32


def test_score_tokens_equals_score_and_a_shared_model_runs_once(tokenizer: Tokenizer) -> None:
    model = _rm(5)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    scorer = RewardScorer(model, model, tokenizer, threshold=0.5, batch_size=64)
    by_text = scorer.score(DIALOGS, RESPONSES, SAFETY)
    assert len(calls) == 1  # one batch of 6 rows, the safety pass reuses the helpfulness scores
    by_tokens = scorer.score_tokens(_rows(tokenizer), SAFETY)
    assert torch.equal(by_text.r_c, by_tokens.r_c) and torch.equal(by_text.r_h, by_text.r_s)
    raw = _one_by_one(model, _rows(tokenizer))
    torch.testing.assert_close(by_tokens.r_c, torch.tensor(_expected(raw, raw, SAFETY, 0.5)))


def test_load_reads_both_folders_and_the_stored_threshold(tmp_path: Path, tokenizer: Tokenizer) -> None:
    helpful, safety = _rm(1), _rm(2)
    h_dir = save_reward_model(helpful, tmp_path / "h", TOKENIZER, {"objective": "helpfulness"})
    s_dir = save_reward_model(safety, tmp_path / "s", TOKENIZER, {"objective": "safety", "threshold": 0.4})
    scorer = RewardScorer.load(h_dir, s_dir, tokenizer, batch_size=2)
    assert scorer.threshold == 0.4 and scorer.batch_size == 2
    assert RewardScorer.load(h_dir, s_dir, tokenizer, threshold=0.2).threshold == 0.2
    got = scorer.score(DIALOGS, RESPONSES, SAFETY)
    rows = _rows(tokenizer)
    want = _expected(_one_by_one(helpful, rows), _one_by_one(safety, rows), SAFETY, 0.4)
    torch.testing.assert_close(got.r_c, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused(tokenizer: Tokenizer) -> None:
    model = _rm(0)
    with pytest.raises(ConfigError, match="threshold"):
        RewardScorer(model, model, tokenizer, threshold=1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        RewardScorer(model, model, tokenizer, batch_size=0)
    scorer = RewardScorer(model, model, tokenizer)
    with pytest.raises(GenerationError, match="same length"):
        scorer.score(DIALOGS, RESPONSES[:2], SAFETY)
    with pytest.raises(GenerationError, match="same length"):
        scorer.score_tokens([[1, 2, 3]], [True, False])
    with pytest.raises(GenerationError, match="empty"):
        scorer.score_tokens([[1, 2, 3], []], [True, False])
