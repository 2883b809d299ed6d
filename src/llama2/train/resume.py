"""Resuming a training run: check that a loaded checkpoint fits this run, then restore it.

Every mismatch (model shape, tensor names or shapes, trainable parameters, data position, RNG state)
is one `CheckpointError` line naming what differs, e.g. `resume: checkpoint step_0000010.pt was saved
with dim=64, this run has dim=128`, raised before the model is touched where it can be checked first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2.errors import CheckpointError, Llama2Error
from llama2.train.checkpointing import set_rng_state


def model_shape(model: nn.Module) -> dict[str, Any] | None:
    """The model's shape as plain data (`ModelArgs.to_params_json()`), when the model carries one."""
    to_json = getattr(getattr(model, "args", None), "to_params_json", None)
    return dict(to_json()) if callable(to_json) else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _check_model_fits(state: Mapping[str, Any], name: str, model: nn.Module) -> None:
    where = f"resume: checkpoint {name}"
    saved, current = state.get("model_args"), model_shape(model)
    if isinstance(saved, dict) and current is not None and saved != current:
        keys = [k for k in dict.fromkeys([*current, *saved]) if saved.get(k) != current.get(k)]
        was = ", ".join(f"{k}={saved.get(k, '(unset)')}" for k in keys)
        now = ", ".join(f"{k}={current.get(k, '(unset)')}" for k in keys)
        raise CheckpointError(f"{where} was saved with {was}, this run has {now}")
    have = model.state_dict()
    ckpt = state["model"]
    missing = [k for k in have if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{where} lacks model tensor {missing[0]!r} ({len(missing)} missing) that this run's model has; "
            "expected the same model and LoRA settings"
        )
    extra = [k for k in ckpt if k not in have]
    if extra:
        raise CheckpointError(
            f"{where} has model tensor {extra[0]!r} ({len(extra)} in all) that this run's model lacks; "
            "expected the same model and LoRA settings"
        )
    for k, t in have.items():
        if tuple(ckpt[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where} has {k} of shape {tuple(ckpt[k].shape)}, this run's model has {tuple(t.shape)}"
            )


def _check_optimizer_fits(state: Mapping[str, Any], name: str, optimizer: torch.optim.Optimizer) -> None:
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise CheckpointError(f"resume: checkpoint {name} has a malformed optimizer state (no param_groups)")
    saved = [len(g["params"]) for g in groups]
    current = [len(g["params"]) for g in optimizer.param_groups]
    saved_names = [g.get("names") for g in groups]
    current_names = [g.get("names") for g in optimizer.param_groups]
    if saved != current or (all(saved_names) and all(current_names) and saved_names != current_names):
        raise CheckpointError(
            f"resume: checkpoint {name} trains {sum(saved)} parameter tensors (groups {saved}), this run "
            f"trains {sum(current)} (groups {current}); expected the same trainable parameters"
        )


def restore_training_state(
    state: Mapping[str, Any],
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: Any,
    config: Mapping[str, Any],
    other_models: Mapping[str, nn.Module] | None = None,
) -> tuple[int, int]:
    """Check that a loaded checkpoint fits this run, then restore model, optimizer, scheduler, data
    position and RNG states. Returns (step, tokens_seen). `model` is the checkpoint's `model`;
    `other_models` are the further trained models of a multi-model stage, saved under `models`.

    Raises:
        CheckpointError: one line naming what differs (model shape, tensors, trainable parameters,
            data position) between the checkpoint and this run.
    """
    name = path.name
    _check_model_fits(state, name, model)
    others = dict(other_models or {})
    saved_models = state.get("models", {})
    if not isinstance(saved_models, dict) or sorted(saved_models) != sorted(others):
        have = sorted(saved_models) if isinstance(saved_models, dict) else []
        raise CheckpointError(
            f"resume: checkpoint {name} trains further models {have}, this run trains {sorted(others)}; "
            "expected the same stage"
        )
    for other, m in others.items():
        _check_model_fits({"model": saved_models[other]}, f"{name} (model {other!r})", m)
    _check_optimizer_fits(state, name, optimizer)
    parts: list[tuple[str, Any, Any]] = [
        ("model", model, state["model"]),
        *((f"model {n!r}", m, saved_models[n]) for n, m in others.items()),
        ("optimizer", optimizer, state["optimizer"]),
        ("scheduler", scheduler, state["scheduler"]),
        ("data position", data, state["data"]),
    ]
    for what, target, saved in parts:
        try:
            target.load_state_dict(saved)
        except Llama2Error:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"resume: checkpoint {name}'s {what} does not fit this run ({_one_line(e)})"
            ) from None
    set_rng_state(state["rng"])
    saved_cfg = state["config"]
    ignored = {"out_dir", "progress", "threads", "overwrite", "device"}
    changed = [k for k in config if k not in ignored and k in saved_cfg and saved_cfg[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved_cfg[k]!r} -> {config[k]!r}" for k in changed)
        print(f"resume: settings changed since {name}: {diffs}")
    return int(state["step"]), int(state["tokens_seen"])
