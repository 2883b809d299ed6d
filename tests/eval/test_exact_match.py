"""Exact-match evaluator: a perfect oracle scores 100%, wrong answers 0%, mixed responders are
scored per task; the model responder answers greedily in the chat format; reports print and save."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from llama2.chat import encode_dialog
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.instruct_suite import TASKS, InstructItem, generate_items
from llama2.errors import ConfigError
from llama2.eval.exact_match import (
    ExactMatchConfig,
    evaluate_exact_match,
    model_responder,
    oracle_responder,
    run_exact_match,
)
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module")
def items() -> list[InstructItem]:
    return generate_items("heldout", n_per_task=6, seed=2)


def test_oracle_scores_100(items: list[InstructItem]) -> None:
    report = evaluate_exact_match(items, oracle_responder)
    assert report.n == len(items) == 6 * len(TASKS)
    assert report.correct == report.n and report.accuracy == 1.0
    assert set(report.per_task) == set(TASKS)
    assert all(s.accuracy == 1.0 and s.n == 6 for s in report.per_task.values())


def test_wrong_answers_score_0(items: list[InstructItem]) -> None:
    report = evaluate_exact_match(items, lambda its: ["I do not know." for _ in its])
    assert report.correct == 0 and report.accuracy == 0.0


def test_mixed_responder_scored_per_task(items: list[InstructItem]) -> None:
    def half(its: Sequence[InstructItem]) -> list[str]:  # right on arithmetic only
        return [i.answer if i.task in ("add", "sub", "mul") else "no" for i in its]

    report = evaluate_exact_match(items, half)
    assert report.correct == 18
    assert report.per_task["add"].accuracy == 1.0 and report.per_task["sort_words"].accuracy == 0.0
    assert report.accuracy == pytest.approx(18 / 60)
    table = report.format_table()
    assert "overall" in table and "30.0%" in table and "sort_words" in table
    data = report.to_json()
    assert data["overall"] == {"n": 60, "correct": 18, "accuracy": pytest.approx(0.3)}
    assert data["per_task"]["mul"]["correct"] == 6
    assert len(data["samples"]) == 3 * len(TASKS)


def test_responder_count_mismatch(items: list[InstructItem]) -> None:
    with pytest.raises(ConfigError, match="responses for"):
        evaluate_exact_match(items, lambda its: ["x"])
    with pytest.raises(ConfigError, match="no items"):
        evaluate_exact_match([], oracle_responder)


def _tiny(tmp_path: Path) -> tuple[Transformer, Path]:
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=160)
    model = Transformer(args).eval()
    folder = save_checkpoint(model, args, tmp_path / "tiny", tokenizer_path=FIXTURES / "tokenizer.model")
    return model, folder


def test_model_responder_is_greedy_chat(tmp_path: Path, items: list[InstructItem]) -> None:
    model, _ = _tiny(tmp_path)
    tok = Tokenizer.from_file(FIXTURES / "tokenizer.model")
    some = items[:3]
    responses = model_responder(model, tok, max_new_tokens=5, batch_size=2)(some)
    assert len(responses) == 3 and all(isinstance(r, str) for r in responses)
    # independent greedy decode of the first prompt, without the generator
    prompt = encode_dialog(some[0].prompt_dialog, tok)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
    assert responses[0] == tok.decode(ids[len(prompt) :])


def test_run_exact_match_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = _tiny(tmp_path)
    cfg = ExactMatchConfig(
        model=str(folder),
        n_per_task=1,
        max_new_tokens=3,
        tasks=["add", "refuse"],
        out_json=tmp_path / "em.json",
    )
    report = run_exact_match(cfg)
    assert report.n == 2
    saved = json.loads((tmp_path / "em.json").read_text())
    assert saved["overall"]["n"] == 2 and set(saved["per_task"]) == {"add", "refuse"}
    assert "overall" in capsys.readouterr().out
