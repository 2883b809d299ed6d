"""Code-model pretraining with Code Llama's fill-in-the-middle objective.

`run_code_pretrain(CodePretrainConfig(...))` is the whole stage:

1. list the Python files of `source_dir` (sorted; the running interpreter's standard library by
   default) and hold out the files whose name hashes into `heldout_fraction` (`llama2.data.fim`);
2. train a SentencePiece tokenizer with Llama 2's settings on the training files, with Code Llama's
   `▁<PRE>` `▁<MID>` `▁<SUF>` `▁<EOT>` as extra pieces (`llama2.train.tokenizer`) — or use `tokenizer`;
3. cut the files into documents of at most `max_chars` characters and train (`llama2.train.trainer.fit`)
   on FIM examples (`llama2.data.fim.FIMBatches`: `fim_rate` of documents as PSM/SPM infilling, new
   cuts every epoch), validating on the held-out files;
4. write the model (our format: `params.json`, `model.safetensors`, `tokenizer.model`) to
   `<out_dir>/model` and a `summary.json`.

The config nests the optimizer, schedule and checkpoint settings as a `[loop]` table (a `LoopConfig`,
`--loop.max-steps 1800`); the earlier flat names (`--max-steps`, `CodePretrainConfig(lr=2e-3)`) still
work through `ALIASES`.

`config.toml`, `params.json` and `files.json` (the file split) are written to `<out_dir>` only once
`fit` has checked the run folder and the checkpoint to resume, so a refused run changes no file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama2.config import ModelArgs
from llama2.data.fim import FIMBatches, default_source_dir, fixed_batches, read_documents, source_splits
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir, write_text_atomic
from llama2.train.loop import LoopConfig, LossStage, TrainResult, config_to_dict
from llama2.train.pretrain import (
    init_weights,
    lm_loss,
    parse_save_dtype,
    save_model,
    shape_args,
    write_json,
    write_run_files,
)
from llama2.train.run_config import flat_aliases
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer
from llama2.train.trainer import fit


@flat_aliases
@dataclass
class CodePretrainConfig:
    """`llama2 train code`: data, FIM and model-shape fields, and a `[loop]` table (optimizer, schedule,
    checkpoints; `--loop.max-steps 1800`)."""

    source_dir: Path = field(default_factory=default_source_dir)  # folder of Python files
    pattern: str = "*.py"  # files directly under source_dir (not recursive)
    heldout_fraction: float = 0.1  # files held out for validation / infill evaluation (by name hash)
    max_chars: int = 800  # documents are cut from files at line boundaries, at most this long
    fim_rate: float = 0.9  # share of documents turned into FIM examples (Code Llama: 0.9)
    spm_rate: float = 0.5  # share of FIM examples in SPM order (Code Llama: half PSM, half SPM)
    tokenizer: Path | None = None  # an existing tokenizer with the infill pieces; None: train one
    vocab_size: int = 2048  # tokenizer trained when `tokenizer` is None
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 0  # 0: same as n_heads
    multiple_of: int = 32
    hidden_dim: int = 512  # 0: Meta's rule from dim and multiple_of
    rope_theta: float = 10000.0  # Code Llama uses 1e6 for 16k contexts; ours is short
    seq_len: int = 384  # training sequence length = the model's max_seq_len
    init_std: float = 0.02
    save_dtype: str = "bfloat16"  # dtype of the saved weights: float32 | bfloat16 | float16
    resume: bool = False
    loop: LoopConfig = field(default_factory=LoopConfig, metadata={"help": "the training loop: [loop] table"})

    # Flat flags and keys of earlier versions (`--lr 2e-3`, `lr = 2e-3`), mapped to the `[loop]` table.
    ALIASES: ClassVar[dict[str, str]] = {f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig)}

    def model_args(self, vocab_size: int) -> ModelArgs:
        return shape_args(self, vocab_size)


@dataclass
class CodePretrainResult:
    """What `run_code_pretrain` produced."""

    train: TrainResult
    model_dir: Path
    args: ModelArgs
    n_params: int
    train_files: list[Path]
    heldout_files: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)


def code_splits(cfg: CodePretrainConfig) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of `cfg.source_dir`, deterministic."""
    return source_splits(cfg.source_dir, cfg.pattern, cfg.heldout_fraction)


def run_code_pretrain(cfg: CodePretrainConfig) -> CodePretrainResult:
    """Train a small code model with the FIM objective (see the module docstring).

    Returns:
        A `CodePretrainResult` with the loop summary and the saved model folder.
    """
    loop_cfg = cfg.loop
    resolve_device(loop_cfg.device)  # a device this machine lacks fails now, not after data preparation
    out_dir = prepare_run_dir(loop_cfg.out_dir, resume=cfg.resume, overwrite=loop_cfg.overwrite)
    save_dtype = parse_save_dtype(cfg.save_dtype)
    train_files, held_files = code_splits(cfg)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else out_dir / "tokenizer.model"
    if not cfg.tokenizer and not (cfg.resume and tok_path.is_file()):
        train_tokenizer(
            TokenizerTrainConfig(
                data=[str(p) for p in train_files],
                out=tok_path,
                vocab_size=cfg.vocab_size,
                infill_pieces=True,
            )
        )
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.eot_id is None:
        raise ConfigError(f"tokenizer {tok_path} lacks ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>; FIM training needs them")
    args = cfg.model_args(tokenizer.vocab_size)

    train_docs = read_documents(train_files, cfg.max_chars)
    held_docs = read_documents(held_files, cfg.max_chars)
    batches = FIMBatches(
        train_docs, tokenizer, cfg.seq_len, loop_cfg.batch_size, loop_cfg.seed, cfg.fim_rate, cfg.spm_rate
    )
    val = fixed_batches(held_docs, tokenizer, cfg.seq_len, loop_cfg.batch_size, 0, cfg.fim_rate, cfg.spm_rate)
    torch.manual_seed(loop_cfg.seed)
    model = Transformer(args)
    init_weights(model, cfg.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"code model: {n_params / 1e6:.2f}M params {args.to_params_json()}; {len(train_files)} train files "
        f"({len(train_docs)} documents), {len(held_files)} held-out files ({len(val)} val batches)",
        flush=True,
    )
    files = {"train": [p.name for p in train_files], "heldout": [p.name for p in held_files]}

    def on_start(folder: Path) -> None:  # after the run folder and the resumed checkpoint are checked
        write_run_files(folder, cfg, args)
        write_text_atomic(folder / "files.json", json.dumps(files, indent=1) + "\n")

    stage = LossStage(model, lm_loss, batches, val, compile=loop_cfg.compile)
    result = fit(stage, loop_cfg, resume=cfg.resume, on_start=on_start)

    model_dir = save_model(model, args, out_dir / "model", tok_path, save_dtype)
    summary = {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_time_s": result.wall_time_s,
        "n_params": n_params,
        "train_files": len(train_files),
        "heldout_files": [p.name for p in held_files],
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return CodePretrainResult(
        train=result,
        model_dir=model_dir,
        args=args,
        n_params=n_params,
        train_files=train_files,
        heldout_files=held_files,
    )
