"""Ghost Attention evaluation (Llama 2 paper sec. 3.3, Fig. 9-10): does an instruction given in the
first user turn still hold at turn 2, 3, ... of a dialog?

Held-out GAtt dialogs (`llama2.data.gatt.gatt_dialogs("heldout", ...)`) are played turn by turn: the
instruction is only in the FIRST user turn, later user turns are plain, and the history holds the
model's own earlier answers (greedy, as `llama2.eval.exact_match`). Per turn the report gives the
adherence rate (`instruction.check`) and the exact match of the content with the style removed
(`item.check(instruction.strip(response))`); `turns_3_5` is the adherence over turns 3-5, the part
of a dialog where a model without GAtt forgets the instruction. Rates are also split by instruction
and by wording (full or terse).

Context: a prompt longer than the model's context minus `max_new_tokens` is cut by
`llama2.chat.encode_dialog_with_info` (oldest pairs dropped). Dropping the first pair drops the
instruction itself, so such turns are counted per turn (`cut`) and reported, not hidden.

The core (`evaluate_gatt`) takes a responder `respond(dialogs) -> list[str]`, so the scoring is
tested without a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.chat import Dialog, encode_dialog, encode_dialog_with_info
from llama2.data.gatt import GattDialog, gatt_dialogs
from llama2.errors import ConfigError
from llama2.generation import Generator, SamplingParams
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

Respond = Callable[[Sequence[Dialog]], list[str]]
CountDropped = Callable[[Dialog], int]  # messages a prompt loses to the context budget


@dataclass
class GattScore:
    """Counts of one group of responses (a turn, an instruction or a wording)."""

    n: int = 0
    adhered: int = 0
    correct: int = 0
    cut: int = 0  # prompts that lost their oldest turns (and the instruction) to the context

    @property
    def adherence(self) -> float:
        return 0.0 if self.n == 0 else self.adhered / self.n

    @property
    def exact_match(self) -> float:
        return 0.0 if self.n == 0 else self.correct / self.n

    def add(self, adhered: bool, correct: bool, cut: bool) -> None:
        self.n += 1
        self.adhered += int(adhered)
        self.correct += int(correct)
        self.cut += int(cut)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "adhered": self.adhered,
            "adherence": self.adherence,
            "correct": self.correct,
            "exact_match": self.exact_match,
            "cut": self.cut,
        }


@dataclass
class GattReport:
    """Adherence and content exact match per turn (1-based), per instruction and per wording."""

    per_turn: list[GattScore]
    per_instruction: dict[str, GattScore] = field(default_factory=dict)
    per_wording: dict[str, GattScore] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def overall(self) -> GattScore:
        out = GattScore()
        for s in self.per_turn:
            out.n, out.adhered, out.correct, out.cut = (
                out.n + s.n, out.adhered + s.adhered, out.correct + s.correct, out.cut + s.cut,
            )  # fmt: skip
        return out

    @property
    def turns_3_5(self) -> float | None:
        """Adherence over turns 3, 4 and 5 (those present); None for dialogs shorter than 3 turns."""
        group = self.per_turn[2:5]
        n = sum(s.n for s in group)
        return None if n == 0 else sum(s.adhered for s in group) / n

    @property
    def cut_turns(self) -> int:
        return sum(s.cut for s in self.per_turn)

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_json(),
            "turns_3_5_adherence": self.turns_3_5,
            "cut_turns": self.cut_turns,
            "per_turn": [{"turn": t + 1, **s.to_json()} for t, s in enumerate(self.per_turn)],
            "per_instruction": {k: s.to_json() for k, s in self.per_instruction.items()},
            "per_wording": {k: s.to_json() for k, s in self.per_wording.items()},
            "samples": self.samples,
        }

    def format_table(self) -> str:
        """One row per turn, per instruction and per wording, and an overall row."""
        rows = [(f"turn {t + 1}", s) for t, s in enumerate(self.per_turn)]
        rows += [(f"instruction {k}", s) for k, s in self.per_instruction.items()]
        rows += [(f"wording {k}", s) for k, s in self.per_wording.items()]
        rows.append(("overall", self.overall))
        width = max(len(name) for name, _ in rows)
        head = f"{'group':<{width}}  {'n':>5}  {'adherence':>9}  {'exact match':>11}  {'cut':>4}"
        lines = [head, "-" * len(head)]
        for name, s in rows:
            lines.append(
                f"{name:<{width}}  {s.n:>5}  {s.adherence:>9.1%}  {s.exact_match:>11.1%}  {s.cut:>4}"
            )
        t35 = "n/a" if self.turns_3_5 is None else f"{self.turns_3_5:.1%}"
        lines.append(f"adherence over turns 3-5: {t35}")
        return "\n".join(lines)


def evaluate_gatt(
    dialogs: Sequence[GattDialog],
    respond: Respond,
    *,
    count_dropped: CountDropped | None = None,
    samples: int = 3,
) -> GattReport:
    """Play every dialog turn by turn with `respond` and score each response.

    Args:
        dialogs: GAtt dialogs, all with the same number of turns.
        respond: answers a batch of prompt dialogs (each ends with a user turn).
        count_dropped: messages a prompt loses to the context budget (None: nothing is cut).
        samples: dialogs whose transcripts are kept in the report.

    Raises:
        ConfigError: no dialogs, dialogs of different lengths, or a responder returning a different
            number of responses.
    """
    if not dialogs:
        raise ConfigError("no GAtt dialogs to evaluate; expected at least one")
    n_turns = len(dialogs[0].items)
    if any(len(d.items) != n_turns for d in dialogs):
        raise ConfigError("GAtt dialogs must all have the same number of turns")
    report = GattReport(per_turn=[GattScore() for _ in range(n_turns)])
    answers: list[list[str]] = [[] for _ in dialogs]
    for t in range(n_turns):
        prompts = [
            d.messages(a, instruction_everywhere=False, end_with_user=True)
            for d, a in zip(dialogs, answers, strict=True)
        ]
        responses = respond(prompts)
        if len(responses) != len(prompts):
            raise ConfigError(f"the responder returned {len(responses)} responses for {len(prompts)} dialogs")
        for d, a, prompt, response in zip(dialogs, answers, prompts, responses, strict=True):
            inst = d.instruction
            adhered = inst.check(response)
            correct = d.items[t].check(inst.strip(response))
            cut = count_dropped is not None and count_dropped(prompt) > 0
            report.per_turn[t].add(adhered, correct, cut)
            report.per_instruction.setdefault(inst.name, GattScore()).add(adhered, correct, cut)
            report.per_wording.setdefault("terse" if d.terse else "full", GattScore()).add(
                adhered, correct, cut
            )
            a.append(response.strip())
    for d, a in list(zip(dialogs, answers, strict=True))[:samples]:
        report.samples.append(
            {
                "instruction": d.instruction.name,
                "terse": d.terse,
                "turns": [
                    {"user": d.user_turn(t, t == 0), "response": r, "adhered": d.instruction.check(r)}
                    for t, r in enumerate(a)
                ],
            }
        )
    return report


def greedy_responder(
    model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 32, batch_size: int = 32
) -> tuple[Respond, CountDropped]:
    """A greedy chat responder and the matching count of messages its prompts lose to the context."""
    gen = Generator(model, tokenizer)
    greedy = SamplingParams(temperature=0.0)
    budget = gen.max_seq_len - max_new_tokens
    if budget < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {gen.max_seq_len}")

    def respond(dialogs: Sequence[Dialog]) -> list[str]:
        prompts = [encode_dialog(d, tokenizer, max_tokens=budget) for d in dialogs]
        out: list[str] = []
        try:
            with torch.no_grad():
                for i in range(0, len(prompts), batch_size):
                    out += [r.text for r in gen.generate(prompts[i : i + batch_size], max_new_tokens, greedy)]
        finally:
            model.clear_caches()
        return out

    def count_dropped(dialog: Dialog) -> int:
        return encode_dialog_with_info(dialog, tokenizer, max_tokens=budget).dropped_turns

    return respond, count_dropped


def gatt_adherence(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    n_dialogs: int = 40,
    seed: int = 1,
    max_turns: int = 5,
    max_new_tokens: int = 32,
    split: str = "heldout",
    batch_size: int = 32,
) -> GattReport:
    """Greedy GAtt adherence of `model` on `n_dialogs` dialogs of `split` (see the module docstring)."""
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}")
    dialogs = gatt_dialogs(split, n_dialogs, seed, max_turns)  # type: ignore[arg-type]
    respond, count_dropped = greedy_responder(model, tokenizer, max_new_tokens, batch_size)
    return evaluate_gatt(dialogs, respond, count_dropped=count_dropped)


@dataclass
class GattEvalConfig:
    """`llama2 eval gatt`: adherence of a chat model to a first-turn instruction at every turn."""

    model: str = field(default="chat", metadata={"help": "chat model: checkpoint path or embedded name"})
    tokenizer: Path | None = None  # default: the checkpoint's
    n_dialogs: int = 40  # held-out GAtt dialogs
    seed: int = 1  # which dialogs are drawn
    max_turns: int = 5  # turns per dialog
    max_new_tokens: int = 32
    split: str = "heldout"
    batch_size: int = 32
    device: str = "cpu"
    out_json: Path | None = None  # write the report here as JSON

    ALIASES: ClassVar[dict[str, str]] = {"checkpoint": "model"}


def run_gatt_eval(cfg: GattEvalConfig) -> GattReport:
    """Load the model, play the GAtt dialogs greedily, print the table and write the JSON report."""
    from llama2.checkpoint.load import load_model
    from llama2.checkpoint.tokenizer_path import require_tokenizer
    from llama2.outpath import check_output_path, write_error

    if cfg.out_json is not None:  # before the model is loaded
        check_output_path(cfg.out_json, folder=False, what="out_json")
    if cfg.n_dialogs < 1 or cfg.max_turns < 1:
        raise ConfigError(f"n_dialogs and max_turns must be >= 1, got {cfg.n_dialogs}, {cfg.max_turns}")
    loaded = load_model(cfg.model, device=cfg.device, dtype=torch.float32, progress=False)
    tok_path = require_tokenizer(loaded.tokenizer_path, cfg.tokenizer, cfg.model, "pass --tokenizer PATH")
    report = gatt_adherence(
        loaded.model, Tokenizer.from_file(tok_path), n_dialogs=cfg.n_dialogs, seed=cfg.seed,
        max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, split=cfg.split,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    print(report.format_table())
    if cfg.out_json is not None:
        out = Path(cfg.out_json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as e:
            raise write_error("out_json", out, e) from None
    return report
