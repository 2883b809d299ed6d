"""The trainer: one loop for every training stage, driven by a step contract.

The loop (`fit`) owns the optimizer, the LR schedule, gradient accumulation, clipping, evaluation,
checkpoints, resume, RNG, progress and metrics. A stage owns its models, its data and its loss: it is
any object with the `Stage` attributes and methods, e.g. a policy trained against a frozen reference::

    class KLStage:
        def __init__(self, policy, reference, batches):
            self.models = {"policy": policy, "reference": reference}
            self.trainable = {"policy": None}       # None: every parameter that requires grad
            self.batches = batches                  # endless, with state_dict()/load_state_dict()

        def step(self, batch) -> StepOutput:        # batch is already on the device
            logp = policy(batch).log_softmax(-1)
            with torch.no_grad():
                ref = reference(batch).log_softmax(-1)
            kl = (logp.exp() * (logp - ref)).sum(-1).mean()
            return StepOutput(loss=nll + 0.1 * kl, metrics={"kl": float(kl)})

        def evaluate(self, max_batches, device) -> dict[str, float]: return {}
        def tokens_in(self, batch) -> int: return batch.numel()
        def state_dict(self) -> dict[str, Any]: return {}
        def load_state_dict(self, state) -> None: ...

    result = fit(KLStage(...), LoopConfig(...), resume=True)

Decisions:
  - Models named in `stage.trainable` are trained; the others are frozen: `requires_grad_(False)`, kept
    in eval mode, never put in the optimizer and never saved (a stage rebuilds them from their source;
    a resume needs nothing from them). A parameter shared by a frozen and a trainable model is refused.
  - All trainable models share ONE AdamW optimizer (two parameter groups, decay / no decay, over every
    trainable model) and one LR schedule. One optimizer keeps clipping global (one norm over all
    trainable parameters, as a single model would have) and the checkpoint small; a stage that wants
    different learning rates per model runs as two stages. Parameter names in the groups are prefixed
    `<model>.` when more than one model trains.
  - One optimizer step = `cfg.grad_accum` calls of `stage.step`; each loss is divided by `grad_accum`
    (the step's gradient is the mean over the micro-batches), each named metric is averaged the same
    way and again over the `log_every` window before it is written to `metrics.jsonl` next to `loss`.
    `metrics.png` gets one subplot per named metric (`loss.png` keeps train/val loss).
  - Early stopping: a stage may define `should_stop() -> bool`; it is asked after each evaluation,
    and True ends the run there (a checkpoint is written, as at the last step). PPO stops when its
    held-out reward has not improved for `patience` evaluations.
  - A checkpoint holds the first trainable model under `model` (what single-model tools read), the
    other trainable models under `models`, the optimizer, scheduler, RNG, data position, the stage's
    own `state_dict()` under `stage`, the step and the config — plain data, read back with
    `weights_only=True` (`llama2.train.checkpointing`). On CPU in float32 a resumed run ends
    bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from llama2.errors import CheckpointError, ConfigError
from llama2.runtime import resolve_device
from llama2.train.checkpointing import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    CheckpointSaver,
    clear_previous_run,
    latest_checkpoint,
    load_training_checkpoint,
    prepare_run_dir,
    remove_stale_temp_files,
    rng_state,
    seed_everything,
)
from llama2.train.loop_config import LoopConfig
from llama2.train.metrics import RESERVED_KEYS, MetricsLogger
from llama2.train.optim import build_optimizer_named, build_scheduler
from llama2.train.resume import model_shape, restore_training_state
from llama2.train.run_config import config_to_dict

Batch = Any  # Tensor | tuple/list of tensors | dict[str, Tensor]


@runtime_checkable
class ResumableBatches(Protocol):
    """An endless batch iterator whose position can be saved and restored."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class StepOutput:
    """What a stage's `step` returns: the micro-batch's scalar mean loss (with its graph) and named
    metrics (plain floats, e.g. `kl`, `reward_mean`) that are averaged, logged and plotted."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Stage(Protocol):
    """The step contract between a training stage and `fit` (see the module docstring)."""

    @property
    def models(self) -> Mapping[str, nn.Module]:
        """Every model the stage uses: policy, reference, reward, value ..."""
        ...

    @property
    def trainable(self) -> Mapping[str, Sequence[nn.Parameter] | None]:
        """The trained models' names -> their trained parameters (None: all that require grad)."""
        ...

    @property
    def batches(self) -> ResumableBatches:
        """The training micro-batches."""
        ...

    def step(self, batch: Batch) -> StepOutput:
        """Loss and metrics of one micro-batch (already on the device, under autocast)."""
        ...

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        """Named validation metrics (`loss` is plotted with the train loss); {} for none. Runs under
        `torch.no_grad()` and autocast with every model in eval mode; moves its own batches."""
        ...

    def tokens_in(self, batch: Batch) -> int:
        """Tokens in a micro-batch (for tokens/s and tokens_seen)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Stage-specific state saved in each checkpoint (plain data and tensors), e.g. running stats."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """Summary of a finished `fit` call."""

    step: int
    tokens_seen: int
    train_loss: float  # mean loss of the last logged window
    val_loss: float | None  # last evaluation's `loss` (None without one)
    wall_time_s: float  # seconds spent in this call (not counting earlier runs before a resume)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged named train metrics


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


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` for bf16/fp16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _write_metrics(path: Path, action: Callable[..., object], *args: Any) -> None:
    """Run a metrics write; a full disk (any OSError) becomes one `CheckpointError` line."""
    try:
        action(*args)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def _split_models(stage: Stage) -> tuple[dict[str, list[tuple[str, nn.Parameter]]], list[str]]:
    """(trainable model name -> its named trainable parameters, frozen model names); checks the names."""
    unknown = [n for n in stage.trainable if n not in stage.models]
    if unknown:
        raise ConfigError(f"stage trains {unknown}, which are not among its models {list(stage.models)}")
    if not stage.trainable:
        raise ConfigError(f"stage trains none of its models {list(stage.models)}; expected at least one")
    named: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, params in stage.trainable.items():
        items = list(stage.models[name].named_parameters())
        if params is not None:
            wanted = {id(p) for p in params}
            items = [(n, p) for n, p in items if id(p) in wanted]
        named[name] = [(n, p) for n, p in items if p.requires_grad]
    frozen = [n for n in stage.models if n not in stage.trainable]
    trained_ids = {id(p) for items in named.values() for _, p in items}
    for name in frozen:
        shared = [n for n, p in stage.models[name].named_parameters() if id(p) in trained_ids]
        if shared:
            raise ConfigError(
                f"frozen model {name!r} shares parameter {shared[0]!r} with a trained model; "
                "expected a separate copy (e.g. copy.deepcopy) for a reference model"
            )
    return named, frozen


# ------------------------------------------------------------------------------------------- fit
def fit(
    stage: Stage,
    cfg: LoopConfig,
    *,
    resume: bool = False,
    on_start: Callable[[Path], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `stage` as `cfg` says (see the module docstring for the contract).

    Args:
        stage: models, trainable parameters, batches and the step function.
        cfg: loop settings (optimizer, schedule, accumulation, evaluation, checkpoints, ...).
        resume: continue from the latest checkpoint in `cfg.out_dir/checkpoints` (a fresh start when
            there is none).
        on_start: called with the run folder once it and the checkpoint to resume (if any) have been
            checked and restored, before the first step (stages write `config.toml` here, so a refused
            run leaves every file as it was).
        config: the settings stored in checkpoints and compared on resume (default: `cfg`'s fields).

    Returns:
        A `TrainResult` with the final step, tokens seen, losses, metrics and wall time.
    """
    if not isinstance(stage.batches, ResumableBatches):
        raise ConfigError(
            "the stage's batches must be an iterator with state_dict()/load_state_dict() (e.g. PackedBatches)"
        )
    device = resolve_device(cfg.device)
    amp_dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads < 0:
        raise ConfigError(f"LoopConfig.threads must be >= 0, got {cfg.threads}")
    saved_config = dict(config) if config is not None else config_to_dict(cfg)
    for model in stage.models.values():
        model.to(device)  # before collecting parameters, so the optimizer holds the moved ones
    named, frozen = _split_models(stage)
    out_dir = prepare_run_dir(cfg.out_dir, resume=resume, overwrite=cfg.overwrite)
    stale = remove_stale_temp_files(out_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save in {out_dir}")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    for name, model in stage.models.items():
        if name in frozen:
            model.requires_grad_(False)
            model.eval()
        else:
            model.train()
    prefix = len(named) > 1
    optimizer = build_optimizer_named(
        [(f"{m}.{n}" if prefix else n, p) for m, items in named.items() for n, p in items], cfg
    )
    scheduler = build_scheduler(optimizer, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trained = list(named)
    primary, others = stage.models[trained[0]], {n: stage.models[n] for n in trained[1:]}

    step, tokens_seen = 0, 0
    metrics = MetricsLogger(out_dir)
    resumed_from = latest_checkpoint(out_dir) if resume else None
    if resumed_from is not None:
        state = load_training_checkpoint(resumed_from)
        step, tokens_seen = restore_training_state(
            state, resumed_from, model=primary, optimizer=optimizer, scheduler=scheduler,
            data=stage.batches, config=saved_config, other_models=others,
        )  # fmt: skip
        stage.load_state_dict(state.get("stage", {}))
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
    shape = model_shape(primary)

    def save(step_now: int) -> Path:
        payload: dict[str, Any] = {
            "kind": CHECKPOINT_KIND,
            "version": CHECKPOINT_VERSION,
            "step": step_now,
            "tokens_seen": tokens_seen,
            "model": primary.state_dict(),
            "models": {n: m.state_dict() for n, m in others.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": stage.batches.state_dict(),
            "rng": rng_state(),
            "config": saved_config,
            "stage": stage.state_dict(),
        }
        if shape is not None:
            payload["model_args"] = shape
        return saver.save(step_now, payload)

    def run_eval() -> dict[str, float]:
        modes = {n: m.training for n, m in stage.models.items()}
        for m in stage.models.values():
            m.eval()
        try:
            with torch.no_grad(), autocast(device, amp_dtype):
                return {k: float(v) for k, v in stage.evaluate(cfg.eval_batches, device).items()}
        finally:
            for n, m in stage.models.items():
                m.train(modes[n])

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)

    t_start = time.perf_counter()
    window_loss, window_n = 0.0, 0
    window_metrics: dict[str, float] = {}
    last_train_loss = float("nan")
    last_metrics: dict[str, float] = {}
    val_loss: float | None = None
    rate_tokens, rate_t0 = 0, time.perf_counter()
    history: list[dict[str, Any]] = []
    stopped_early = False
    while step < cfg.max_steps:
        step_loss = 0.0
        step_tokens = 0
        for _ in range(cfg.grad_accum):
            batch = move_to(next(stage.batches), device)
            step_tokens += stage.tokens_in(batch)
            with autocast(device, amp_dtype):
                out = stage.step(batch)
            (out.loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
            step_loss += float(out.loss.detach().item()) / cfg.grad_accum
            for k, v in out.metrics.items():
                if k in RESERVED_KEYS:
                    raise ConfigError(
                        f"stage metric {k!r} clashes with a loop record key; expected a name outside "
                        f"{sorted(RESERVED_KEYS)}"
                    )
                window_metrics[k] = window_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
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
            last_metrics = {k: v / window_n for k, v in window_metrics.items()}
            rec = {
                "step": step,
                "split": "train",
                "loss": window_loss / window_n,
                "lr": lr_now,
                "grad_norm": grad_norm,
                "tokens_seen": tokens_seen,
                "tokens_per_s": tok_s,
                "time_s": time.perf_counter() - t_start,
                **last_metrics,
            }
            _write_metrics(metrics.path, metrics.log, rec)
            history.append(rec)
            last_train_loss = window_loss / window_n
            window_loss, window_n, window_metrics = 0.0, 0, {}
            rate_tokens, rate_t0 = 0, time.perf_counter()
        is_last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
            val = run_eval()
            stop_check = getattr(stage, "should_stop", None)  # optional: early stopping on held-out scores
            if callable(stop_check) and stop_check() and not is_last:
                stopped_early, is_last = True, True
            if val:
                clash = [k for k in val if k in RESERVED_KEYS and k != "loss"]
                if clash:
                    raise ConfigError(f"stage evaluation metric {clash[0]!r} clashes with a loop record key")
                val_loss = val.get("loss", val_loss)
                rec = {"step": step, "split": "val", **val, "tokens_seen": tokens_seen}
                _write_metrics(metrics.path, metrics.log, rec)
                history.append(rec)
                if bar is not None and "loss" in val:
                    bar.write(f"step {step}: val loss {val['loss']:.4f}")
            rate_t0 = time.perf_counter()  # evaluation time is not training throughput
            rate_tokens = 0
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last:
            save(step)
            _write_metrics(metrics.png_path, metrics.plot_all)
            rate_t0 = time.perf_counter()
            rate_tokens = 0
        if stopped_early:
            print(f"early stop at step {step}: the stage's held-out score stopped improving")
            break
    if bar is not None:
        bar.close()
    _write_metrics(metrics.png_path, metrics.plot_all)
    return TrainResult(
        step=step,
        tokens_seen=tokens_seen,
        train_loss=last_train_loss,
        val_loss=val_loss,
        wall_time_s=time.perf_counter() - t_start,
        history=history,
        metrics=last_metrics,
    )
