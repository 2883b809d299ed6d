"""One model, one loss: `LossStage` (the stage pretraining, code pretraining and SFT run on the
trainer `llama2.train.trainer.fit`) and `train`, a thin wrapper kept for existing callers
(optimizer and LR schedule: `llama2.train.optim`; checkpoints: `llama2.train.checkpointing`; the
multi-model step contract: `llama2.train.trainer`). Typical use::

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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llama2.errors import ConfigError
from llama2.quant.kernels import prepare_for_compile
from llama2.runtime import resolve_device as resolve_device

# Checkpoint and config helpers that used to live here, re-exported for existing callers.
from llama2.train.checkpointing import CHECKPOINT_VERSION as CHECKPOINT_VERSION
from llama2.train.checkpointing import checkpoint_dir as checkpoint_dir
from llama2.train.checkpointing import latest_checkpoint as latest_checkpoint
from llama2.train.checkpointing import load_training_checkpoint as load_training_checkpoint
from llama2.train.checkpointing import rng_state as rng_state
from llama2.train.checkpointing import seed_everything as seed_everything
from llama2.train.checkpointing import set_rng_state as set_rng_state
from llama2.train.loop_config import LoopConfig as LoopConfig

# The optimizer and LR schedule moved to `llama2.train.optim`; re-exported for existing callers.
from llama2.train.optim import build_optimizer as build_optimizer
from llama2.train.optim import build_scheduler as build_scheduler
from llama2.train.optim import lr_at as lr_at
from llama2.train.optim import param_groups as param_groups
from llama2.train.run_config import config_from_dict as config_from_dict
from llama2.train.run_config import config_to_dict as config_to_dict
from llama2.train.run_config import save_resolved_config as save_resolved_config
from llama2.train.run_config import to_toml as to_toml
from llama2.train.trainer import Batch as Batch
from llama2.train.trainer import ResumableBatches as ResumableBatches
from llama2.train.trainer import StepOutput, fit
from llama2.train.trainer import TrainResult as TrainResult
from llama2.train.trainer import autocast as autocast
from llama2.train.trainer import move_to as move_to
from llama2.train.trainer import resolve_dtype as resolve_dtype

LossFn = Callable[[nn.Module, Batch], Tensor]


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
                with autocast(device, autocast_dtype):
                    loss = loss_fn(model, move_to(batch, device))
                weight = max(1, count_tokens(batch))
                total += float(loss.item()) * weight
                n += weight
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("validation data produced no batches; expected at least one")
    return total / n


class LossStage:
    """The single-model stage: `loss_fn(model, batch)` on `batches`, validation loss on `val_batches`.

    `trainable` restricts training to these parameters (LoRA); default: every parameter with
    `requires_grad`. With `compile`, the forward/backward runs through `torch.compile(model)` (the
    checkpoint still holds the plain model's state)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: ResumableBatches,
        val_batches: Iterable[Batch] | None = None,
        *,
        trainable: Sequence[nn.Parameter] | None = None,
        tokens_in_batch: Callable[[Batch], int] = count_tokens,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        compile: bool = False,
    ) -> None:
        self.models: dict[str, nn.Module] = {"model": model}
        self.trainable: dict[str, Sequence[nn.Parameter] | None] = {"model": trainable}
        self.batches = batches
        self.loss_fn = loss_fn
        self.val_batches = val_batches
        self.tokens_in_batch = tokens_in_batch
        self.extra_state = extra_state
        self.compile = compile
        self._fwd: nn.Module | None = None

    def _forward_model(self) -> nn.Module:
        if self._fwd is None:
            model = self.models["model"]
            if self.compile:
                prepare_for_compile()
            self._fwd = torch.compile(model) if self.compile else model  # type: ignore[assignment]
        return self.models["model"] if self._fwd is None else self._fwd

    def step(self, batch: Batch) -> StepOutput:
        return StepOutput(self.loss_fn(self._forward_model(), batch))

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        if self.val_batches is None:
            return {}
        return {"loss": evaluate(self._forward_model(), self.loss_fn, self.val_batches, max_batches, device)}

    def tokens_in(self, batch: Batch) -> int:
        return self.tokens_in_batch(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.extra_state() if self.extra_state is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # `extra_state` is informational; nothing to restore


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
    """`fit(LossStage(model, loss_fn, ...), cfg)`: the one-model loop (see the module docstring).

    Args:
        model: the module to train; it is moved to `cfg.device`.
        loss_fn: `loss_fn(model, batch) -> scalar Tensor`.
        train_batches: endless resumable iterator of micro-batches.
        val_batches: re-iterable validation batches, or None.
        cfg: loop settings.
        resume: continue from the latest checkpoint in `cfg.out_dir/checkpoints`.
        trainable: parameters to optimise (default: all with requires_grad).
        tokens_in_batch: counts the tokens of a micro-batch for tokens/s and tokens_seen.
        extra_state: optional callable whose dict is stored in each checkpoint under "stage".
        on_start: called with the run folder once it and the checkpoint to resume have been checked.

    Returns:
        A `TrainResult` with the final step, tokens seen, losses and wall time.
    """
    if not isinstance(train_batches, ResumableBatches):
        raise ConfigError(
            "train_batches must be an iterator with state_dict()/load_state_dict() (e.g. PackedBatches)"
        )
    stage = LossStage(
        model, loss_fn, train_batches, val_batches,
        trainable=list(trainable) if trainable is not None else None,
        tokens_in_batch=tokens_in_batch, extra_state=extra_state, compile=cfg.compile,
    )  # fmt: skip
    return fit(stage, cfg.loop_config(), resume=resume, on_start=on_start)


def iterate_forever(make: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    """Restart `make()` whenever it is exhausted (not resumable; for benchmarks and quick tests)."""
    while True:
        yield from make()
