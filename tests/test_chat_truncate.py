"""Chat truncation (`encode_dialog_with_info(..., max_tokens)`): the linear search gives exactly the
tokens of the obvious quadratic rule, and a 20k-pair dialog is encoded in well under a second.

The oracle builds Meta's strings by hand and tokenizes them with `sentencepiece` directly; it tries
every number of dropped pairs from zero up and keeps the first that fits.
"""

from __future__ import annotations

import random
import time

import pytest

from llama2.chat import Dialog, EncodedDialog, encode_dialog_with_info
from llama2.errors import DialogError
from llama2.tokenizer import Tokenizer
from text_fixtures import MODEL, ref_encode

WORDS = ["hello", "Paris", "le", "chat", "über", "naïve", "42", "x" * 30, "日本語", "tout", "va", "bien", "!"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(MODEL)


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _dialog(rng: random.Random, pairs: int, system: str | None) -> Dialog:
    dialog: Dialog = [] if system is None else [{"role": "system", "content": system}]
    for _ in range(pairs):
        dialog.append({"role": "user", "content": _text(rng)})
        dialog.append({"role": "assistant", "content": _text(rng)})
    dialog.append({"role": "user", "content": _text(rng)})
    return dialog


def oracle(dialog: Dialog, budget: int) -> EncodedDialog | None:
    """The quadratic rule: drop 0, 1, 2... oldest pairs; the first candidate within `budget` wins."""
    system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
    turns = [m["content"] for m in (dialog[1:] if system is not None else dialog)]
    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    last = turns[-1]
    for drop in range(len(pairs) + 1):
        kept = pairs[drop:]
        ids: list[int] = []
        for j, (user, answer) in enumerate(kept):
            if j == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user.strip()}"
            ids += ref_encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)
        user = last.strip()
        if not kept and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        ids += ref_encode(f"[INST] {user} [/INST]", bos=True)
        if len(ids) <= budget:
            return EncodedDialog(ids, 2 * drop)
    return None


@pytest.mark.parametrize("system", [None, "Answer in French.", "  spaced  system  "])
def test_truncation_matches_the_quadratic_rule(tok: Tokenizer, system: str | None) -> None:
    rng = random.Random(7)
    checked = 0
    for trial in range(12):
        dialog = _dialog(rng, rng.randint(0, 6), system)
        full = oracle(dialog, 10**9)
        assert full is not None and full.dropped_turns == 0
        for budget in sorted({1, 5, 20, len(full.tokens) // 3, len(full.tokens) - 1, len(full.tokens)}):
            if budget < 1:
                continue
            expected = oracle(dialog, budget)
            if expected is None:
                with pytest.raises(DialogError, match=f"max_tokens={budget}"):
                    encode_dialog_with_info(dialog, tok, budget)
            else:
                assert encode_dialog_with_info(dialog, tok, budget) == expected, (trial, budget)
                checked += 1
    assert checked >= 20  # the cases are not all "does not fit"


def test_no_budget_keeps_everything(tok: Tokenizer) -> None:
    dialog = _dialog(random.Random(3), 4, "Be brief.")
    expected = oracle(dialog, 10**9)
    assert encode_dialog_with_info(dialog, tok) == expected


def test_error_names_what_the_last_turn_needs(tok: Tokenizer) -> None:
    dialog: Dialog = [
        {"role": "system", "content": "s " * 50},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    need = len(ref_encode(f"[INST] <<SYS>>\n{'s ' * 50}\n<</SYS>>\n\nc [/INST]", bos=True))
    with pytest.raises(DialogError, match=rf"max_tokens=10: .* need {need} tokens .*all 1 earlier"):
        encode_dialog_with_info(dialog, tok, 10)


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_twenty_thousand_pairs_are_linear(tok: Tokenizer, system: str | None) -> None:
    """The dialog of issue 9 (20k pairs, ~1.5 MB): the quadratic search took 54 s."""
    dialog: Dialog = [] if system is None else [{"role": "system", "content": system}]
    for i in range(20_000):
        dialog.append({"role": "user", "content": f"question number {i} about the weather today"})
        dialog.append({"role": "assistant", "content": f"answer number {i}: it is sunny"})
    dialog.append({"role": "user", "content": "and tomorrow?"})
    start = time.perf_counter()
    out = encode_dialog_with_info(dialog, tok, 256)
    elapsed = time.perf_counter() - start
    assert len(out.tokens) <= 256 and out.dropped_turns >= 2 * 19_980
    # The kept tail is exactly the oracle's for the same last pairs, and one more pair would not fit.
    head: Dialog = [] if system is None else [{"role": "system", "content": system}]
    kept = 2 * 20_000 - out.dropped_turns + 1
    assert oracle(head + dialog[-kept:], 256) == EncodedDialog(out.tokens, 0)
    assert oracle(head + dialog[-kept - 2 :], 256) == EncodedDialog(out.tokens, 2)
    assert elapsed < 5.0, elapsed  # ~0.3 s on one core; the quadratic search took about a minute
