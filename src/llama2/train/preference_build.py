"""Build preference data by sampling the chat model and labelling pairs with the suite's checkers
(Llama 2 paper sec. 3.2.1: annotators compare two sampled responses, different temperatures and
model variants giving diversity; here the checkers are the annotators).

`run_preference_build(PreferenceBuildConfig(...))`:

1. loads the model (default the embedded "chat") and its tokenizer;
2. for the train split and the held-out split: draws instruction-suite prompts (`n_per_task` /
   `heldout_n_per_task` per task, every task but `refuse`), harmful prompts and benign prompts with
   alarming words (`llama2.data.safety_suite`);
3. samples `samples_per_temperature` responses per prompt at each of `temperatures`
   (`llama2.train.rollout.sample_responses`; seed `1000 * seed + 100 * split + k` at the k-th
   temperature, split 0 = train, 1 = held-out);
4. labels pairs (`llama2.data.preferences`): helpfulness pairs from instruction prompts, and from
   the benign prompts built on suite tasks; safety pairs from harmful and benign prompts;
5. writes `helpful_train.jsonl`, `safety_train.jsonl`, `helpful_heldout.jsonl`,
   `safety_heldout.jsonl` (the held-out files are the reward models' evaluation sets), the two
   reward-model training mixes `rm_helpfulness_train.jsonl` and `rm_safety_train.jsonl`
   (`mix_pairs`), and `summary.json` (pair counts per rating, bin, task and kind for every file;
   response grades and refusal rates; wall time; the config).

An out_dir that already holds these files is refused unless `overwrite`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.chat import Message
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import model_tokenizer
from llama2.data.instruct_suite import TASKS, InstructItem, Split, generate_items
from llama2.data.preferences import (
    PreferencePair,
    grade,
    mix_pairs,
    pairs_from_samples,
    safety_pairs_from_samples,
    write_pairs,
)
from llama2.data.safety_suite import SafetyPrompt, benign_alarming_prompts, harmful_prompts, is_refusal
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir
from llama2.train.pretrain import write_json
from llama2.train.rollout import sample_responses
from llama2.train.run_config import config_to_dict, flat_aliases

PAIR_FILES = ("helpful_train", "safety_train", "helpful_heldout", "safety_heldout")
MIX_FILES = ("rm_helpfulness_train", "rm_safety_train")
OUTPUT_FILES = (*(f"{n}.jsonl" for n in PAIR_FILES + MIX_FILES), "summary.json")
HELPFUL_TASKS = tuple(t for t in TASKS if t != "refuse")  # refusals come from the safety prompts


@flat_aliases
@dataclass
class PreferenceBuildConfig:
    """`llama2 train preferences`: sample the chat model, label pairs, write the preference files."""

    model: Path = field(default=Path("chat"), metadata={"help": "policy to sample (folder or embedded name)"})
    out_dir: Path = field(default=Path("runs/preferences"), metadata={"help": "where the files go"})
    tokenizer: Path | None = field(default=None, metadata={"help": "default: the model's tokenizer.model"})
    n_per_task: int = field(default=40, metadata={"help": "instruction prompts per task (train split)"})
    n_harmful: int = field(default=120, metadata={"help": "harmful prompts (train split)"})
    n_benign: int = field(default=120, metadata={"help": "benign prompts with alarming words (train split)"})
    heldout_n_per_task: int = field(default=10, metadata={"help": "held-out instruction prompts per task"})
    heldout_n_harmful: int = field(default=30, metadata={"help": "held-out harmful prompts"})
    heldout_n_benign: int = field(default=30, metadata={"help": "held-out benign prompts"})
    temperatures: list[float] = field(
        default_factory=lambda: [0.7, 1.0, 1.3], metadata={"help": "sampling temperatures (diversity)"}
    )
    samples_per_temperature: int = field(default=2, metadata={"help": "samples per prompt and temperature"})
    max_new_tokens: int = 24
    top_p: float = 1.0
    max_pairs: int = field(default=4, metadata={"help": "most helpfulness pairs per prompt"})
    max_safety_pairs: int = field(default=2, metadata={"help": "most safety pairs per prompt"})
    max_slots: int = field(default=32, metadata={"help": "sequences sampled together"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | auto ..."})
    seed: int = 0
    overwrite: bool = field(default=False, metadata={"help": "replace the files of an earlier build"})

    ALIASES: ClassVar[dict[str, str]] = {"base": "model"}


@dataclass
class PreferenceBuildResult:
    """What `run_preference_build` wrote: the files by name, and the pair counts."""

    out_dir: Path
    files: dict[str, Path]
    counts: dict[str, int]
    summary: dict[str, Any] = field(default_factory=dict)


def _check(cfg: PreferenceBuildConfig) -> None:
    for name in (
        "n_per_task",
        "n_harmful",
        "n_benign",
        "heldout_n_per_task",
        "heldout_n_harmful",
        "heldout_n_benign",
    ):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("samples_per_temperature", "max_new_tokens", "max_pairs", "max_safety_pairs", "max_slots"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.temperatures or any(t < 0 for t in cfg.temperatures):
        raise ConfigError(f"temperatures must be a non-empty list of values >= 0, got {cfg.temperatures}")


def _prepare_out(cfg: PreferenceBuildConfig) -> Path:
    out = prepare_run_dir(cfg.out_dir, resume=False, overwrite=cfg.overwrite)
    found = [name for name in OUTPUT_FILES if (out / name).exists()]
    if found and not cfg.overwrite:
        raise ConfigError(
            f"out_dir {out} already holds preference data ({', '.join(found[:3])}); pass --overwrite to "
            "replace it or choose another --out-dir"
        )
    return out


def _sample_all(
    model: Transformer,
    tokenizer: Tokenizer,
    dialogs: Sequence[Sequence[Message]],
    cfg: PreferenceBuildConfig,
    split_index: int,
) -> list[list[str]]:
    """Every dialog's responses over all temperatures (in temperature order)."""
    texts: list[list[str]] = [[] for _ in dialogs]
    for k, temperature in enumerate(cfg.temperatures):
        t0 = time.monotonic()
        rows = sample_responses(
            model, tokenizer, dialogs, n=cfg.samples_per_temperature, temperature=temperature,
            seed=1000 * cfg.seed + 100 * split_index + k, max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p,
            max_slots=cfg.max_slots,
        )  # fmt: skip
        for acc, row in zip(texts, rows, strict=True):
            acc += [s.text for s in row]
        print(
            f"  T={temperature}: {len(dialogs)} prompts x {cfg.samples_per_temperature} samples "
            f"in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
    return texts


def _as_item(prompt: SafetyPrompt) -> InstructItem | None:
    """A benign prompt built on a suite task as an instruction item (helpfulness data too)."""
    if prompt.harmful or prompt.answer is None or prompt.task not in TASKS:
        return None
    messages: list[Message] = [*prompt.dialog, {"role": "assistant", "content": prompt.answer}]
    return InstructItem(task=prompt.task, messages=messages, answer=prompt.answer)


def _build_split(
    model: Transformer, tokenizer: Tokenizer, cfg: PreferenceBuildConfig, split: Split
) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """(helpful pairs, safety pairs, response statistics) of one split."""
    train = split == "train"
    n_task, n_harm, n_ben = (
        (cfg.n_per_task, cfg.n_harmful, cfg.n_benign)
        if train
        else (cfg.heldout_n_per_task, cfg.heldout_n_harmful, cfg.heldout_n_benign)
    )
    items = generate_items(split, n_task, seed=cfg.seed, tasks=HELPFUL_TASKS)
    safety = harmful_prompts(split, n_harm, seed=cfg.seed) + benign_alarming_prompts(
        split, n_ben, seed=cfg.seed
    )
    dialogs: list[list[Message]] = [it.prompt_dialog for it in items] + [p.dialog for p in safety]
    print(f"{split}: {len(items)} instruction, {n_harm} harmful, {n_ben} benign prompts", flush=True)
    texts = _sample_all(model, tokenizer, dialogs, cfg, 0 if train else 1) if dialogs else []
    rng = random.Random(f"preference-build/{split}/{cfg.seed}")
    helpful: list[PreferencePair] = []
    safe: list[PreferencePair] = []
    grades: Counter[str] = Counter()
    for item, responses in zip(items, texts[: len(items)], strict=True):
        grades.update(grade(item, r) for r in responses)
        helpful += pairs_from_samples(item, responses, rng, cfg.max_pairs)
    refusals = {"harmful": [0, 0], "benign": [0, 0]}  # [refused, total]
    for prompt, responses in zip(safety, texts[len(items) :], strict=True):
        tally = refusals["harmful" if prompt.harmful else "benign"]
        tally[0] += sum(is_refusal(r) for r in responses)
        tally[1] += len(responses)
        safe += safety_pairs_from_samples(prompt, responses, rng, cfg.max_safety_pairs)
        benign_item = _as_item(prompt)
        if benign_item is not None:
            helpful += pairs_from_samples(benign_item, responses, rng, cfg.max_pairs)
    stats = {
        "prompts": {"instruction": len(items), "harmful": n_harm, "benign": n_ben},
        "instruction_grades": dict(grades),
        "refusal_rate": {k: (r / n if n else None) for k, (r, n) in refusals.items()},
    }
    return helpful, safe, stats


def pair_counts(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Counts of pairs per rating, safety bin, task and kind."""
    return {
        "pairs": len(pairs),
        "rating": dict(Counter(p.rating for p in pairs)),
        "safety_bin": dict(Counter(p.safety_bin for p in pairs)),
        "task": dict(Counter(p.task for p in pairs)),
        "kind": dict(Counter(p.kind for p in pairs)),
    }


def run_preference_build(cfg: PreferenceBuildConfig) -> PreferenceBuildResult:
    """Sample, label and write the preference files (see the module docstring).

    Raises:
        ConfigError: bad settings, an out_dir holding an earlier build (without `overwrite`), or a
            tokenizer that does not fit the model.
        CheckpointError: unreadable model.
    """
    t_start = time.monotonic()
    _check(cfg)
    device = resolve_device(cfg.device)
    out = _prepare_out(cfg)
    loaded = load_model(cfg.model, dtype=torch.float32, device=device, progress=False)
    model, args = loaded.model, loaded.args
    tokenizer, _ = model_tokenizer(
        loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer` in the config", args.vocab_size
    )
    model.eval()
    pairs: dict[str, list[PreferencePair]] = {}
    stats: dict[str, Any] = {}
    for split in ("train", "heldout"):
        helpful, safe, stats[split] = _build_split(model, tokenizer, cfg, split)
        pairs[f"helpful_{split}"], pairs[f"safety_{split}"] = helpful, safe
    pairs["rm_helpfulness_train"] = mix_pairs(
        pairs["helpful_train"], pairs["safety_train"], "helpfulness", cfg.seed
    )
    pairs["rm_safety_train"] = mix_pairs(pairs["helpful_train"], pairs["safety_train"], "safety", cfg.seed)
    files = {name: write_pairs(pairs[name], out / f"{name}.jsonl") for name in PAIR_FILES + MIX_FILES}
    counts = {name: len(pairs[name]) for name in files}
    summary = {
        "files": {name: pair_counts(pairs[name]) for name in files},
        "responses": stats,
        "wall_time_s": time.monotonic() - t_start,
        "config": config_to_dict(cfg),
    }
    write_json(out / "summary.json", summary)
    print("pairs: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return PreferenceBuildResult(out_dir=out, files=files, counts=counts, summary=summary)
