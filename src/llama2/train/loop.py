"""The shared training loop `train`, its `LoopConfig`, and evaluation (optimizer and LR schedule:
`llama2.train.optim`; checkpoints: `llama2.train.checkpointing`).

Every training stage (pretraining, SFT, LoRA, ...) is `train(...)` plus a loss function and a batch
source. Typical use::

    from llama2.train.loop import LoopConfig, train

    cfg = LoopConfig(lr=1e-3, warmup_steps=50, max_steps=1000, out_dir=Path("runs/x"))

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch                       # (B, T) int64 each, already on the device
        logits = model(inputs)                        # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    result = train(model, loss_fn, train_batches, val_batches, cfg, resume=True)

Contracts:
  - `train_batches` is an endless `ResumableBatches`: an iterator (`next()` gives one micro-batch) that
    also has `state_dict() -> dict` and `load_state_dict(dict)`. Its state is saved in every checkpoint,
    so a resumed run sees exactly the batches an uninterrupted run would have seen.
    (`llama2.data.packing.PackedBatches` is one.)
  - `val_batches` is a re-iterable (a list, or an object whose `__iter__` restarts from the beginning
    each time) or None; each evaluation reads the first `cfg.eval_batches` batches of a fresh iteration.
  - A batch is a tensor, a tuple/list of tensors, or a dict of tensors; the loop moves it to the device.
  - `loss_fn(model, batch)` returns a scalar mean loss. It runs under autocast when `cfg.dtype` resolves
    to bfloat16/float16; under `torch.no_grad()` for evaluation.
  - `trainable` (optional) restricts the optimizer to these parameters (LoRA); by default every
    parameter with `requires_grad`.

One optimizer step = `cfg.grad_accum` micro-batches; each micro-batch loss is divided by `grad_accum`,
so the step's gradient is the mean over the micro-batches. Step numbers count optimizer steps from 1.

Checkpoints (`<out_dir>/checkpoints/step_0000100.pt`, written to a temporary file then renamed; a
`latest` file names the newest) hold the model state dict, optimizer, LR scheduler, the RNG states of
torch/numpy/python, the data position, the step and the config — tensors and plain data only, read back
with `torch.load(weights_only=True)` (see `llama2.train.checkpointing` for the safety rules). `resume=True`
continues from `latest`; a fresh run refuses an `out_dir` that already holds a run unless
`cfg.overwrite`. On CPU in float32 a resumed run ends bit-identical to an uninterrupted one.

Defaults are the Llama 2 paper's recipe (Touvron et al. 2023, sec. 2.2): AdamW with beta1 0.9,
beta2 0.95, eps 1e-5, weight decay 0.1, cosine decay to 10% of the peak LR after a linear warmup,
gradient clipping at 1.0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from llama2.errors import CheckpointError, ConfigError
from llama2.runtime import resolve_device as resolve_device
from llama2.train.checkpointing import (
    CHECKPOINT_KIND,
    CheckpointSaver,
    clear_previous_run,
    prepare_run_dir,
    remove_stale_temp_files,
)

# Checkpoint and config helpers that used to live here, re-exported for existing callers.
from llama2.train.checkpointing import CHECKPOINT_VERSION as CHECKPOINT_VERSION
from llama2.train.checkpointing import checkpoint_dir as checkpoint_dir
from llama2.train.checkpointing import latest_checkpoint as latest_checkpoint
from llama2.train.checkpointing import load_training_checkpoint as load_training_checkpoint
from llama2.train.checkpointing import rng_state as rng_state
from llama2.train.checkpointing import seed_everything as seed_everything
from llama2.train.checkpointing import set_rng_state as set_rng_state
from llama2.train.metrics import MetricsLogger

# The optimizer and LR schedule moved to `llama2.train.optim`; re-exported for existing callers.
from llama2.train.optim import build_optimizer as build_optimizer
from llama2.train.optim import build_scheduler as build_scheduler
from llama2.train.optim import lr_at as lr_at
from llama2.train.optim import param_groups as param_groups
from llama2.train.resume import model_shape, restore_training_state
from llama2.train.run_config import config_from_dict as config_from_dict
from llama2.train.run_config import config_to_dict as config_to_dict
from llama2.train.run_config import save_resolved_config as save_resolved_config
from llama2.train.run_config import to_toml as to_toml

Batch = Any  # Tensor | tuple/list of tensors | dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


@runtime_checkable
class ResumableBatches(Protocol):
    """An endless batch iterator whose position can be saved and restored."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings shared by every training stage."""

    lr: float = field(
        default=3e-4, metadata={"help": "peak learning rate (paper: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B)"}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "cosine decays to min_lr_ratio * lr (paper: 10% of the peak)"}
    )
    warmup_steps: int = field(
        default=100, metadata={"help": "linear warmup from lr/warmup_steps to lr (paper: 2000 steps)"}
    )
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences per micro-batch (read by the data builders)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "applied to matrices (ndim >= 2) only, see `param_groups`"}
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (paper: 0.9)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)"})
    eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon (paper: 1e-5)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables clipping"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "autocast dtype: auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N | mps"}
    )
    compile: bool = field(
        default=False, metadata={"help": "wrap the model in torch.compile for the forward/backward"}
    )
    eval_every: int = field(
        default=100,
        metadata={"help": "evaluate on the validation batches every N steps (0: only at the end)"},
    )
    eval_batches: int = field(default=20, metadata={"help": "validation micro-batches per evaluation"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "how many step checkpoints to keep (older ones are deleted)"}
    )
    log_every: int = field(
        default=10, metadata={"help": "write a train-loss record to metrics.jsonl every N steps"}
    )
    seed: int = field(default=1337, metadata={"help": "seed of the weights init and the batch order"})
    out_dir: Path = field(
        default=Path("runs/train"), metadata={"help": "run folder: checkpoints, metrics, config, model"}
    )
    threads: int = field(
        default=0, metadata={"help": "CPU threads for torch (0: torch's default, one per core)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a tqdm bar"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "start a new run in an out_dir that already holds one (its checkpoints and metrics "
            "are deleted); without it such an out_dir is refused unless resuming"
        },
    )

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        positive = ("max_steps", "batch_size", "grad_accum")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"LoopConfig.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"LoopConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"LoopConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lr > 0:
            raise ConfigError(f"LoopConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"LoopConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"LoopConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )

    def loop_config(self) -> LoopConfig:
        """The plain `LoopConfig` part of a stage's config (which subclasses it with more fields)."""
        names = {f.name for f in dataclasses.fields(LoopConfig)}
        return LoopConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class TrainResult:
    """Summary of a finished `train` call."""

    step: int
    tokens_seen: int
    train_loss: float  # mean loss of the last logged window
    val_loss: float | None  # last evaluation (None without validation data)
    wall_time_s: float  # seconds spent in this call (not counting earlier runs before a resume)
    history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ pieces
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. `auto` is bfloat16 on CUDA (when supported) and float32 elsewhere.

    On CPU, float32 is the conservative default (exact, and the setting under which resumed runs are
    bit-identical). Whether bf16 autocast pays off depends on the CPU: on an AMD EPYC with
    avx512_bf16 (our dev machine) a single-thread A/B run of dim 256-288 models measured bf16 1.55-1.65x
    faster, while CPUs without native bf16 are usually slower. Measure with
    `benchmarks/train_throughput.py --dtype bfloat16` and set `dtype = "bfloat16"` where it wins."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Move a tensor / tuple / list / dict of tensors to `device` (non-tensors unchanged)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(move_to(b, device) for b in batch)
    if isinstance(batch, list):
        return [move_to(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def count_tokens(batch: Batch) -> int:
    """Tokens in a batch: numel of the tensor, of the first tensor of a tuple/list, or of
    `input_ids`/`inputs`/`tokens` (else the first tensor value) of a dict."""
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].numel())
    if isinstance(batch, dict):
        for key in ("input_ids", "inputs", "tokens"):
            if isinstance(batch.get(key), Tensor):
                return int(batch[key].numel())
        for v in batch.values():
            if isinstance(v, Tensor):
                return int(v.numel())
    return 0


# ------------------------------------------------------------------------------------------- loop
def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    val_batches: Iterable[Batch],
    max_batches: int,
    device: torch.device,
    autocast_dtype: torch.dtype = torch.float32,
) -> float:
    """Mean of `loss_fn` over the first `max_batches` batches of a fresh pass over `val_batches`
    (all of them when `max_batches` is 0), each batch weighted by its `count_tokens` (so with equal
    per-token losses and full windows this is the mean NLL per token)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(val_batches):
                if max_batches and i >= max_batches:
                    break
                with _autocast(device, autocast_dtype):
                    loss = loss_fn(model, move_to(batch, device))
                weight = max(1, count_tokens(batch))
                total += float(loss.item()) * weight
                n += weight
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("validation data produced no batches; expected at least one")
    return total / n


def _write_metrics(path: Path, action: Callable[..., object], *args: Any) -> None:
    """Run a metrics write; a full disk (any OSError) becomes one `CheckpointError` line."""
    try:
        action(*args)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: ResumableBatches,
    val_batches: Iterable[Batch] | None,
    cfg: LoopConfig,
    *,
    resume: bool = False,
    trainable: Iterable[nn.Parameter] | None = None,
    tokens_in_batch: Callable[[Batch], int] = count_tokens,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Run the optimisation described by `cfg` (see the module docstring for the contracts).

    Args:
        model: the module to train; it is moved to `cfg.device`.
        loss_fn: `loss_fn(model, batch) -> scalar Tensor`.
        train_batches: endless resumable iterator of micro-batches.
        val_batches: re-iterable validation batches, or None.
        cfg: loop settings.
        resume: continue from the latest checkpoint in `cfg.out_dir/checkpoints` (a fresh start when
            there is none).
        trainable: parameters to optimise (default: all with requires_grad).
        tokens_in_batch: counts the tokens of a micro-batch for tokens/s and tokens_seen.
        extra_state: optional callable whose dict is stored in each checkpoint under "extra".
        on_start: called with the run folder once it and the checkpoint to resume (if any) have been
            checked and restored, before the first step. Stages write their `config.toml` and
            `params.json` here, so a refused run (a changed shape on `--resume`, a folder holding
            another run) leaves every file in the run folder as it was.

    Returns:
        A `TrainResult` with the final step, tokens seen, losses and wall time.
    """
    if not isinstance(train_batches, ResumableBatches):
        raise ConfigError(
            "train_batches must be an iterator with state_dict()/load_state_dict() (e.g. PackedBatches)"
        )
    device = resolve_device(cfg.device)
    amp_dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads < 0:
        raise ConfigError(f"LoopConfig.threads must be >= 0, got {cfg.threads}")
    out_dir = prepare_run_dir(cfg.out_dir, resume=resume, overwrite=cfg.overwrite)
    stale = remove_stale_temp_files(out_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save in {out_dir}")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model.to(device)
    model.train()
    trainable_list = list(trainable) if trainable is not None else None
    optimizer = build_optimizer(model, cfg, trainable_list)
    scheduler = build_scheduler(optimizer, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    step, tokens_seen = 0, 0
    metrics = MetricsLogger(out_dir)
    resumed_from = latest_checkpoint(out_dir) if resume else None
    if resumed_from is not None:
        state = load_training_checkpoint(resumed_from)
        step, tokens_seen = restore_training_state(
            state,
            resumed_from,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data=train_batches,
            config=config_to_dict(cfg),
        )
        del state
        _write_metrics(metrics.path, metrics.truncate_after, step)
        print(f"resumed from {resumed_from} at step {step}")
    else:
        if not resume and cfg.overwrite:  # only now: every check before this point has passed
            n_old = clear_previous_run(out_dir)
            if n_old:
                print(f"overwrite: removed {n_old} checkpoint file(s) of the previous run in {out_dir}")
        _write_metrics(metrics.path, metrics.reset)  # a fresh run (or nothing to resume)
    if on_start is not None:
        on_start(out_dir)
    saver = CheckpointSaver(out_dir, cfg.keep_checkpoints, resumed_from)
    shape = model_shape(model)

    fwd_model: nn.Module = model
    if cfg.compile:
        fwd_model = torch.compile(model)  # type: ignore[assignment]

    def save(step_now: int) -> Path:
        payload: dict[str, Any] = {
            "kind": CHECKPOINT_KIND,
            "version": CHECKPOINT_VERSION,
            "step": step_now,
            "tokens_seen": tokens_seen,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": train_batches.state_dict(),
            "rng": rng_state(),
            "config": config_to_dict(cfg),
            "extra": extra_state() if extra_state is not None else {},
        }
        if shape is not None:
            payload["model_args"] = shape
        return saver.save(step_now, payload)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)

    t_start = time.perf_counter()
    window_loss, window_n = 0.0, 0
    last_train_loss = float("nan")
    val_loss: float | None = None
    rate_tokens, rate_t0 = 0, time.perf_counter()
    history: list[dict[str, Any]] = []
    while step < cfg.max_steps:
        step_loss = 0.0
        step_tokens = 0
        for _ in range(cfg.grad_accum):
            batch = move_to(next(train_batches), device)
            step_tokens += tokens_in_batch(batch)
            with _autocast(device, amp_dtype):
                loss = loss_fn(fwd_model, batch)
            (loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
            step_loss += float(loss.detach().item()) / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step + 1}; lower the learning rate")
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()) if cfg.grad_clip > 0 else 0.0
        )
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        tokens_seen += step_tokens
        rate_tokens += step_tokens
        window_loss += step_loss
        window_n += 1
        last_train_loss = step_loss

        elapsed = time.perf_counter() - rate_t0
        tok_s = rate_tokens / elapsed if elapsed > 0 else 0.0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr_now:.2e}")
        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.max_steps:
            rec = {
                "step": step,
                "split": "train",
                "loss": window_loss / window_n,
                "lr": lr_now,
                "grad_norm": grad_norm,
                "tokens_seen": tokens_seen,
                "tokens_per_s": tok_s,
                "time_s": time.perf_counter() - t_start,
            }
            _write_metrics(metrics.path, metrics.log, rec)
            history.append(rec)
            last_train_loss = window_loss / window_n
            window_loss, window_n = 0.0, 0
            rate_tokens, rate_t0 = 0, time.perf_counter()
        is_last = step == cfg.max_steps
        if val_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
            val_loss = evaluate(fwd_model, loss_fn, val_batches, cfg.eval_batches, device, amp_dtype)
            rec = {"step": step, "split": "val", "loss": val_loss, "tokens_seen": tokens_seen}
            _write_metrics(metrics.path, metrics.log, rec)
            history.append(rec)
            if bar is not None:
                bar.write(f"step {step}: val loss {val_loss:.4f}")
            rate_t0 = time.perf_counter()  # evaluation time is not training throughput
            rate_tokens = 0
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last:
            save(step)
            _write_metrics(metrics.png_path, metrics.plot)
            rate_t0 = time.perf_counter()
            rate_tokens = 0
    if bar is not None:
        bar.close()
    _write_metrics(metrics.png_path, metrics.plot)
    return TrainResult(
        step=step,
        tokens_seen=tokens_seen,
        train_loss=last_train_loss,
        val_loss=val_loss,
        wall_time_s=time.perf_counter() - t_start,
        history=history,
    )


def iterate_forever(make: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    """Restart `make()` whenever it is exhausted (not resumable; for benchmarks and quick tests)."""
    while True:
        yield from make()
