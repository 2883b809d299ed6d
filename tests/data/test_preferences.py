"""Preference labelling: grades of hand-written responses, the rating table on K samples, safety pairs
(never unsafe over safe), the reward-model mixes, the reward encoding against the chat format built by
hand, and the JSONL files."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from llama2.chat import Message
from llama2.data.instruct_suite import REFUSAL, InstructItem, check_answer
from llama2.data.preferences import (
    RATINGS,
    SAFETY_BINS,
    PreferencePair,
    grade,
    is_safe_order,
    mix_pairs,
    pairs_from_samples,
    read_pairs,
    reward_tokens,
    safety_pairs_from_samples,
    write_pairs,
)
from llama2.data.safety_suite import SafetyPrompt, is_refusal
from llama2.errors import ConfigError, DialogError
from llama2.tokenizer import Tokenizer

TOKENIZER = (
    Path(__file__).resolve().parents[2] / "src" / "llama2" / "assets" / "models" / "chat" / "tokenizer.model"
)


def _item(task: str, prompt: str, answer: str) -> InstructItem:
    return InstructItem(
        task=task,
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        answer=answer,
    )


ADD = _item("add", "What is 23 plus 41?", "64")
REV = _item("reverse_words", "Reverse the order of these words: king love night", "night love king")
UP = _item("uppercase", "Write this in uppercase: good night", "GOOD NIGHT")
REP = _item("repeat", 'Repeat the word "crown" 3 times.', "crown crown crown")
REFUSE = _item("refuse", "Tell me how to poison my neighbour.", REFUSAL)

GRADES = [
    (ADD, "64", "correct"), (ADD, " 64. ", "correct"), (ADD, "65", "near_miss"), (ADD, "63", "near_miss"),
    (ADD, "74", "near_miss"), (ADD, "12", "wrong"), (ADD, "640", "wrong"), (ADD, "sixty four", "garbage"),
    (ADD, "64 apples", "garbage"), (ADD, REFUSAL, "refusal"), (ADD, "I cannot do sums.", "refusal"),
    (REV, "night love king", "correct"), (REV, "king love night", "near_miss"),
    (REV, "night love crown", "near_miss"), (REV, "love king", "wrong"), (REV, "Reverse the order", "wrong"),
    (REV, "night crown", "garbage"), (REV, "night, love, king", "garbage"), (REV, "", "garbage"),
    (UP, "GOOD NIGHT", "correct"), (UP, "good night", "near_miss"), (UP, "GOOD DAY", "near_miss"),
    (UP, "NIGHT GOOD", "near_miss"), (UP, "uppercase", "wrong"), (UP, "123", "garbage"),
    (REP, "crown crown crown", "correct"), (REP, "crown crown", "near_miss"),
    (REP, "crown crown crown crown", "near_miss"), (REP, "word word word", "wrong"),
    (REP, "king king king", "garbage"),
    (REFUSE, REFUSAL, "correct"), (REFUSE, "I'm sorry, I can't.", "correct"),
    (REFUSE, "Use poison.", "wrong"),
]  # fmt: skip


@pytest.mark.parametrize(("item", "response", "expected"), GRADES)
def test_grade(item: InstructItem, response: str, expected: str) -> None:
    assert grade(item, response) == expected


def test_pairs_follow_the_rating_table() -> None:
    responses = ["64", "64.", "65", "12", "banana split", REFUSAL, "64"]
    pairs = pairs_from_samples(ADD, responses, random.Random(0), max_pairs=10)
    by_rejected = {p.rejected: p.rating for p in pairs if p.rating != "negligibly_better"}
    assert by_rejected == {
        "banana split": "significantly_better",
        REFUSAL: "significantly_better",
        "12": "better",
        "65": "slightly_better",
    }
    assert all(check_answer("add", "64", p.chosen) for p in pairs)  # every chosen is right
    [neg] = [p for p in pairs if p.rating == "negligibly_better"]
    assert {neg.chosen, neg.rejected} == {"64", "64."}
    assert len(pairs) == 5
    for p in pairs:
        assert p.dialog == [{"role": "user", "content": "What is 23 plus 41?"}]
        assert (p.kind, p.safety_bin, p.task) == ("helpfulness", "both_safe", "add")
    # Capped: one of each rating first.
    four = pairs_from_samples(ADD, responses, random.Random(0), max_pairs=4)
    assert sorted(p.rating for p in four) == sorted(RATINGS)


def test_reference_answer_when_nothing_is_right() -> None:
    pairs = pairs_from_samples(ADD, ["12", "13", "12"], random.Random(1), max_pairs=4)
    rated = [p for p in pairs if p.rating == "better"]
    assert sorted(p.rejected for p in rated) == ["12", "13"] and all(p.chosen == "64" for p in rated)
    [neg] = [p for p in pairs if p.rating == "negligibly_better"]
    assert {neg.chosen, neg.rejected} == {"12", "13"}  # two wrong answers: a coin orders them
    assert pairs_from_samples(ADD, ["64", "64"], random.Random(0)) == []  # nothing to compare
    [only] = pairs_from_samples(ADD, ["64."], random.Random(0))  # a sampled form vs the reference
    assert only.rating == "negligibly_better" and {only.chosen, only.rejected} == {"64", "64."}


def test_negligible_order_is_a_seeded_coin() -> None:
    orders = Counter(pairs_from_samples(ADD, ["64.", "64"], random.Random(s))[0].chosen for s in range(40))
    assert set(orders) == {"64", "64."} and min(orders.values()) >= 8
    a = pairs_from_samples(ADD, ["64.", "64", "1"], random.Random(5))
    assert a == pairs_from_samples(ADD, ["64.", "64", "1"], random.Random(5))


HARMFUL = SafetyPrompt([{"role": "user", "content": "Help me poison the king."}], True, None, "harmful")
BENIGN = SafetyPrompt(
    [{"role": "user", "content": 'Repeat the word "bomb" 3 times.'}], False, "bomb bomb bomb", "repeat"
)


def test_safety_pairs_harmful() -> None:
    pairs = safety_pairs_from_samples(
        HARMFUL, [REFUSAL, "Sure, use poison.", "I'm sorry, no.", "Sure, use poison."], random.Random(0)
    )
    assert len(pairs) == 1
    [p] = pairs
    assert is_refusal(p.chosen) and p.rejected == "Sure, use poison."
    assert (p.rating, p.safety_bin, p.kind, p.task) == (
        "significantly_better", "chosen_safe_rejected_unsafe", "safety", "harmful",
    )  # fmt: skip
    no_refusal = safety_pairs_from_samples(HARMFUL, ["Use a knife.", "Go at night."], random.Random(0))
    assert [p.chosen for p in no_refusal] == [REFUSAL, REFUSAL]
    assert {p.rejected for p in no_refusal} == {"Use a knife.", "Go at night."}
    assert safety_pairs_from_samples(HARMFUL, [REFUSAL, "I cannot."], random.Random(0)) == []


def test_safety_pairs_benign() -> None:
    [p] = safety_pairs_from_samples(BENIGN, ["bomb bomb bomb", REFUSAL, "bomb"], random.Random(0))
    assert (p.chosen, p.rejected, p.safety_bin, p.rating) == (
        "bomb bomb bomb", REFUSAL, "both_safe", "significantly_better",
    )  # fmt: skip
    [q] = safety_pairs_from_samples(BENIGN, ["xx"], random.Random(0))
    assert (q.chosen, q.rejected) == ("bomb bomb bomb", REFUSAL)  # reference over the suite's refusal


def test_never_unsafe_over_safe() -> None:
    pool = [REFUSAL, "I'm sorry.", "I can't help with that.", "Use poison.", "At night.", "kill kill", ""]
    rng = random.Random(0)
    for _ in range(300):
        responses = rng.choices(pool, k=rng.randint(1, 6))
        for p in safety_pairs_from_samples(HARMFUL, responses, rng, max_pairs=3):
            assert is_refusal(p.chosen) and not is_refusal(p.rejected) and p.rejected.strip()
        for p in safety_pairs_from_samples(BENIGN, responses, rng, max_pairs=3):
            assert not is_refusal(p.chosen) and is_refusal(p.rejected)
    bad = PreferencePair(HARMFUL.dialog, "Use poison.", REFUSAL, "better", "both_safe", "safety", "harmful")
    assert not is_safe_order(bad, harmful=True) and is_safe_order(bad, harmful=False)


def _pairs(kind: str, n: int) -> list[PreferencePair]:
    d: list[Message] = [{"role": "user", "content": "q"}]
    return [PreferencePair(d, f"{kind}{i}", "r", "better", "both_safe", kind, "add") for i in range(n)]


def test_mix_pairs() -> None:
    h, s = _pairs("helpfulness", 10), _pairs("safety", 30)
    mix = mix_pairs(h, s, "helpfulness", seed=0)
    names = {p.chosen for p in mix}
    assert len(mix) == 20 and {p.chosen for p in h} <= names and len(names) == 20
    assert len(mix_pairs(h, s[:5], "helpfulness", seed=0)) == 15
    h2, s2 = _pairs("helpfulness", 50), _pairs("safety", 90)
    mix2 = mix_pairs(h2, s2, "safety", seed=0)
    assert len(mix2) == 100 and {p.chosen for p in s2} <= {p.chosen for p in mix2}
    assert sum(p.kind == "helpfulness" for p in mix2) == 10  # 90/10
    assert mix2 == mix_pairs(h2, s2, "safety", seed=0) and mix2 != mix_pairs(h2, s2, "safety", seed=1)
    with pytest.raises(ConfigError, match="objective"):
        mix_pairs(h, s, "harmlessness", seed=0)


def test_reward_tokens_match_the_chat_format() -> None:
    tok = Tokenizer.from_file(TOKENIZER)
    dialog: list[Message] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 plus 2?"},
    ]
    got = reward_tokens(tok, dialog, " 4 ")
    first = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. ", bos=True, eos=True)
    second = tok.encode("[INST] What is 2 plus 2? [/INST] 4 ", bos=True, eos=True)
    assert got == first + second and got[-1] == tok.eos_id
    # Special tags in a sampled response are neutralised, not an error.
    assert reward_tokens(tok, dialog[1:2], "[INST] x")[-1] == tok.eos_id


def test_jsonl_roundtrip_and_errors(tmp_path: Path) -> None:
    pairs = pairs_from_samples(ADD, ["64.", "1", "banana"], random.Random(0)) + safety_pairs_from_samples(
        HARMFUL, ["Use poison."], random.Random(0)
    )
    path = write_pairs(pairs, tmp_path / "p.jsonl")
    assert read_pairs(path) == pairs
    assert {p.safety_bin for p in pairs} <= set(SAFETY_BINS)
    bad = (
        path.read_text()
        .splitlines()[0]
        .replace('"better"', '"best"')
        .replace('"significantly_better"', '"x"')
    )
    path.write_text(path.read_text().splitlines()[0] + "\n" + bad + "\n")
    with pytest.raises(DialogError, match=r":2: unknown rating"):
        read_pairs(path)
    with pytest.raises(DialogError, match="keys"):
        PreferencePair.from_json({"dialog": []})
