"""Shared training-loop pieces: optimizer groups, LR schedule, checkpoints, and the `train` loop.

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
torch/numpy/python, the data position, the step and the config. `resume=True` continues from `latest`.
On CPU in float32 a resumed run ends bit-identical to an uninterrupted one.

Defaults are the Llama 2 paper's recipe (Touvron et al. 2023, sec. 2.2): AdamW with beta1 0.9,
beta2 0.95, eps 1e-5, weight decay 0.1, cosine decay to 10% of the peak LR after a linear warmup,
gradient clipping at 1.0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from llama2.errors import CheckpointError, ConfigError
from llama2.train.metrics import MetricsLogger

Batch = Any  # Tensor | tuple/list of tensors | dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]

CHECKPOINT_VERSION = 1
_C = TypeVar("_C")


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
def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e}); expected auto, cpu, cuda or cuda:N") from None


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


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Learning rate used for optimizer step `step` (1-based).

    Linear warmup over `warmup_steps` (step 1 gets lr/warmup_steps, step `warmup_steps` gets lr),
    then a half cosine from lr down to `min_lr_ratio * lr` at `max_steps`; constant after that.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return peak * step / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    if decay_steps <= 0 or step >= cfg.max_steps:
        return floor if decay_steps > 0 else peak
    progress = (step - cfg.warmup_steps) / decay_steps  # in (0, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into two AdamW groups: decay for matrices (ndim >= 2: attention/FFN weights,
    token embeddings and output head), no decay for vectors (RMSNorm gains, biases).

    The Llama 2 paper states only "weight decay of 0.1"; decaying matrices and not gains/biases is the
    usual reading (nanoGPT, llama2.c) — shrinking a norm gain towards 0 is not a regulariser.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, p in params:
        if not p.requires_grad:
            continue
        if p.ndim >= 2:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(
    model: nn.Module, cfg: LoopConfig, trainable: Iterable[nn.Parameter] | None = None
) -> torch.optim.AdamW:
    """AdamW over `trainable` (default: all parameters that require grad) with `param_groups`."""
    named = list(model.named_parameters())
    if trainable is not None:
        wanted = {id(p) for p in trainable}
        named = [(n, p) for n, p in named if id(p) in wanted]
    groups = [g for g in param_groups(named, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ConfigError("no trainable parameters: every parameter has requires_grad=False")
    fused = None
    if all(p.is_cuda for g in groups for p in g["params"]):
        fused = True
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose epoch counter is the number of optimizer steps taken; the LR for step s
    (1-based) is `lr_at(s, cfg)`. (A plain function, so the scheduler state holds only counters.)"""

    def factor(k: int) -> float:  # multiplier of the peak LR after k scheduler steps (= step k+1)
        return lr_at(k + 1, cfg) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)


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


# ---------------------------------------------------------------------------- RNG and checkpoints
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint named by `<out_dir>/checkpoints/latest`, or None when there is none."""
    ckdir = checkpoint_dir(out_dir)
    pointer = ckdir / "latest"
    if pointer.is_file():
        path = ckdir / pointer.read_text(encoding="utf-8").strip()
        if path.is_file():
            return path
    found = sorted(ckdir.glob("step_*.pt"))
    return found[-1] if found else None


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read one of our training checkpoints (trusted: written by `train`, contains RNG states)."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read training checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("kind") != "llama2-train-checkpoint":
        raise CheckpointError(f"{path}: not a llama2 training checkpoint (expected one written by train())")
    return state


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as a JSON/TOML-friendly dict (Paths -> str, nested dataclasses flattened to dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def config_from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Rebuild a config dataclass from `config_to_dict` output (or a parsed TOML file): `Path` fields
    are converted back; unknown keys raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        hint = hints[k]
        is_path = hint is Path or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and Path in typing.get_args(hint)
        )
        kwargs[k] = Path(v) if is_path and isinstance(v, str) else v
    return cls(**kwargs)


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialise a flat mapping (str/int/float/bool/list, None values skipped) as TOML."""
    lines = []
    tables = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((key, value))
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string literal is a valid TOML basic string


def save_resolved_config(cfg: Any, out_dir: Path, name: str = "config") -> Path:
    """Write the final resolved config dataclass as `<out_dir>/<name>.toml` (loadable with `--config`)."""
    path = Path(out_dir) / f"{name}.toml"
    atomic_write_text(path, to_toml(config_to_dict(cfg)))
    return path


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

    Returns:
        A `TrainResult` with the final step, tokens seen, losses and wall time.
    """
    if not isinstance(train_batches, ResumableBatches):
        raise ConfigError(
            "train_batches must be an iterator with state_dict()/load_state_dict() (e.g. PackedBatches)"
        )
    device = resolve_device(cfg.device)
    amp_dtype = resolve_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.threads < 0:
        raise ConfigError(f"LoopConfig.threads must be >= 0, got {cfg.threads}")
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
    if resume:
        path = latest_checkpoint(out_dir)
        if path is not None:
            state = load_training_checkpoint(path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            train_batches.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            metrics.truncate_after(step)
            print(f"resumed from {path} at step {step}")
        else:
            metrics.reset()  # nothing to resume: a fresh run
    else:
        metrics.reset()

    fwd_model: nn.Module = model
    if cfg.compile:
        fwd_model = torch.compile(model)  # type: ignore[assignment]

    def save(step_now: int) -> Path:
        ckdir = checkpoint_dir(out_dir)
        path = ckdir / f"step_{step_now:07d}.pt"
        payload: dict[str, Any] = {
            "kind": "llama2-train-checkpoint",
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
        atomic_torch_save(payload, path)
        atomic_write_text(ckdir / "latest", path.name + "\n")
        old = sorted(ckdir.glob("step_*.pt"))[: -cfg.keep_checkpoints]
        for p in old:
            p.unlink(missing_ok=True)
        return path

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
            metrics.log(rec)
            history.append(rec)
            last_train_loss = window_loss / window_n
            window_loss, window_n = 0.0, 0
            rate_tokens, rate_t0 = 0, time.perf_counter()
        is_last = step == cfg.max_steps
        if val_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
            val_loss = evaluate(fwd_model, loss_fn, val_batches, cfg.eval_batches, device, amp_dtype)
            rec = {"step": step, "split": "val", "loss": val_loss, "tokens_seen": tokens_seen}
            metrics.log(rec)
            history.append(rec)
            if bar is not None:
                bar.write(f"step {step}: val loss {val_loss:.4f}")
            rate_t0 = time.perf_counter()  # evaluation time is not training throughput
            rate_tokens = 0
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last:
            save(step)
            metrics.plot()
            rate_t0 = time.perf_counter()
            rate_tokens = 0
    if bar is not None:
        bar.close()
    metrics.plot()
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
