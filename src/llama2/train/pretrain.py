"""Pretraining: corpus -> token files -> packed sequences -> `train` -> a saved model.

`run_pretrain(PretrainConfig(...))` is the whole stage; `llama2 train pretrain --config run.toml`
calls it. The config holds data and model-shape fields and nests the optimizer, schedule and
checkpoint settings as a `[loop]` table (a `LoopConfig`; `--loop.lr 1e-3`); every field of the TOML
file can be overridden by a command-line flag. Files and flags of the earlier flat config (`lr = 1e-3`
at the top level, `--lr 1e-3`, `PretrainConfig(lr=1e-3)`) still work through `ALIASES`::

    data = ["corpus/"]
    tokenizer = "tokenizer.model"
    dim = 288
    [loop]
    out_dir = "runs/mine"
    lr = 1e-3

The resolved config and the model shape
are written to `<out_dir>/config.toml` and `<out_dir>/params.json` once the run folder and the
checkpoint to resume have been checked, just before the first step (a refused run changes no file);
`--resume` continues from `<out_dir>/checkpoints/latest`. The final model is written in our format
(`params.json`, `model.safetensors`, `tokenizer.model`) to `<out_dir>/model/`, and as a Hugging Face
folder to `<out_dir>/hf/` with `export_hf = true`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.checkpoint.save import export_hf, save_checkpoint
from llama2.config import ModelArgs, preset
from llama2.data.corpus import TokenFile, build_token_file, load_encoder
from llama2.data.packing import PackedBatches, PackedSequences, SequentialBatches, split_documents
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.runtime import resolve_device
from llama2.train.checkpointing import prepare_run_dir, write_text_atomic
from llama2.train.loop import LoopConfig, LossStage, TrainResult, config_to_dict, save_resolved_config
from llama2.train.run_config import flat_aliases
from llama2.train.trainer import fit

IGNORE_INDEX = -100


class ShapeFields(Protocol):
    """The model-shape fields a training config carries (0 means "unset" for the optional ones)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    multiple_of: int
    hidden_dim: int
    rope_theta: float
    seq_len: int


def shape_args(cfg: ShapeFields, vocab_size: int, norm_eps: float = 1e-5) -> ModelArgs:
    """`ModelArgs` from a config's shape fields (vocab from the tokenizer, max_seq_len = seq_len)."""
    return ModelArgs(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or None,
        vocab_size=vocab_size,
        multiple_of=cfg.multiple_of,
        hidden_dim=cfg.hidden_dim or None,
        norm_eps=norm_eps,
        rope_theta=cfg.rope_theta,
        max_seq_len=cfg.seq_len,
    )


@flat_aliases
@dataclass
class PretrainConfig:
    """`llama2 train pretrain`: data and model-shape fields, and a `[loop]` table (optimizer, schedule,
    checkpoints; `--loop.lr 1e-3`)."""

    data: list[str] = field(
        default_factory=list, metadata={"help": "training text: files, folders, globs, JSONL"}
    )
    val_data: list[str] = field(
        default_factory=list, metadata={"help": "held-out text; empty: split `data` by document"}
    )
    val_fraction: float = field(default=0.02, metadata={"help": "documents held out when val_data is empty"})
    split_seed: int = field(default=0, metadata={"help": "seed of the document split"})
    text_field: str = field(default="text", metadata={"help": "JSONL field with the document text"})
    tokenizer: Path = Path("tokenizer.model")
    preset: str = field(
        default="", metadata={"help": "a named ModelArgs preset; empty: use the shape fields below"}
    )
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = field(default=0, metadata={"help": "0: same as n_heads"})
    multiple_of: int = 32
    hidden_dim: int = field(default=0, metadata={"help": "0: Meta's rule from dim and multiple_of"})
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seq_len: int = field(default=256, metadata={"help": "training sequence length = the model's max_seq_len"})
    init_std: float = field(
        default=0.02,
        metadata={"help": "N(0, init_std) for matrices; wo/w2 get init_std / sqrt(2 * n_layers)"},
    )
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of the final saved weights: float32 | bfloat16 | float16"}
    )
    export_hf: bool = field(
        default=False, metadata={"help": "also write a transformers folder to <out_dir>/hf"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/checkpoints/latest"})
    loop: LoopConfig = field(default_factory=LoopConfig, metadata={"help": "the training loop: [loop] table"})

    # Flat flags and keys of earlier versions (`--lr 1e-3`, `lr = 1e-3`), mapped to the `[loop]` table.
    ALIASES: ClassVar[dict[str, str]] = {f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig)}

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The model shape (vocab size from the tokenizer, max_seq_len = seq_len)."""
        if self.preset:
            return preset(self.preset).replace(vocab_size=vocab_size, max_seq_len=self.seq_len)
        return shape_args(self, vocab_size, self.norm_eps)


@dataclass
class PretrainResult:
    """What `run_pretrain` produced."""

    train: TrainResult
    model_dir: Path
    args: ModelArgs
    n_params: int
    train_tokens: int  # tokens in the training split
    val_tokens: int  # tokens in the validation split
    extra: dict[str, Any] = field(default_factory=dict)


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2/llama2.c-style init: N(0, std) for embeddings and linear layers, N(0, std/sqrt(2L)) for
    the projections that write into the residual stream (`wo`, `w2`), ones for RMSNorm gains."""
    n_layers = len(model.layers)
    for name, p in model.named_parameters():
        if p.ndim < 2:
            nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layers))
        else:
            nn.init.normal_(p, mean=0.0, std=std)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-token cross-entropy (nats/token); targets equal to -100 are ignored."""
    inputs, targets = batch  # (B, T) each
    logits = model(inputs)  # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def prepare_data(cfg: PretrainConfig) -> tuple[PackedSequences, PackedSequences | None, TokenFile]:
    """Tokenize (or reuse) the corpora and pack the train/validation windows."""
    if not cfg.data:
        raise ConfigError("no training data given; expected at least one file, folder or glob in `data`")
    data_dir = Path(cfg.loop.out_dir) / "data"
    train_file = build_token_file(cfg.data, cfg.tokenizer, data_dir / "train.bin", text_field=cfg.text_field)
    if cfg.val_data:
        val_file = build_token_file(
            cfg.val_data, cfg.tokenizer, data_dir / "val.bin", text_field=cfg.text_field
        )
        train_set = PackedSequences(train_file, cfg.seq_len)
        val_set: PackedSequences | None = PackedSequences(val_file, cfg.seq_len)
    else:
        train_docs, val_docs = split_documents(train_file.n_docs, cfg.val_fraction, cfg.split_seed)
        train_set = PackedSequences(train_file, cfg.seq_len, train_docs)
        val_set = PackedSequences(train_file, cfg.seq_len, val_docs) if val_docs else None
    if val_set is not None and len(val_set) == 0:
        raise ConfigError(
            f"validation split has fewer than {cfg.seq_len + 1} tokens; expected more held-out text"
        )
    return train_set, val_set, train_file


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_save_dtype(name: str) -> torch.dtype:
    """The dtype a config's `save_dtype` names; ConfigError for anything else."""
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise ConfigError(f"save_dtype must be float32, bfloat16 or float16, got {name!r}") from None


def save_model(
    model: nn.Module,
    args: ModelArgs,
    out_dir: Path,
    tokenizer_path: Path | None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write our checkpoint format (`save_checkpoint`), casting floating tensors to `dtype` when given."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return save_checkpoint(sd, args, out_dir, tokenizer_path=tokenizer_path)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON, atomically (`CheckpointError` when the disk refuses)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_run_files(out_dir: Path, cfg: Any, args: ModelArgs | None = None) -> None:
    """`config.toml` (the resolved config) and, given a shape, `params.json` in the run folder.

    Passed to `fit` as `on_start`, so they are written only after the run folder and the
    checkpoint to resume have been checked: a refused run leaves the previous ones untouched."""
    save_resolved_config(cfg, out_dir)
    if args is not None:
        write_json(out_dir / "params.json", args.to_params_json())


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain a Llama 2 model as described by `cfg` (see the module docstring).

    Returns:
        A `PretrainResult` with the loop summary and the saved model folder.
    """
    loop_cfg = cfg.loop
    resolve_device(loop_cfg.device)  # a device this machine lacks fails now, not after data preparation
    out_dir = prepare_run_dir(loop_cfg.out_dir, resume=cfg.resume, overwrite=loop_cfg.overwrite)
    save_dtype = parse_save_dtype(cfg.save_dtype)
    encoder = load_encoder(cfg.tokenizer)
    args = cfg.model_args(encoder.vocab_size)
    train_set, val_set, _ = prepare_data(cfg)

    torch.manual_seed(loop_cfg.seed)
    model = Transformer(args)
    init_weights(model, cfg.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f}M params {args.to_params_json()}; train {train_set.n_stream_tokens:,} "
        f"tokens ({len(train_set)} windows of {cfg.seq_len}), val "
        f"{val_set.n_stream_tokens if val_set else 0:,} tokens"
    )
    batches = PackedBatches(train_set, loop_cfg.batch_size, seed=loop_cfg.seed)
    val_batches = SequentialBatches(val_set, loop_cfg.batch_size) if val_set is not None else None
    stage = LossStage(model, lm_loss, batches, val_batches, compile=loop_cfg.compile)
    result = fit(
        stage, loop_cfg, resume=cfg.resume, on_start=lambda folder: write_run_files(folder, cfg, args)
    )

    model_dir = save_model(model, args, out_dir / "model", Path(cfg.tokenizer), save_dtype)
    if cfg.export_hf:
        export_hf(model, args, out_dir / "hf")
    summary = {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_time_s": result.wall_time_s,
        "n_params": n_params,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return PretrainResult(
        train=result,
        model_dir=model_dir,
        args=args,
        n_params=n_params,
        train_tokens=train_set.n_stream_tokens,
        val_tokens=val_set.n_stream_tokens if val_set else 0,
    )
