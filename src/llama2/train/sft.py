"""Supervised fine-tuning (Llama 2 paper, sec. 3.1): full fine-tuning or LoRA on chat dialogs.

`run_sft(SFTConfig(...))` is the whole stage:

1. load the base checkpoint (any format `llama2.checkpoint.load.load_model` reads) in float32;
2. read the dialogs (`llama2.data.sft.load_dialogs`), encode them in the Llama 2-Chat format with the
   answer-only loss mask, and pack several per row (`llama2.data.sft`; attention may cross dialogs,
   see there); hold out `val_fraction` of them (or read `val_data`);
3. with a `lora` table (`SFTConfig.lora`, a `LoRAConfig`), swap its `target_modules` linears for
   `LoRALinear` and train only the adapters; else train every weight. With `quantize_base = "nf4"`
   (QLoRA) the base is loaded quantized (`load_model(..., quantize=...)`, any `llama2.quant` scheme)
   and stays so: only the float32 adapters train, gradients flow through the frozen 4-bit layers
   (`llama2.train.lora`); it requires the `lora` table;
4. run the trainer (`llama2.train.trainer.fit`) on a `LossStage` with `sft_loss` (mean cross-entropy
   over answer tokens), with the settings of the `loop` table;
5. save: full fine-tuning writes the model to `<out_dir>/model`; LoRA writes the adapters to
   `<out_dir>/adapter` (`adapter.safetensors` + `adapter_config.json`) and, with `merge = true`,
   also the merged full model to `<out_dir>/model` (over a quantized base: every layer dequantized,
   a float checkpoint in `save_dtype`; re-quantize it with `llama2 quantize` if wanted).

Defaults follow the paper's SFT recipe (lr 2e-5, cosine schedule, weight decay 0.1, 2 epochs) except
where a small model needs otherwise — set `lr`, `max_steps` in the `[loop]` table. The config nests::

    model = "runs/base/model"
    data = "dialogs.jsonl"
    [lora]
    rank = 8
    [loop]
    lr = 1e-4
    max_steps = 200

"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.chat import LOSS_TURNS
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import model_tokenizer
from llama2.config import ModelArgs
from llama2.data.sft import (
    SFTBatches,
    SFTExample,
    encode_examples,
    fixed_sft_batches,
    load_dialogs,
    pack_examples,
    sft_loss,
)
from llama2.errors import ConfigError
from llama2.runtime import resolve_device
from llama2.train.checkpointing import prepare_run_dir
from llama2.train.loop import LoopConfig, LossStage, TrainResult, config_to_dict
from llama2.train.lora import (
    LoRAConfig,
    apply_lora,
    dequantize_linears,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from llama2.train.pretrain import parse_save_dtype, save_model, write_json, write_run_files
from llama2.train.run_config import flat_aliases
from llama2.train.trainer import fit


def _sft_loop() -> LoopConfig:
    """The loop defaults of SFT: the paper's SFT learning rate 2e-5, a short warmup."""
    return LoopConfig(lr=2e-5, warmup_steps=10)


@flat_aliases
@dataclass
class SFTConfig:
    """`llama2 train sft`: data and base model fields, a `[lora]` table (LoRA; absent: full
    fine-tuning) and a `[loop]` table (optimizer, schedule, checkpoints; `--loop.lr 1e-4`)."""

    model: Path = field(
        default=Path("base"),
        metadata={"help": "base checkpoint to fine-tune (folder or file, any format, or an embedded name)"},
    )
    data: Path = field(
        default=Path("sft.jsonl"), metadata={"help": 'JSONL of {"messages": [{"role", "content"}, ...]}'}
    )
    val_data: Path | None = field(
        default=None, metadata={"help": "held-out dialogs; none: hold out val_fraction of `data`"}
    )
    val_fraction: float = 0.05
    tokenizer: Path | None = field(
        default=None, metadata={"help": "default: the tokenizer.model next to the base checkpoint"}
    )
    seq_len: int = field(default=0, metadata={"help": "packed row length; 0: the base model's max_seq_len"})
    quantize_base: str | None = field(
        default=None, metadata={"help": 'QLoRA: load the base quantized ("nf4"); needs a [lora] table'}
    )
    merge: bool = field(
        default=False, metadata={"help": "LoRA only: also write the merged full model to <out_dir>/model"}
    )
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of saved full models: float32 | bfloat16 | float16"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/checkpoints/latest"})
    loss_turns: str = field(
        default="all", metadata={"help": 'answers trained: "all" | "last" (Ghost Attention dialogs)'}
    )
    lora: LoRAConfig | None = field(
        default=None, metadata={"help": "LoRA adapters ([lora] table, --lora.rank 8); none: full fine-tuning"}
    )
    loop: LoopConfig = field(default_factory=_sft_loop, metadata={"help": "the training loop ([loop] table)"})

    # Flat flags and keys of earlier versions (`--lora-rank 8`, `--lr 1e-4`), mapped to nested fields.
    ALIASES: ClassVar[dict[str, str]] = {
        **{f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig)},
        "base": "model",
        "lora_rank": "lora.rank",
        "lora_alpha": "lora.alpha",
        "lora_dropout": "lora.dropout",
        "lora_targets": "lora.target_modules",
    }


@dataclass
class SFTResult:
    """What `run_sft` produced."""

    train: TrainResult
    args: ModelArgs
    model_dir: Path | None  # the full (or merged) model, None for LoRA without merge
    adapter_dir: Path | None  # LoRA adapters, None for full fine-tuning
    n_trainable: int
    n_train_dialogs: int
    n_val_dialogs: int
    extra: dict[str, Any] = field(default_factory=dict)


def split_examples(
    examples: list[SFTExample], val_fraction: float, seed: int
) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, validation): `val_fraction` of the examples, chosen by a seeded shuffle."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(examples)))
    if n_val >= len(examples):
        raise ConfigError(f"val_fraction {val_fraction} leaves no training dialogs out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(f"sft-split/{seed}").shuffle(order)
    val_ids = set(order[:n_val])
    return (
        [e for i, e in enumerate(examples) if i not in val_ids],
        [e for i, e in enumerate(examples) if i in val_ids],
    )


def run_sft(cfg: SFTConfig) -> SFTResult:
    """Fine-tune `cfg.model` on `cfg.data` (see the module docstring).

    Returns:
        An `SFTResult` with the loop summary and the saved folders.

    Raises:
        ConfigError: bad settings, no tokenizer found, or rows longer than the model's context.
        CheckpointError / DialogError: unreadable base checkpoint or malformed dialogs.
    """
    loop_cfg = cfg.loop
    resolve_device(loop_cfg.device)  # a device this machine lacks fails now, not after data preparation
    out_dir = prepare_run_dir(loop_cfg.out_dir, resume=cfg.resume, overwrite=loop_cfg.overwrite)
    save_dtype = parse_save_dtype(cfg.save_dtype)
    if cfg.loss_turns not in LOSS_TURNS:
        raise ConfigError(f"loss_turns must be one of {LOSS_TURNS}, got {cfg.loss_turns!r}")
    lora_cfg = cfg.lora
    if cfg.merge and lora_cfg is None:
        raise ConfigError(
            "merge = true needs LoRA (a [lora] table, e.g. --lora.rank 8); full fine-tuning already saves "
            "a full model"
        )

    if cfg.quantize_base is not None and lora_cfg is None:
        raise ConfigError(
            f"quantize_base = {cfg.quantize_base!r} (QLoRA) trains LoRA adapters over a frozen quantized "
            "base; add a [lora] table (e.g. --lora.rank 8), or drop quantize_base for full fine-tuning"
        )
    if cfg.quantize_base is not None:
        loaded = load_model(cfg.model, dtype=torch.float32, progress=False, quantize=cfg.quantize_base)
    else:
        loaded = load_model(cfg.model, dtype=torch.float32, progress=False)
    model, args = loaded.model, loaded.args
    tokenizer, tok_path = model_tokenizer(
        loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer` in the SFT config", args.vocab_size
    )
    seq_len = cfg.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the base model's context window {args.max_seq_len}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id

    examples = encode_examples(load_dialogs(cfg.data), tokenizer, loss_turns=cfg.loss_turns)
    if cfg.val_data is not None:
        val_dialogs = load_dialogs(cfg.val_data)
        train_ex, val_ex = examples, encode_examples(val_dialogs, tokenizer, loss_turns=cfg.loss_turns)
    else:
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, loop_cfg.seed)
    batches = SFTBatches(train_ex, seq_len, loop_cfg.batch_size, seed=loop_cfg.seed, pad_id=pad_id)
    val_batches = fixed_sft_batches(val_ex, seq_len, loop_cfg.batch_size, pad_id) if val_ex else None
    _, stats = pack_examples(train_ex, seq_len, pad_id)

    trainable = None
    if lora_cfg is not None:
        wrapped = apply_lora(model, lora_cfg)
        trainable = lora_parameters(model)
        print(f"LoRA rank {lora_cfg.rank} on {len(wrapped)} modules ({', '.join(lora_cfg.target_modules)})")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in (trainable or model.parameters()))
    print(
        f"SFT: {len(train_ex)} train dialogs -> {stats.rows} rows of {seq_len} ({stats.fill:.0%} filled, "
        f"{stats.supervised_tokens:,} answer tokens, {stats.truncated} cut), {len(val_ex)} val dialogs; "
        f"{n_trainable:,} trainable parameters",
        flush=True,
    )
    stage = LossStage(model, sft_loss, batches, val_batches, trainable=trainable, compile=loop_cfg.compile)
    result = fit(  # config.toml is written by on_start, after the folder/resume checks
        stage, loop_cfg, resume=cfg.resume, on_start=lambda folder: write_run_files(folder, cfg)
    )

    model.cpu()
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    if lora_cfg is not None:
        adapter_dir = save_adapter(model, lora_cfg, out_dir / "adapter", base=str(cfg.model))
        if cfg.merge:
            merge_lora(model)
            dequantize_linears(model)  # a QLoRA base: the merged model is saved in float
            model_dir = save_model(model, args, out_dir / "model", tok_path, save_dtype)
    else:
        model_dir = save_model(model, args, out_dir / "model", tok_path, save_dtype)
    summary = {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_time_s": result.wall_time_s,
        "n_trainable": n_trainable,
        "train_dialogs": len(train_ex),
        "val_dialogs": len(val_ex),
        "rows_per_epoch": stats.rows,
        "answer_tokens_per_epoch": stats.supervised_tokens,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return SFTResult(
        train=result,
        args=args,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        n_trainable=n_trainable,
        n_train_dialogs=len(train_ex),
        n_val_dialogs=len(val_ex),
    )
