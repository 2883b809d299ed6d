"""GAtt data: the answer-style checkers on hand-written strings, apply/strip round trips, and the
dialogs (split by prompt hash, half terse, instruction only where asked)."""

from __future__ import annotations

import hashlib

import pytest

from llama2.data.gatt import (
    INSTRUCTIONS,
    INSTRUCTIONS_BY_NAME,
    GattDialog,
    GattInstruction,
    gatt_dialogs,
    get_instruction,
)
from llama2.errors import ConfigError, DialogError

LORD, VERILY, BOTH, TILDES = (
    INSTRUCTIONS_BY_NAME[n] for n in ("my_lord", "verily", "verily_my_lord", "tildes")
)


@pytest.mark.parametrize(
    ("inst", "response", "ok"),
    [
        (LORD, "64 my lord", True),
        (LORD, "64 my lord.", True),
        (LORD, "64, my lord!", True),
        (LORD, "64 My Lord", True),
        (LORD, "  64   my\n lord ", True),
        (LORD, "my lord", True),
        (LORD, "64", False),
        (LORD, "64 army lord", False),
        (LORD, "64 my lords", False),
        (LORD, "my lord 64", False),
        (VERILY, "Verily, 64", True),
        (VERILY, "verily 64", True),
        (VERILY, "VERILY: 64.", True),
        (VERILY, "Verilyx 64", False),
        (VERILY, "64 Verily", False),
        (VERILY, "", False),
        (BOTH, "Verily, 64 my lord.", True),
        (BOTH, "Verily, 64", False),
        (BOTH, "64 my lord", False),
        (TILDES, "~64~", True),
        (TILDES, "~64~.", True),
        (TILDES, "~ GOOD NIGHT ~", True),
        (TILDES, "~64", False),
        (TILDES, "64~", False),
        (TILDES, "~", False),
    ],
)
def test_check_on_hand_written_answers(inst: GattInstruction, response: str, ok: bool) -> None:
    assert inst.check(response) is ok


@pytest.mark.parametrize(
    ("inst", "response", "content"),
    [
        (LORD, "64 my lord.", "64"),
        (LORD, "GOOD NIGHT, My Lord", "GOOD NIGHT"),
        (LORD, "64 army lord", "64 army lord"),
        (VERILY, "Verily, crown crown", "crown crown"),
        (BOTH, "Verily, 12 my lord", "12"),
        (BOTH, "Verily, 12", "12"),  # a partial style is removed too
        (TILDES, "~rose king~", "rose king"),
        (TILDES, "plain", "plain"),
    ],
)
def test_strip_removes_the_style(inst: GattInstruction, response: str, content: str) -> None:
    assert inst.strip(response) == content


@pytest.mark.parametrize("inst", INSTRUCTIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("content", ["64", "GOOD NIGHT", "blood crown rose", "night love king"])
def test_apply_strip_round_trip(inst: GattInstruction, content: str) -> None:
    styled = inst.apply(content)
    assert styled != content and inst.check(styled) and not inst.check(content)
    assert inst.strip(styled) == content
    assert inst.apply(styled) == styled  # idempotent
    assert inst.check(inst.apply("64 my" if inst is LORD else "Verily"))  # half-styled input


def test_apply_literal_forms() -> None:
    assert LORD.apply("64") == "64 my lord"
    assert VERILY.apply("64") == "Verily, 64"
    assert BOTH.apply("64") == "Verily, 64 my lord"
    assert TILDES.apply("64") == "~64~"


def test_wordings() -> None:
    assert LORD.text == "Always end every answer with the words 'my lord'."
    assert LORD.terse == "End answers with: my lord"
    assert all(i.text != i.terse for i in INSTRUCTIONS)
    with pytest.raises(DialogError, match="unknown GAtt instruction"):
        get_instruction("pirate")


def _split_of(prompt: str) -> str:  # the suite's rule, restated: 20 % held out by SHA-256
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "heldout" if h % 10_000 < 2000 else "train"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_dialogs_split_terse_and_tasks(split: str) -> None:
    dialogs = gatt_dialogs(split, 10, seed=3, max_turns=4)  # type: ignore[arg-type]
    assert len(dialogs) == 10 and sum(d.terse for d in dialogs) == 5
    for d in dialogs:
        assert len(d.items) == 4 and d.system is None
        for item in d.items:
            assert _split_of(item.prompt) == split
            assert item.task != "refuse" and item.check(item.answer)
    assert len({d.instruction.name for d in gatt_dialogs(split, 40, seed=0)}) == len(INSTRUCTIONS)  # type: ignore[arg-type]
    again = gatt_dialogs(split, 10, seed=3, max_turns=4)  # type: ignore[arg-type]
    assert [d.to_json() for d in again] == [d.to_json() for d in dialogs]
    other = gatt_dialogs(split, 10, seed=4, max_turns=4)  # type: ignore[arg-type]
    assert [d.to_json() for d in other] != [d.to_json() for d in dialogs]


def test_messages_place_the_instruction() -> None:
    (d,) = gatt_dialogs("train", 1, seed=0, max_turns=3, system_prob=1.0)
    assert d.system is not None
    train = d.messages(["a1", "a2"], instruction_everywhere=False, end_with_user=True)
    assert [m["role"] for m in train] == ["system", "user", "assistant", "user", "assistant", "user"]
    users = [m["content"] for m in train if m["role"] == "user"]
    assert users[0] == f"{d.instruction_text}\n{d.items[0].prompt}"
    assert users[1:] == [d.items[1].prompt, d.items[2].prompt]
    sampled = d.messages(["a1"], instruction_everywhere=True, end_with_user=True)
    assert all(m["content"].startswith(d.instruction_text + "\n") for m in sampled if m["role"] == "user")
    closed = d.messages(["a1", "a2"], instruction_everywhere=False, end_with_user=False)
    assert closed[-1] == {"role": "assistant", "content": "a2"}
    with pytest.raises(DialogError):
        d.messages(["a1", "a2", "a3"], instruction_everywhere=False, end_with_user=True)
    assert GattDialog.from_json(d.to_json()) == d


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="split"):
        gatt_dialogs("test", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_turns"):
        gatt_dialogs("train", 1, max_turns=0)
    with pytest.raises(DialogError):
        GattDialog.from_json({"instruction": "my_lord"})
