"""Optimizer and learning-rate schedule of the training loop: AdamW parameter groups and the
warmup + cosine schedule of the Llama 2 paper (Touvron et al. 2023, sec. 2.2).

The functions take any settings object with the fields of `OptimSettings` (`LoopConfig` and every
stage config have them), so this module does not import the loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from llama2.errors import ConfigError


class OptimSettings(Protocol):
    """The `LoopConfig` fields the optimizer and the schedule read."""

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float


def lr_at(step: int, cfg: OptimSettings) -> float:
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
    model: nn.Module, cfg: OptimSettings, trainable: Iterable[nn.Parameter] | None = None
) -> torch.optim.AdamW:
    """AdamW over `trainable` (default: all parameters that require grad) with `param_groups`."""
    named = list(model.named_parameters())
    if trainable is not None:
        wanted = {id(p) for p in trainable}
        named = [(n, p) for n, p in named if id(p) in wanted]
    return build_optimizer_named(named, cfg)


def build_optimizer_named(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimSettings) -> torch.optim.AdamW:
    """AdamW over named parameters (those with requires_grad), split by `param_groups`; parameters
    listed twice (shared between models) are optimised once."""
    seen: set[int] = set()
    unique = []
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    groups = [g for g in param_groups(unique, cfg.weight_decay) if g["params"]]
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose epoch counter is the number of optimizer steps taken; the LR for step s
    (1-based) is `lr_at(s, cfg)`. (A plain function, so the scheduler state holds only counters.)"""

    def factor(k: int) -> float:  # multiplier of the peak LR after k scheduler steps (= step k+1)
        return lr_at(k + 1, cfg) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
