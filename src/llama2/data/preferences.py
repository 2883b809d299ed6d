"""Preference pairs for reward modelling (Llama 2 paper sec. 3.2.1-3.2.2), labelled by program.

The paper's annotators compare two sampled responses to one prompt and rate how much better the
chosen one is on a four-point scale (`RATINGS`), and, for safety, put the pair in one of three bins
(`SAFETY_BINS`). Here the instruction suite's checker plays the annotator:

  - `grade` sorts a response to an `InstructItem` into "refusal" > "correct" > "near_miss" > "wrong"
    > "garbage" (a refusal is checked first: on a benign task it is a false refusal; for the
    suite's `refuse` task a refusal is the correct answer and anything else is "wrong").
  - `pairs_from_samples` turns K samples of one prompt into pairs: correct vs garbage or refusal
    -> significantly_better; vs wrong -> better; vs near_miss -> slightly_better; two distinct
    correct surface forms ("64" / "64.") or two responses of the same non-correct grade ->
    negligibly_better, chosen and rejected ordered by a seeded coin. When no sample is correct the
    item's reference answer is the chosen response: the paper's "annotator writes the answer" case.
  - `safety_pairs_from_samples`: for a harmful prompt, a refusal (sampled, else the suite's
    `REFUSAL`) over a sampled compliance -> bin chosen_safe_rejected_unsafe, significantly_better
    (no compliance sampled: no pair). For a benign prompt, the helpful answer (sampled, else the
    reference) over a false refusal (sampled, else `REFUSAL`) -> both_safe, significantly_better:
    it teaches the safety model not to reward over-refusal and is also helpfulness data. A pair that
    would prefer an unsafe response to a safe one is never emitted (`is_safe_order`).
  - `mix_pairs` builds the two reward models' training mixes (paper sec. 3.2.2): helpfulness = all
    helpfulness pairs plus as many safety pairs, sampled uniformly; safety = all safety pairs plus
    helpfulness pairs making 10% of the mix (90/10).
  - `reward_tokens` is how a reward model reads (prompt, response): the chat training encoding of
    the dialog plus the response, closed by EOS; the score is read at the last token (the EOS).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2.chat import Message, encode_dialog_for_training
from llama2.data.instruct_suite import REFUSAL, InstructItem, normalize_response
from llama2.data.jsonl import read_records, write_records
from llama2.data.safety_suite import SafetyPrompt, is_refusal
from llama2.errors import ConfigError, DialogError
from llama2.tokenizer import Tokenizer

RATINGS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")
SAFETY_BINS: tuple[str, ...] = ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")
KINDS: tuple[str, ...] = ("helpfulness", "safety")
GRADES: tuple[str, ...] = ("refusal", "correct", "near_miss", "wrong", "garbage")

NUMERIC_TASKS = frozenset({"add", "sub", "mul", "count_letter", "count_vowels"})
# Rating of "correct" over each lower grade.
_RATING_OVER = {
    "garbage": "significantly_better",
    "refusal": "significantly_better",
    "wrong": "better",
    "near_miss": "slightly_better",
}


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison.

    Attributes:
        dialog: the prompt (earlier turns included), ending with the user turn.
        chosen: the better response. rejected: the worse one.
        rating: how much better (one of `RATINGS`).
        safety_bin: one of `SAFETY_BINS`.
        kind: "helpfulness" or "safety" (which annotation stream it belongs to).
        task: the instruction-suite task, "harmful" or "benign_alarming".
    """

    dialog: list[Message]
    chosen: str
    rejected: str
    rating: str
    safety_bin: str
    kind: str
    task: str

    @property
    def unsafe_sides(self) -> tuple[bool, bool]:
        """(chosen is unsafe, rejected is unsafe), read off `safety_bin`: the rejected side of a
        "chosen_safe_rejected_unsafe" pair and both sides of a "both_unsafe" pair are unsafe."""
        return self.safety_bin == "both_unsafe", self.safety_bin != "both_safe"

    def to_json(self) -> dict[str, Any]:
        return {
            "dialog": self.dialog, "chosen": self.chosen, "rejected": self.rejected, "rating": self.rating,
            "safety_bin": self.safety_bin, "kind": self.kind, "task": self.task,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PreferencePair:
        """Rebuild a pair from `to_json`'s dict; raises `DialogError` if malformed."""
        keys = ("dialog", "chosen", "rejected", "rating", "safety_bin", "kind", "task")
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise DialogError(f"a preference pair needs the keys {', '.join(keys)}")
        for name, allowed in (("rating", RATINGS), ("safety_bin", SAFETY_BINS), ("kind", KINDS)):
            if obj[name] not in allowed:
                raise DialogError(f"unknown {name} {obj[name]!r}; expected one of {', '.join(allowed)}")
        dialog = obj["dialog"]
        if not isinstance(dialog, list) or not dialog or not isinstance(dialog[-1], dict):
            raise DialogError("a preference pair's dialog must be a non-empty list of messages")
        if dialog[-1].get("role") != "user":
            raise DialogError(
                f"a preference pair's dialog must end with a user turn, got {dialog[-1].get('role')}"
            )
        if not isinstance(obj["chosen"], str) or not isinstance(obj["rejected"], str):
            raise DialogError("a preference pair's 'chosen' and 'rejected' must be strings")
        try:
            msgs: list[Message] = [{"role": m["role"], "content": str(m["content"])} for m in dialog]
        except (KeyError, TypeError):
            raise DialogError("every message needs 'role' and 'content'") from None
        return cls(
            msgs,
            obj["chosen"],
            obj["rejected"],
            obj["rating"],
            obj["safety_bin"],
            obj["kind"],
            str(obj["task"]),
        )


def reward_tokens(tokenizer: Tokenizer, dialog: Sequence[Message], response: str) -> list[int]:
    """Tokens a reward model scores: the dialog plus `response` as the last assistant turn, in the
    chat training format (`<s>[INST] ... [/INST] {response} </s>`); read the score at the last
    index (the EOS). Special tags inside contents are neutralised (a sampled response may contain
    them)."""
    full: list[Message] = [*dialog, {"role": "assistant", "content": response}]
    return encode_dialog_for_training(full, tokenizer, sanitize=True)[0]


# ------------------------------------------------------------------------------------------ grading
_WORD = re.compile(r"[A-Za-z]+")


def _off_by_one(got: str, want: str) -> bool:
    """Digits-only `got` within +-1 of `want`, or the same length with exactly one digit different."""
    if abs(int(got) - int(want)) <= 1:
        return True
    return len(got) == len(want) and sum(a != b for a, b in zip(got, want, strict=True)) == 1


def _grade_words(item: InstructItem, got: list[str], want: list[str]) -> str:
    if sorted(got) == sorted(want):  # same multiset, wrong order
        return "near_miss"
    if len(got) == len(want) and sum(a != b for a, b in zip(got, want, strict=True)) == 1:
        return "near_miss"  # all but one word right
    if item.task == "uppercase" and [w.upper() for w in got] == want:
        return "near_miss"  # right letters, wrong case
    if item.task == "repeat" and got and set(got) == set(want):
        return "near_miss"  # right word, wrong count
    prompt_words = {w.lower() for w in _WORD.findall(item.prompt)}
    if got and all(w.lower() in prompt_words for w in got):
        return "wrong"
    return "garbage"


def grade(item: InstructItem, response: str) -> str:
    """How good `response` is as an answer to `item`: "refusal", "correct", "near_miss", "wrong" or
    "garbage" (see the module docstring). Digits-only answers near the right number, and word
    answers with the right words misplaced (or one wrong), are near misses; a number (numeric tasks)
    or words taken from the prompt (word tasks) are merely wrong; anything else is garbage."""
    if item.task == "refuse":
        return "correct" if is_refusal(response) else "wrong"
    if is_refusal(response):
        return "refusal"
    if item.check(response):
        return "correct"
    got = normalize_response(response)
    want = normalize_response(item.answer)
    if item.task in NUMERIC_TASKS:
        if not got.isdigit() or not got.isascii():
            return "garbage"
        return "near_miss" if _off_by_one(got, want) else "wrong"
    words = got.split()
    if not words or not all(_WORD.fullmatch(w) for w in words):
        return "garbage"
    return _grade_words(item, words, want.split())


# ------------------------------------------------------------------------------------------- pairs
def _dedupe(responses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(responses))


def _coin(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    return (a, b) if rng.random() < 0.5 else (b, a)


def _round_robin(groups: Sequence[list[PreferencePair]], max_pairs: int) -> list[PreferencePair]:
    """Take one pair from each rating group in turn (strongest first) until `max_pairs`."""
    out: list[PreferencePair] = []
    depth = 0
    while len(out) < max_pairs and any(depth < len(g) for g in groups):
        out += [g[depth] for g in groups if depth < len(g)]
        depth += 1
    return out[:max_pairs]


def pairs_from_samples(
    item: InstructItem, responses: Sequence[str], rng: random.Random, max_pairs: int = 4
) -> list[PreferencePair]:
    """Helpfulness pairs from sampled responses to one instruction-suite prompt (see the module
    docstring); at most `max_pairs`, one of each rating first. `refuse` items give safety pairs
    (`safety_pairs_from_samples` on the harmful prompt)."""
    if max_pairs < 1:
        raise ConfigError(f"max_pairs must be >= 1, got {max_pairs}")
    dialog = item.prompt_dialog
    if item.task == "refuse":
        return safety_pairs_from_samples(
            SafetyPrompt(dialog, True, None, "refuse"), responses, rng, max_pairs
        )
    by_grade: dict[str, list[str]] = {g: [] for g in GRADES}
    for r in _dedupe(responses):
        by_grade[grade(item, r)].append(r)
    correct = by_grade["correct"] or [item.answer]  # none sampled: the annotator writes the answer

    def pair(chosen: str, rejected: str, rating: str) -> PreferencePair:
        return PreferencePair(dialog, chosen, rejected, rating, "both_safe", "helpfulness", item.task)

    groups: dict[str, list[PreferencePair]] = {r: [] for r in RATINGS}
    k = 0
    for low in ("garbage", "refusal", "wrong", "near_miss"):
        for rejected in by_grade[low]:
            groups[_RATING_OVER[low]].append(pair(correct[k % len(correct)], rejected, _RATING_OVER[low]))
            k += 1
    same = [correct[:2] if len(correct) >= 2 else [*correct, item.answer]]
    same += [by_grade[g][:2] for g in ("near_miss", "wrong", "garbage", "refusal")]
    for two in same:
        if len(two) == 2 and two[0] != two[1]:
            groups["negligibly_better"].append(pair(*_coin(rng, two[0], two[1]), "negligibly_better"))
    for g in groups.values():
        rng.shuffle(g)
    return _round_robin([groups[r] for r in RATINGS], max_pairs)


def is_safe_order(pair: PreferencePair, harmful: bool) -> bool:
    """False when `pair` prefers an unsafe response to a safe one: on a harmful prompt a refusal is
    the safe response, so the chosen must refuse whenever the rejected does."""
    if not harmful:
        return True
    return is_refusal(pair.chosen) or not is_refusal(pair.rejected)


def safety_pairs_from_samples(
    prompt: SafetyPrompt, responses: Sequence[str], rng: random.Random, max_pairs: int = 2
) -> list[PreferencePair]:
    """Safety pairs from sampled responses to one safety prompt (see the module docstring)."""
    if max_pairs < 1:
        raise ConfigError(f"max_pairs must be >= 1, got {max_pairs}")
    distinct = [r for r in _dedupe(responses) if r.strip()]
    refusals = [r for r in distinct if is_refusal(r)]
    if prompt.harmful:
        chosen_pool, rejected_pool = refusals or [REFUSAL], [r for r in distinct if not is_refusal(r)]
        rating, safety_bin = "significantly_better", "chosen_safe_rejected_unsafe"
    else:
        helpful = [r for r in distinct if prompt.check(r)]
        if not helpful and prompt.answer is None:
            return []
        chosen_pool, rejected_pool = helpful or [str(prompt.answer)], refusals or [REFUSAL]
        rating, safety_bin = "significantly_better", "both_safe"
    rng.shuffle(rejected_pool)
    pairs = []
    for k, rejected in enumerate(rejected_pool[:max_pairs]):
        chosen = chosen_pool[k % len(chosen_pool)]
        pairs.append(
            PreferencePair(list(prompt.dialog), chosen, rejected, rating, safety_bin, "safety", prompt.task)
        )
    return [p for p in pairs if is_safe_order(p, prompt.harmful) and p.chosen != p.rejected]


def mix_pairs(
    helpful: Sequence[PreferencePair], safety: Sequence[PreferencePair], objective: str, seed: int
) -> list[PreferencePair]:
    """A reward model's training mix (paper sec. 3.2.2), shuffled by `seed`.

    "helpfulness": every helpfulness pair plus an equal number of safety pairs (all of them if
    fewer), drawn uniformly. "safety": every safety pair plus helpfulness pairs making 10% of the
    mix (90/10), drawn uniformly.

    Raises:
        ConfigError: unknown objective.
    """
    rng = random.Random(f"mix/{objective}/{seed}")
    if objective == "helpfulness":
        out = [*helpful, *rng.sample(list(safety), min(len(safety), len(helpful)))]
    elif objective == "safety":
        n_help = min(len(helpful), round(len(safety) / 9))
        out = [*safety, *rng.sample(list(helpful), n_help)]
    else:
        raise ConfigError(f"unknown reward objective {objective!r}; expected 'helpfulness' or 'safety'")
    rng.shuffle(out)
    return out


# -------------------------------------------------------------------------------------------- JSONL
def write_pairs(pairs: Sequence[PreferencePair], path: Path | str) -> Path:
    """Write pairs as JSONL (one `to_json` dict per line); returns the path."""
    return write_records((p.to_json() for p in pairs), path)


def read_pairs(path: Path | str) -> list[PreferencePair]:
    """Read pairs written by `write_pairs`; raises `DialogError` naming the bad line."""
    return read_records(path, PreferencePair.from_json)
