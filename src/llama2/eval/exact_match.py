"""Exact-match evaluation on task suites with checkable answers (`llama2.data.instruct_suite`).

Each item's prompt dialog (its messages without the reference answer) is encoded in the Llama 2-Chat
format (`llama2.chat.encode_dialog`), the model answers greedily (`llama2.generation.Generator`,
temperature 0, until EOS), and the item's checker (`InstructItem.check`) scores the response. Scores
are reported per task and overall, as a table and as JSON.

The responder is a plain function `items -> responses`, so the scoring can be checked with an oracle
(`oracle_responder`) independently of any model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.chat import encode_dialog
from llama2.data.instruct_suite import TASKS, InstructItem, generate_items, read_jsonl
from llama2.errors import ConfigError
from llama2.generation import Generator, SamplingParams
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

Responder = Callable[[Sequence[InstructItem]], list[str]]


@dataclass
class ExactMatchConfig:
    """`llama2 eval exact-match`: score a chat model on the instruction suite."""

    model: str = field(
        default="chat",
        metadata={"help": "chat model: checkpoint path (any format) or embedded name (base, chat, code)"},
    )
    tokenizer: Path | None = None  # default: the checkpoint's (see llama2.checkpoint.tokenizer_path)
    data: Path | None = None  # JSONL of instruction items; None: generate `split` with the suite
    split: str = "heldout"  # suite split to generate: heldout | train
    n_per_task: int = 20  # items per task when generating
    seed: int = 1  # which prompts the suite draws (the split does not depend on it)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    max_new_tokens: int = 32  # answers in the suite are short
    batch_size: int = 32  # prompts generated together
    device: str = "cpu"
    quantize: str | None = None  # quantize while loading: int8 | int4 | nf4 | q8_0 | q4_0 | q4_k[,options]
    dtype: str = "float32"  # weights for evaluation: float32 | bfloat16 | float16 | auto (as stored)
    out_json: Path | None = None  # write the report here as JSON
    samples: int = 3  # sample responses kept per task in the report

    # `--checkpoint` (and a `checkpoint` key) of earlier versions; every command names it `--model`.
    ALIASES: ClassVar[dict[str, str]] = {"checkpoint": "model"}


@dataclass
class TaskScore:
    """Exact-match count of one task."""

    task: str
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return 0.0 if self.n == 0 else self.correct / self.n


@dataclass
class ExactMatchReport:
    """Per-task and overall exact match, plus a few sample responses per task."""

    per_task: dict[str, TaskScore]
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(s.n for s in self.per_task.values())

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.per_task.values())

    @property
    def accuracy(self) -> float:
        return 0.0 if self.n == 0 else self.correct / self.n

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": {"n": self.n, "correct": self.correct, "accuracy": self.accuracy},
            "per_task": {
                t: {"n": s.n, "correct": s.correct, "accuracy": s.accuracy} for t, s in self.per_task.items()
            },
            "samples": self.samples,
        }

    def format_table(self) -> str:
        """A plain-text table: one row per task and an overall row."""
        width = max([len("overall"), *(len(t) for t in self.per_task)])
        lines = [f"{'task':<{width}}  {'n':>5}  {'correct':>7}  {'exact match':>11}"]
        lines.append("-" * len(lines[0]))
        for t, s in self.per_task.items():
            lines.append(f"{t:<{width}}  {s.n:>5}  {s.correct:>7}  {s.accuracy:>10.1%}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'overall':<{width}}  {self.n:>5}  {self.correct:>7}  {self.accuracy:>10.1%}")
        return "\n".join(lines)


def evaluate_exact_match(
    items: Sequence[InstructItem], respond: Responder, samples_per_task: int = 3
) -> ExactMatchReport:
    """Score `respond(items)` with each item's checker.

    Raises:
        ConfigError: no items, or the responder returned a different number of responses.
    """
    if not items:
        raise ConfigError("no items to evaluate; expected at least one instruction item")
    responses = respond(items)
    if len(responses) != len(items):
        raise ConfigError(f"the responder returned {len(responses)} responses for {len(items)} items")
    per_task: dict[str, TaskScore] = {}
    samples: list[dict[str, Any]] = []
    kept: dict[str, int] = {}
    for item, response in zip(items, responses, strict=True):
        score = per_task.setdefault(item.task, TaskScore(item.task))
        ok = item.check(response)
        score.n += 1
        score.correct += int(ok)
        if kept.get(item.task, 0) < samples_per_task:
            kept[item.task] = kept.get(item.task, 0) + 1
            samples.append(
                {
                    "task": item.task,
                    "prompt": item.prompt,
                    "answer": item.answer,
                    "response": response,
                    "correct": ok,
                }
            )
    return ExactMatchReport(per_task=per_task, samples=samples)


def oracle_responder(items: Sequence[InstructItem]) -> list[str]:
    """Answers every item with its reference answer (scores 100% by construction of the checkers)."""
    return [item.answer for item in items]


def model_responder(
    model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 32, batch_size: int = 32
) -> Responder:
    """A responder that answers greedily with `model` in the Llama 2-Chat format."""
    gen = Generator(model, tokenizer)
    greedy = SamplingParams(temperature=0.0)

    def respond(items: Sequence[InstructItem]) -> list[str]:
        budget = gen.max_seq_len - max_new_tokens
        prompts = [encode_dialog(item.prompt_dialog, tokenizer, max_tokens=budget) for item in items]
        out: list[str] = []
        try:
            with torch.no_grad():
                for i in range(0, len(prompts), batch_size):
                    results = gen.generate(prompts[i : i + batch_size], max_new_tokens, greedy)
                    out += [r.text for r in results]
        finally:
            model.clear_caches()  # leave the model as found (a plain causal forward)
        return out

    return respond


def load_items(cfg: ExactMatchConfig) -> list[InstructItem]:
    """The items `cfg` asks for: read from `cfg.data`, or generated from the suite."""
    if cfg.data is not None:
        items = read_jsonl(cfg.data)
        return [i for i in items if i.task in cfg.tasks]
    if cfg.split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {cfg.split!r}")
    return generate_items(cfg.split, cfg.n_per_task, cfg.seed, tasks=cfg.tasks)  # type: ignore[arg-type]


def run_exact_match(cfg: ExactMatchConfig) -> ExactMatchReport:
    """Load the model, answer the suite greedily, print the table and write the JSON report.

    Returns:
        The report.
    """
    from llama2.checkpoint.load import load_model
    from llama2.checkpoint.tokenizer_path import require_tokenizer
    from llama2.outpath import check_output_path, write_error

    if cfg.out_json is not None:  # before the model is loaded and the suite run
        check_output_path(cfg.out_json, folder=False, what="out_json")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
    if cfg.dtype not in dtypes:
        raise ConfigError(f"dtype must be one of {', '.join(dtypes)}, got {cfg.dtype!r}")
    loaded = load_model(
        cfg.model, device=cfg.device, dtype=dtypes[cfg.dtype], progress=False, quantize=cfg.quantize
    )
    tok_path = require_tokenizer(loaded.tokenizer_path, cfg.tokenizer, cfg.model, "pass --tokenizer PATH")
    tokenizer = Tokenizer.from_file(tok_path)
    items = load_items(cfg)
    report = evaluate_exact_match(
        items, model_responder(loaded.model, tokenizer, cfg.max_new_tokens, cfg.batch_size), cfg.samples
    )
    print(report.format_table())
    if cfg.out_json is not None:
        out = Path(cfg.out_json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise write_error("out_json", out, e) from None
    return report
