"""The checkable instruction suite: answers recomputed independently from the prompt text, checkers
accept right and reject wrong answers, splits are disjoint, JSONL round-trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama2.data.instruct_suite import (
    REFUSAL,
    TASKS,
    InstructItem,
    check_answer,
    generate_items,
    read_jsonl,
    split_of,
    write_jsonl,
)
from llama2.errors import ConfigError, DialogError


def _quoted(prompt: str) -> list[str]:
    return re.findall(r'"([^"]*)"', prompt)


def _after_colon(prompt: str) -> list[str]:
    return prompt.split(":", 1)[1].split()


def independent_answer(task: str, prompt: str) -> str:
    """The answer recomputed from the prompt text alone (no suite code, no meta)."""
    nums = [int(x) for x in re.findall(r"\d+", prompt)]
    if task == "add":
        return str(nums[0] + nums[1])
    if task == "sub":
        if prompt.startswith("Subtract"):
            return str(nums[1] - nums[0])
        return str(nums[0] - nums[1])
    if task == "mul":
        return str(nums[0] * nums[1])
    if task == "count_letter":
        letter, word = _quoted(prompt)
        return str(sum(1 for ch in word if ch == letter))
    if task == "count_vowels":
        (word,) = _quoted(prompt)
        return str(len(re.findall(r"[aeiou]", word)))
    if task == "reverse_words":
        return " ".join(_after_colon(prompt)[::-1])
    if task == "sort_words":
        return " ".join(sorted(_after_colon(prompt)))
    if task == "uppercase":
        return prompt.split(":", 1)[1].strip().upper()
    if task == "repeat":
        (word,) = _quoted(prompt)
        return " ".join([word] * nums[-1])
    if task == "refuse":
        return REFUSAL
    raise AssertionError(task)


def wrong_answers(task: str, answer: str) -> list[str]:
    """Plausible but wrong responses."""
    if task in ("add", "sub", "mul", "count_letter", "count_vowels"):
        n = int(answer)
        return [str(n + 1), str(n - 1) if n > 0 else "10", f"{answer} or {n + 1}", "", f"{answer}0"]
    words = answer.split()
    if task in ("reverse_words", "sort_words"):
        out = [" ".join(words[::-1]), " ".join(words[1:]), answer.upper(), answer + " " + words[0]]
        return [w for w in out if w != answer]
    if task == "uppercase":
        return [answer.lower(), answer.capitalize(), answer + " " + answer]
    if task == "repeat":
        return [" ".join(words[:-1]), answer + " " + words[0], answer.upper()]
    if task == "refuse":
        return ["Sure, here is how.", "I'm sorry.", "", REFUSAL.upper()]
    raise AssertionError(task)


@pytest.fixture(scope="module")
def held() -> list[InstructItem]:
    return generate_items("heldout", n_per_task=20, seed=3)


def test_answers_match_independent_computation(held: list[InstructItem]) -> None:
    assert {i.task for i in held} == set(TASKS)
    for item in held:
        assert item.answer == independent_answer(item.task, item.prompt), item.prompt
        assert item.messages[-1] == {"role": "assistant", "content": item.answer}
        assert item.messages[-2]["role"] == "user"


def test_checkers_accept_right_answers(held: list[InstructItem]) -> None:
    for item in held:
        assert item.check(item.answer)
        assert item.check(f"  {item.answer}\n")
        assert check_answer(item.task, item.answer, item.answer)
        if not item.answer.endswith("."):
            assert item.check(item.answer + ".")


def test_checkers_reject_wrong_answers(held: list[InstructItem]) -> None:
    for item in held:
        for wrong in wrong_answers(item.task, item.answer):
            assert not item.check(wrong), (item.task, item.answer, wrong)


def test_refusals_only_for_harmful_requests(held: list[InstructItem]) -> None:
    for item in held:
        assert (item.answer == REFUSAL) == (item.task == "refuse")


def test_train_and_heldout_are_disjoint() -> None:
    train = generate_items("train", n_per_task=150, seed=0, multi_turn_prob=0.3, system_prob=0.3)
    train_b = generate_items("train", n_per_task=150, seed=7)
    held = generate_items("heldout", n_per_task=30, seed=0) + generate_items("heldout", n_per_task=30, seed=9)
    train_prompts = {m["content"] for i in train + train_b for m in i.messages if m["role"] == "user"}
    held_prompts = {i.prompt for i in held}
    assert train_prompts.isdisjoint(held_prompts)
    assert all(split_of(p) == "train" for p in train_prompts)
    assert all(split_of(p) == "heldout" for p in held_prompts)
    # distinct prompts within one split
    assert len({i.prompt for i in train}) == len(train)


def test_split_fraction_is_about_a_fifth() -> None:
    prompts = [f"What is {a} plus {b}?" for a in range(100) for b in range(100)]
    share = sum(split_of(p) == "heldout" for p in prompts) / len(prompts)
    assert 0.18 < share < 0.22


def test_seeded_and_reproducible() -> None:
    a = generate_items("train", n_per_task=5, seed=1, system_prob=0.5)
    b = generate_items("train", n_per_task=5, seed=1, system_prob=0.5)
    c = generate_items("train", n_per_task=5, seed=2, system_prob=0.5)
    assert [i.messages for i in a] == [i.messages for i in b]
    assert [i.messages for i in a] != [i.messages for i in c]


def test_system_and_multi_turn_dialogs() -> None:
    items = generate_items("train", n_per_task=20, seed=0, system_prob=1.0, multi_turn_prob=1.0)
    for item in items:
        roles = [m["role"] for m in item.messages]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert item.prompt_dialog == item.messages[:-1]


def test_jsonl_roundtrip_and_sft_format(tmp_path: Path) -> None:
    items = generate_items("heldout", n_per_task=3, seed=0, system_prob=0.5)
    path = write_jsonl(items, tmp_path / "suite.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(items)
    first = json.loads(lines[0])
    assert set(first) >= {"messages", "task", "answer"}
    back = read_jsonl(path)
    assert [(i.task, i.messages, i.answer) for i in back] == [(i.task, i.messages, i.answer) for i in items]
    assert all(i.check(i.answer) for i in back)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown instruction tasks"):
        generate_items("train", 1, tasks=["poetry"])
    with pytest.raises(ConfigError, match="split must be"):
        generate_items("test", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="distinct heldout prompts"):
        generate_items("heldout", 10_000, tasks=["count_vowels"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [], "task": "add", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(DialogError, match=r"bad\.jsonl:1"):
        read_jsonl(bad)
