"""Ghost Attention (GAtt, Llama 2 paper sec. 3.3): fine-tune a chat model so that an instruction given
in the first user turn holds for every later turn.

`run_gatt(GattConfig(...))`:

1. SAMPLE: `llama2.data.gatt.gatt_dialogs("train", n_dialogs, ...)` gives dialogs of `max_turns`
   instruct-suite prompts with a checkable answer-style instruction. Turn by turn (all dialogs' turn t
   in one `llama2.train.rollout.sample_responses` batch), the model answers with the instruction
   concatenated to *every* user turn, its own earlier answers in the history. A sampled answer that
   follows the style (`instruction.check`) is kept; one that does not gets the style applied
   (`instruction.apply` on its content). The paper samples from the latest RLHF model, which already
   follows single-turn instructions; a small model does not yet, so `apply` is the substitute that
   makes every kept answer adherent. Both counts are reported. With `reference_on_wrong` a sample
   whose content is wrong (`item.check` on the stripped content) is replaced by the styled reference
   answer (off by default: the paper trains on the model's own samples).
2. BUILD: each dialog keeps the instruction in the FIRST user turn only, later user turns plain, cut
   at a random final turn t in 1..max_turns (so every position is trained across the data; a dialog
   longer than the model's context is cut at an earlier turn, counted in `shortened`), with the loss
   on the last answer only (`loss_turns="last"`: the paper zeroes the loss on all earlier tokens,
   earlier answers included). `plain_fraction` of the final mix are ordinary instruct-suite train
   dialogs, so the exact match of plain questions is kept.
3. TRAIN: the dialogs are written to `<out_dir>/gatt_train.jsonl` and `llama2.train.sft.run_sft` runs
   with `loss_turns="last"` in `<out_dir>/sft`; its model folder is then moved (renamed, not copied,
   not linked) to `<out_dir>/model`. `<out_dir>/summary.json` holds the sample counts, the samples'
   adherence per turn, the SFT losses and the wall times.

`resume = true` reuses `<out_dir>/gatt_train.jsonl` (no new sampling) and resumes the SFT run.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.chat import encode_dialog_for_training
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.data.gatt import GattDialog, gatt_dialogs
from llama2.data.instruct_suite import TASKS, generate_items
from llama2.data.jsonl import jsonl_text
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir, write_text_atomic
from llama2.train.loop import LoopConfig, config_to_dict
from llama2.train.pretrain import parse_save_dtype, write_json
from llama2.train.rollout import sample_responses
from llama2.train.run_config import flat_aliases
from llama2.train.sft import SFTConfig, SFTResult, run_sft


def _gatt_loop() -> LoopConfig:
    """SFT's loop defaults (lr 2e-5, short warmup); `out_dir` is the GAtt run folder."""
    return LoopConfig(lr=2e-5, warmup_steps=10, out_dir=Path("runs/gatt"))


@flat_aliases
@dataclass
class GattConfig:
    """`llama2 train gatt`: sample multi-turn dialogs that keep a first-turn instruction, then
    fine-tune on them with the loss on the last turn only (a `[loop]` table as in SFT)."""

    model: Path = field(default=Path("chat"), metadata={"help": "chat model to sample from and fine-tune"})
    tokenizer: Path | None = field(default=None, metadata={"help": "default: the checkpoint's tokenizer"})
    n_dialogs: int = field(default=400, metadata={"help": "GAtt dialogs sampled"})
    max_turns: int = field(default=5, metadata={"help": "turns per sampled dialog"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    seed: int = field(default=0, metadata={"help": "dialogs, sampling and cut points"})
    plain_fraction: float = field(
        default=0.3, metadata={"help": "share of ordinary instruct-suite dialogs in the training mix"}
    )
    system_prob: float = field(default=0.0, metadata={"help": "share of dialogs with a system prompt"})
    reference_on_wrong: bool = field(
        default=False, metadata={"help": "replace a sample with wrong content by the styled reference"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "most tokens per sampled answer"})
    max_slots: int = field(default=64, metadata={"help": "sequences sampled together"})
    val_fraction: float = field(default=0.05, metadata={"help": "training dialogs held out for val loss"})
    save_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    resume: bool = field(default=False, metadata={"help": "reuse gatt_train.jsonl and resume the SFT run"})
    loop: LoopConfig = field(
        default_factory=_gatt_loop, metadata={"help": "the training loop ([loop] table)"}
    )

    ALIASES: ClassVar[dict[str, str]] = {  # flat loop flags, except `seed`: the stage's own field
        f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig) if f.name != "seed"
    }


@dataclass
class GattResult:
    """What `run_gatt` produced."""

    model_dir: Path
    data_path: Path
    sft: SFTResult
    summary: dict[str, Any]


def _check(cfg: GattConfig) -> None:
    if cfg.n_dialogs < 1 or cfg.max_turns < 1:
        raise ConfigError(f"n_dialogs and max_turns must be >= 1, got {cfg.n_dialogs}, {cfg.max_turns}")
    if not 0.0 <= cfg.plain_fraction < 1.0:
        raise ConfigError(f"plain_fraction must be in [0, 1), got {cfg.plain_fraction}")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    parse_save_dtype(cfg.save_dtype)


def sample_gatt_answers(
    model: Transformer, tokenizer: Tokenizer, dialogs: list[GattDialog], cfg: GattConfig
) -> tuple[list[list[str]], dict[str, Any]]:
    """Every dialog's answers, turn by turn, sampled with the instruction in every user turn.

    Returns:
        `(answers, stats)`: `answers[i][t]` is the (adherent) answer of turn t of dialog i; `stats`
        counts per turn the samples that adhered (kept), got the style applied, had right content,
        were replaced by the reference and ran out of tokens.
    """
    answers: list[list[str]] = [[] for _ in dialogs]
    per_turn = []
    for t in range(cfg.max_turns):
        prompts = [
            d.messages(a, instruction_everywhere=True, end_with_user=True)
            for d, a in zip(dialogs, answers, strict=True)
        ]
        samples = sample_responses(
            model, tokenizer, prompts, n=1, temperature=cfg.temperature, seed=cfg.seed * 1000 + t,
            max_new_tokens=cfg.max_new_tokens, max_slots=cfg.max_slots,
        )  # fmt: skip
        row = {
            "turn": t + 1,
            "n": len(dialogs),
            "adhered": 0,
            "applied": 0,
            "correct": 0,
            "replaced": 0,
            "cut": 0,
        }
        for d, a, (s,) in zip(dialogs, answers, samples, strict=True):
            inst, item = d.instruction, d.items[t]
            adhered = inst.check(s.text)
            correct = item.check(inst.strip(s.text))
            row["adhered"] += int(adhered)
            row["applied"] += int(not adhered)
            row["correct"] += int(correct)
            row["cut"] += int(s.finish_reason == "length")
            answer = s.text.strip() if adhered else inst.apply(s.text)
            if cfg.reference_on_wrong and not correct:
                answer = inst.apply(item.answer)
                row["replaced"] += 1
            a.append(answer)
        per_turn.append(row)
        print(
            f"GAtt sampling turn {t + 1}/{cfg.max_turns}: {row['adhered']}/{row['n']} adhered, "
            f"{row['correct']} right content",
            flush=True,
        )
    totals: dict[str, float] = {
        k: sum(int(r[k]) for r in per_turn) for k in ("n", "adhered", "applied", "correct", "replaced", "cut")
    }
    totals["adherence"] = totals["adhered"] / max(1, totals["n"])
    return answers, {"per_turn": per_turn, "totals": totals}


def build_training_dialogs(
    dialogs: list[GattDialog], answers: list[list[str]], tokenizer: Tokenizer, seq_len: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GAtt training records (`{"messages", "kind", "instruction", "turns"}`): instruction in the first
    user turn only, cut at a random final turn, shortened further until it fits `seq_len` tokens."""
    rng = random.Random(f"gatt-cut/{seed}")
    out: list[dict[str, Any]] = []
    shortened = 0
    turns_hist: dict[int, int] = {}
    for d, a in zip(dialogs, answers, strict=True):
        t = rng.randint(1, len(a))
        messages = d.messages(a[:t], instruction_everywhere=False, end_with_user=False)
        cut = False
        while t > 1 and len(encode_dialog_for_training(messages, tokenizer, loss_turns="last")[0]) > seq_len:
            t, cut = t - 1, True
            messages = d.messages(a[:t], instruction_everywhere=False, end_with_user=False)
        shortened += int(cut)
        turns_hist[t] = turns_hist.get(t, 0) + 1
        out.append({"messages": messages, "kind": "gatt", "instruction": d.instruction.name, "turns": t})
    return out, {"shortened": shortened, "final_turns": dict(sorted(turns_hist.items()))}


def plain_dialogs(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` ordinary instruct-suite train dialogs (all tasks, refusals included)."""
    if n == 0:
        return []
    per_task = -(-n // len(TASKS))
    items = generate_items("train", per_task, seed=seed, system_prob=0.3)[:n]
    return [{"messages": it.messages, "kind": "plain", "task": it.task} for it in items]


def run_gatt(cfg: GattConfig) -> GattResult:
    """Sample, build and fine-tune (see the module docstring).

    Raises:
        ConfigError: bad settings, an out_dir that already holds a run (without resume/overwrite).
        CheckpointError / GenerationError: unreadable model, failed sampling.
    """
    t0 = time.perf_counter()
    _check(cfg)
    loop = cfg.loop
    device = resolve_device(loop.device)
    out_dir = prepare_run_dir(loop.out_dir, resume=cfg.resume, overwrite=loop.overwrite)
    sft_dir = out_dir / "sft"
    prepare_run_dir(sft_dir, resume=cfg.resume, overwrite=loop.overwrite)  # refuse before sampling
    data_path, model_dir = out_dir / "gatt_train.jsonl", out_dir / "model"
    if not cfg.resume and not loop.overwrite and (data_path.exists() or model_dir.exists()):
        raise ConfigError(
            f"out_dir {out_dir} already holds a GAtt run ({data_path.name} or model/); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out-dir"
        )

    sampling: dict[str, Any]
    if cfg.resume and data_path.is_file():
        prev = out_dir / "sampling.json"
        sampling = json.loads(prev.read_text()) if prev.is_file() else {}
        sampling["reused"] = True
        print(f"GAtt: resuming with the dialogs in {data_path}", flush=True)
    else:
        loaded = load_model(cfg.model, device=device, dtype=torch.float32, progress=False)
        tok_path = require_tokenizer(loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer`")
        tokenizer = Tokenizer.from_file(tok_path)
        dialogs = gatt_dialogs("train", cfg.n_dialogs, cfg.seed, cfg.max_turns, system_prob=cfg.system_prob)
        answers, stats = sample_gatt_answers(loaded.model, tokenizer, dialogs, cfg)
        seq_len = loaded.model.args.max_seq_len
        del loaded
        records, built = build_training_dialogs(dialogs, answers, tokenizer, seq_len, cfg.seed)
        n_plain = round(len(records) * cfg.plain_fraction / (1.0 - cfg.plain_fraction))
        records += plain_dialogs(n_plain, cfg.seed)
        random.Random(f"gatt-mix/{cfg.seed}").shuffle(records)
        write_text_atomic(data_path, jsonl_text(records))
        sampling = {
            "samples": stats,
            "training_dialogs": {"gatt": cfg.n_dialogs, "plain": n_plain, **built},
            "wall_time_s": time.perf_counter() - t0,
        }
        write_json(out_dir / "sampling.json", sampling)

    sft_cfg = SFTConfig(
        model=cfg.model, data=data_path, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction,
        save_dtype=cfg.save_dtype, resume=cfg.resume, loss_turns="last",
        loop=dataclasses.replace(loop, out_dir=sft_dir),
    )  # fmt: skip
    t_sft = time.perf_counter()
    sft = run_sft(sft_cfg)
    if sft.model_dir is None:  # full fine-tuning always saves one
        raise ConfigError(f"the SFT stage wrote no model under {sft_dir}")
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a previous run's (resume/overwrite)
    sft.model_dir.replace(model_dir)
    summary = {
        **{k: v for k, v in sampling.items() if k != "wall_time_s"},
        "sampling_wall_time_s": sampling.get("wall_time_s"),
        "sft": {
            "step": sft.train.step,
            "train_loss": sft.train.train_loss,
            "val_loss": sft.train.val_loss,
            "train_dialogs": sft.n_train_dialogs,
            "val_dialogs": sft.n_val_dialogs,
            "wall_time_s": time.perf_counter() - t_sft,
        },
        "model_dir": str(model_dir),
        "wall_time_s": float(sampling.get("wall_time_s", 0.0)) + (time.perf_counter() - t_sft),
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return GattResult(
        model_dir=model_dir,
        data_path=data_path,
        sft=dataclasses.replace(sft, model_dir=model_dir),
        summary=summary,
    )
