"""Ghost Attention (GAtt) data (Llama 2 paper, sec. 3.3): multi-turn dialogs whose first user turn
carries an answer-style instruction that must hold for the whole dialog.

Instructions are *checkable* answer styles, so adherence is a program, not a judgement:

| name | full wording | terse wording | example answer |
|---|---|---|---|
| `my_lord` | Always end every answer with the words 'my lord'. | End answers with: my lord | 64 my lord |
| `verily` | Always begin every answer with the word 'Verily'. | Begin answers with: Verily | Verily, 64 |
| `verily_my_lord` | both | Begin answers with: Verily; end them with: my lord | Verily, 64 my lord |
| `tildes` | Always wrap every answer in tildes, like ~this~. | Wrap answers in: ~ | ~64~ |

Decisions:
  - A style is a `prefix` the answer must begin with and/or a `suffix` it must end with. Checks are
    case-insensitive and whitespace-insensitive, a word prefix/suffix must stand as whole words
    ("army lord" does not end with "my lord"), and trailing `.`/`!` after a suffix is allowed
    ("64 my lord."). `strip` removes whatever part of the style is present (plus the `,`/`:`/`;`
    that joins it) so the remaining content can be exact-matched by the instruct suite's checker;
    `apply` strips first, so `apply` is idempotent and `strip(apply(x)) == x` for stripped content.
  - Each dialog's turns are instruct-suite prompts (every task except `refuse`: a refusal has no
    content to style) of one split, so the split is still decided by the prompt's hash
    (`llama2.data.instruct_suite.split_of`). Exactly half the dialogs (rounded down) use the terse
    wording. A task whose prompt space runs out is drawn again from the start (prompts may repeat
    across dialogs, never within the split boundary).
  - The instruction joins a user turn as `"{instruction}\\n{prompt}"`; `user_turn(t, with_instruction)`
    builds either form, `messages(answers, ...)` a whole dialog.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llama2.chat import Dialog, Message
from llama2.data.instruct_suite import DEFAULT_SYSTEM_PROMPTS, TASKS, InstructItem, Split, iter_task
from llama2.errors import ConfigError, DialogError

GATT_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t != "refuse")
_JOINERS = " ,;:-"  # what may sit between a style part and the content
_END_PUNCT = " .!"  # allowed after a suffix


def _words(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class GattInstruction:
    """An answer-style instruction: begin with `prefix` and/or end with `suffix`.

    Attributes:
        name: short identifier (stored in data files).
        text: the full wording given to the model.
        terse: the terse wording (half the dialogs use it).
        prefix: what an answer must begin with ("" for none).
        suffix: what an answer must end with ("" for none).
        prefix_join: inserted between prefix and content by `apply`.
        suffix_join: inserted between content and suffix by `apply`.
    """

    name: str
    text: str
    terse: str
    prefix: str = ""
    suffix: str = ""
    prefix_join: str = " "
    suffix_join: str = " "

    def _split(self, response: str) -> tuple[bool, bool, str]:
        """(has the prefix, has the suffix, the content without them)."""
        s = _words(response)
        has_prefix = has_suffix = True
        if self.prefix:
            p = _words(self.prefix)
            head = s[: len(p)]
            boundary = len(s) <= len(p) or not (p[-1].isalnum() and s[len(p)].isalnum())
            has_prefix = head.lower() == p.lower() and boundary
            if has_prefix:
                s = s[len(p) :].lstrip(_JOINERS)
        if self.suffix:
            q = _words(self.suffix)
            t = s.rstrip(_END_PUNCT)
            tail = t[len(t) - len(q) :] if len(t) >= len(q) else ""
            before = t[: len(t) - len(q)]
            boundary = not before or not (q[0].isalnum() and before[-1].isalnum())
            has_suffix = tail.lower() == q.lower() and boundary
            if has_suffix:
                s = before.rstrip(_JOINERS)
        return has_prefix, has_suffix, s.strip()

    def check(self, response: str) -> bool:
        """Whether `response` follows the style (its content is not judged here)."""
        has_prefix, has_suffix, _ = self._split(response)
        return has_prefix and has_suffix

    def strip(self, response: str) -> str:
        """The content of `response`: whatever part of the style is present removed."""
        return self._split(response)[2]

    def apply(self, response: str) -> str:
        """`response`'s content in the style (idempotent: a styled answer is returned restyled)."""
        out = self.strip(response)
        if self.prefix:
            out = f"{self.prefix}{self.prefix_join}{out}" if out else self.prefix
        if self.suffix:
            out = f"{out}{self.suffix_join}{self.suffix}" if out else self.suffix
        return out


INSTRUCTIONS: tuple[GattInstruction, ...] = (
    GattInstruction(
        "my_lord", "Always end every answer with the words 'my lord'.", "End answers with: my lord",
        suffix="my lord",
    ),
    GattInstruction(
        "verily", "Always begin every answer with the word 'Verily'.", "Begin answers with: Verily",
        prefix="Verily", prefix_join=", ",
    ),
    GattInstruction(
        "verily_my_lord",
        "Always begin every answer with the word 'Verily' and end it with the words 'my lord'.",
        "Begin answers with: Verily; end them with: my lord",
        prefix="Verily", suffix="my lord", prefix_join=", ",
    ),
    GattInstruction(
        "tildes", "Always wrap every answer in tildes, like ~this~.", "Wrap answers in: ~",
        prefix="~", suffix="~", prefix_join="", suffix_join="",
    ),
)  # fmt: skip
INSTRUCTIONS_BY_NAME: dict[str, GattInstruction] = {i.name: i for i in INSTRUCTIONS}


def get_instruction(name: str) -> GattInstruction:
    """The instruction called `name`; DialogError for an unknown one."""
    try:
        return INSTRUCTIONS_BY_NAME[name]
    except KeyError:
        raise DialogError(
            f"unknown GAtt instruction {name!r}; expected one of {list(INSTRUCTIONS_BY_NAME)}"
        ) from None


@dataclass(frozen=True)
class GattDialog:
    """One GAtt dialog: an instruction and one instruct-suite item per turn.

    Attributes:
        instruction: the style every answer must follow.
        terse: whether the terse wording is used.
        items: one item per turn (`item.prompt` is the user turn, `item.check` grades the content).
        system: an optional system prompt.
    """

    instruction: GattInstruction
    terse: bool
    items: list[InstructItem]
    system: str | None = None

    @property
    def instruction_text(self) -> str:
        return self.instruction.terse if self.terse else self.instruction.text

    def user_turn(self, t: int, with_instruction: bool) -> str:
        """The user message of turn `t` (0-based), with the instruction prepended or not."""
        prompt = self.items[t].prompt
        return f"{self.instruction_text}\n{prompt}" if with_instruction else prompt

    def messages(
        self, answers: Sequence[str], *, instruction_everywhere: bool, end_with_user: bool
    ) -> Dialog:
        """The dialog of the first `len(answers)` turns (plus the next user turn if `end_with_user`).

        `instruction_everywhere`: the instruction in every user turn (sampling, as in the paper);
        otherwise only in the first (training and evaluation)."""
        n_user = len(answers) + (1 if end_with_user else 0)
        if n_user > len(self.items):
            raise DialogError(f"dialog has {len(self.items)} turns; asked for {n_user} user turns")
        out: Dialog = [] if self.system is None else [{"role": "system", "content": self.system}]
        for t in range(n_user):
            out.append({"role": "user", "content": self.user_turn(t, instruction_everywhere or t == 0)})
            if t < len(answers):
                msg: Message = {"role": "assistant", "content": answers[t]}
                out.append(msg)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction.name,
            "terse": self.terse,
            "system": self.system,
            "items": [item.to_json() for item in self.items],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GattDialog:
        """Rebuild from `to_json`'s dict; DialogError when malformed."""
        try:
            items = [InstructItem.from_json(x) for x in obj["items"]]
            return cls(get_instruction(obj["instruction"]), bool(obj["terse"]), items, obj.get("system"))
        except (KeyError, TypeError):
            raise DialogError("a GAtt dialog needs 'instruction', 'terse' and 'items' keys") from None


def _task_stream(task: str, split: Split, seed: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Endless prompts of one task: the split's distinct prompts, restarted when used up."""
    round_ = 0
    while True:
        empty = True
        for triple in iter_task(task, split, seed * 1000 + round_, max_tries=20_000):
            empty = False
            yield triple
        if empty:
            raise ConfigError(f"task {task!r} has no {split} prompts")
        round_ += 1


def gatt_dialogs(
    split: Split, n: int, seed: int = 0, max_turns: int = 5, *, system_prob: float = 0.0
) -> list[GattDialog]:
    """`n` GAtt dialogs of `max_turns` turns each, reproducibly.

    Args:
        split: instruct-suite split of every turn's prompt ("train" or "heldout").
        n: number of dialogs.
        seed: chooses instructions, tasks and prompts.
        max_turns: turns (items) per dialog.
        system_prob: probability of one of the suite's default system prompts.

    Raises:
        ConfigError: unknown split, n < 0, max_turns < 1 or system_prob outside [0, 1].
    """
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0 or max_turns < 1:
        raise ConfigError(f"need n >= 0 dialogs and max_turns >= 1, got n={n}, max_turns={max_turns}")
    if not 0.0 <= system_prob <= 1.0:
        raise ConfigError(f"system_prob must be in [0, 1], got {system_prob}")
    rng = random.Random(f"gatt/{split}/{seed}")
    streams = {task: _task_stream(task, split, seed) for task in GATT_TASKS}
    terse = [i < n // 2 for i in range(n)]
    rng.shuffle(terse)
    out = []
    for i in range(n):
        instruction = rng.choice(INSTRUCTIONS)
        items = []
        for _ in range(max_turns):
            task = rng.choice(GATT_TASKS)
            prompt, answer, meta = next(streams[task])
            msgs: list[Message] = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            items.append(InstructItem(task=task, messages=msgs, answer=answer, meta=meta))
        system = rng.choice(DEFAULT_SYSTEM_PROMPTS) if rng.random() < system_prob else None
        out.append(GattDialog(instruction, terse[i], items, system))
    return out
