"""The shared training loop: LR schedule (vs transformers), AdamW groups, accumulation, checkpoints."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_support import ListBatches

from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.train.loop import (
    LoopConfig,
    build_optimizer,
    build_scheduler,
    config_from_dict,
    config_to_dict,
    latest_checkpoint,
    load_training_checkpoint,
    lr_at,
    save_resolved_config,
    train,
)
from llama2.train.metrics import MetricsLogger

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _data(n: int, bsz: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, 64, (bsz, 17), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(TINY)
    for p in m.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.05)
    return m


def _cfg(tmp_path: Path, **kw: Any) -> LoopConfig:
    base: dict[str, Any] = {
        "lr": 3e-3,
        "warmup_steps": 2,
        "max_steps": 6,
        "eval_every": 0,
        "ckpt_every": 3,
        "log_every": 1,
        "out_dir": tmp_path,
        "progress": False,
        "device": "cpu",
    }
    base.update(kw)
    return LoopConfig(**base)


def test_lr_schedule_matches_transformers_cosine_with_min_lr() -> None:
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = LoopConfig(lr=3e-4, warmup_steps=10, max_steps=50, min_lr_ratio=0.1)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, 10, 50, min_lr_rate=0.1)
    hf_lambda = hf.lr_lambdas[0]
    for step in range(1, 51):
        assert lr_at(step, cfg) == pytest.approx(cfg.lr * hf_lambda(step), rel=1e-12, abs=1e-15)
    assert lr_at(10, cfg) == pytest.approx(3e-4)
    assert lr_at(30, cfg) == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5))
    assert lr_at(50, cfg) == pytest.approx(3e-5) and lr_at(80, cfg) == pytest.approx(3e-5)
    # the scheduler the loop uses gives step s the LR lr_at(s)
    opt2 = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt2, cfg)
    for step in range(1, 51):
        assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg), rel=1e-12)
        opt2.step()
        sched.step()


def test_adamw_groups_decay_matrices_only() -> None:
    model = _model()
    opt = build_optimizer(model, LoopConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5
    named = dict(model.named_parameters())
    assert set(decay["names"]) == {n for n, p in named.items() if p.ndim == 2}
    assert "tok_embeddings.weight" in decay["names"] and "output.weight" in decay["names"]
    assert set(no_decay["names"]) == {n for n in named if n.endswith("norm.weight")}
    # the decay really happens only on matrices: a zero-gradient AdamW step shrinks by lr*wd
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in named.items()}
    opt.step()
    assert torch.allclose(named["output.weight"], before["output.weight"] * (1 - 3e-4 * 0.1))
    assert torch.equal(named["norm.weight"], before["norm.weight"])
    # trainable= restricts the optimizer (LoRA)
    only = build_optimizer(model, LoopConfig(), trainable=[named["output.weight"], named["norm.weight"]])
    assert [g["names"] for g in only.param_groups] == [["output.weight"], ["norm.weight"]]


def test_grad_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    big = _data(3, 4)
    small = [(x[i : i + 2], y[i : i + 2]) for x, y in big for i in (0, 2)]
    m1, m2 = _model(), _model()
    train(m1, lm_loss, ListBatches(big), None, _cfg(tmp_path / "a", max_steps=3, grad_clip=0.5))
    train(
        m2, lm_loss, ListBatches(small), None, _cfg(tmp_path / "b", max_steps=3, grad_accum=2, grad_clip=0.5)
    )
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=2e-6), n


def test_checkpoints_resume_and_metrics(tmp_path: Path) -> None:
    data = _data(5, 2)
    val = _data(2, 2, seed=1)
    full = _model()
    res = train(full, lm_loss, ListBatches(data), val, _cfg(tmp_path / "full", eval_every=2))
    assert res.step == 6 and res.tokens_seen == 6 * 2 * 16 and res.val_loss is not None

    out = tmp_path / "part"
    part = _model()
    train(
        part,
        lm_loss,
        ListBatches(data),
        val,
        _cfg(out, eval_every=2, max_steps=6, ckpt_every=3, keep_checkpoints=1),
    )
    ck = sorted((out / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ck] == ["step_0000006.pt"]  # keep_checkpoints=1
    assert not list((out / "checkpoints").glob(".*tmp*"))  # no temporary files left behind
    assert latest_checkpoint(out) == ck[0]
    state = load_training_checkpoint(ck[0])
    assert state["step"] == 6 and state["data"] == {"pos": 6}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert set(state) >= {"model", "optimizer", "scheduler", "config"}

    # resume from step 3: run 3 steps, "crash", run again with resume=True
    out2 = tmp_path / "resumed"
    m = _model()
    train(
        m,
        lm_loss,
        ListBatches(data),
        val,
        _cfg(out2, eval_every=2, max_steps=6, ckpt_every=3, keep_checkpoints=5),
    )
    (out2 / "checkpoints" / "step_0000006.pt").unlink()
    (out2 / "checkpoints" / "latest").write_text("step_0000003.pt\n")
    fresh = _model(seed=123)  # weights are replaced by the checkpoint's
    train(fresh, lm_loss, ListBatches(data), val, _cfg(out2, eval_every=2), resume=True)
    for (n, a), b in zip(full.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    recs = MetricsLogger(out2).read()
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if r["split"] == "val"] == [2, 4, 6]
    assert (out2 / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_validation_and_toml_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        LoopConfig(max_steps=0)
    with pytest.raises(ConfigError, match="dtype"):
        LoopConfig(dtype="int8")
    cfg = LoopConfig(lr=1e-3, out_dir=tmp_path / "x", compile=True)
    path = save_resolved_config(cfg, tmp_path)
    data = tomllib.loads(path.read_text())
    assert data == config_to_dict(cfg)
    assert config_from_dict(LoopConfig, data) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        config_from_dict(LoopConfig, {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="state_dict"):
        train(_model(), lm_loss, iter(_data(2, 2)), None, _cfg(tmp_path / "y"))  # type: ignore[arg-type]
