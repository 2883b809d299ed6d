"""The trainer's step contract with a toy RLHF-shaped stage: a policy and a value model trained against a
frozen reference with a KL term (frozen models untouched and outside the optimizer, named metrics in
metrics.jsonl and metrics.png, bit-identical resume after an interruption, accumulation = big batch)."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_support import ListBatches

from llama2.errors import CheckpointError, ConfigError
from llama2.train.checkpointing import latest_checkpoint, load_training_checkpoint
from llama2.train.loop_config import LoopConfig
from llama2.train.trainer import StepOutput, fit

V, D, B, T = 11, 8, 4, 6


class Interrupted(Exception):
    pass


def _models(seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V))
    value = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 1))
    return {"policy": policy, "value": value, "reference": copy.deepcopy(policy)}


def _losses(
    models: Mapping[str, nn.Module], tokens: Tensor, baseline: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, nll, kl, value_loss) of one batch of token rows (B, T+1), written out by hand."""
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    logp = models["policy"](x).log_softmax(-1)  # (B, T, V)
    with torch.no_grad():
        ref = models["reference"](x).log_softmax(-1)  # (B, T, V)
    nll = F.nll_loss(logp.flatten(0, 1), y.flatten())
    kl = (logp.exp() * (logp - ref)).sum(-1).mean()  # KL(policy || reference) per token
    reward = (y % 3).float() - baseline  # (B, T) a toy reward, centred by the running baseline
    value_loss = ((models["value"](x).squeeze(-1) - reward) ** 2).mean()
    return nll + 0.1 * kl + 0.5 * value_loss, nll, kl, value_loss


class KLStage:
    """Policy + value trained, reference frozen; a running reward mean as stage state (like PPO's
    whitening statistics), so a resume that lost the stage state would not be bit-identical."""

    def __init__(
        self, models: dict[str, nn.Module], batches: ListBatches, *, running: bool = True, stop_at: int = 0
    ) -> None:
        self.models = models
        self.trainable: dict[str, list[nn.Parameter] | None] = {"policy": None, "value": None}
        self.batches = batches
        self.running, self.stop_at, self.calls = running, stop_at, 0
        self.mean, self.count = 0.0, 0

    def step(self, batch: Tensor) -> StepOutput:
        self.calls += 1
        if self.stop_at and self.calls == self.stop_at:
            raise Interrupted
        if self.running:
            self.count += 1
            self.mean += (float((batch[:, 1:] % 3).float().mean()) - self.mean) / self.count
        loss, _, kl, value_loss = _losses(self.models, batch, self.mean)
        metrics = {"kl": kl.item(), "value_loss": value_loss.item(), "baseline": self.mean}
        return StepOutput(loss, metrics)

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        _, nll, kl, _ = _losses(self.models, self.batches.batches[0].to(device), self.mean)
        return {"loss": nll.item(), "kl": kl.item()}

    def tokens_in(self, batch: Tensor) -> int:
        return batch[:, 1:].numel()

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def _data(n: int, rows: int = B, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (rows, T + 1), generator=g) for _ in range(n)]


def _cfg(out: Path, **kw: Any) -> LoopConfig:
    base: dict[str, Any] = dict(
        lr=1e-2, warmup_steps=2, max_steps=6, eval_every=3, ckpt_every=2, log_every=1, out_dir=out,
        progress=False, device="cpu", keep_checkpoints=5,
    )  # fmt: skip
    base.update(kw)
    return LoopConfig(**base)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_frozen_model_untouched_and_metrics_logged(tmp_path: Path) -> None:
    models = _models(0)
    ref_before = {k: v.clone() for k, v in models["reference"].state_dict().items()}
    policy_before = {k: v.clone() for k, v in models["policy"].state_dict().items()}
    res = fit(KLStage(models, ListBatches(_data(4))), _cfg(tmp_path))
    assert res.step == 6 and res.tokens_seen == 6 * B * T

    ref = models["reference"]
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(p.grad is None for p in ref.parameters())
    assert any(not torch.equal(policy_before[k], v) for k, v in models["policy"].state_dict().items())

    state = load_training_checkpoint(latest_checkpoint(tmp_path) or tmp_path)
    names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]
    assert sorted(names) == sorted(
        [f"policy.{n}" for n, _ in models["policy"].named_parameters()]
        + [f"value.{n}" for n, _ in models["value"].named_parameters()]
    )  # the reference is not in the optimizer ...
    assert len(state["optimizer"]["state"]) == 3 + 3  # embedding, weight, bias of policy and value
    assert set(state["model"]) == {"0.weight", "1.weight", "1.bias"}  # ... nor saved: policy in `model`,
    assert set(state["models"]) == {"value"}  # the other trained model in `models`
    assert state["stage"]["count"] == 6

    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[0]["kl"] == 0.0  # the policy starts as the reference's copy: KL is exactly 0
    assert all(r["kl"] > 0 for r in train[1:]) and all("value_loss" in r for r in train)
    # the baseline is the running mean of the rewards seen so far, computed here independently
    batches = _data(4)
    seen = [float((batches[i % 4][:, 1:] % 3).float().mean()) for i in range(6)]
    assert train[-1]["baseline"] == pytest.approx(sum(seen) / 6, rel=1e-12)
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and all("kl" in r and "loss" in r for r in val)
    assert res.val_loss == val[-1]["loss"] and res.metrics["kl"] == train[-1]["kl"]
    assert _png_size(tmp_path / "loss.png")[0] > 0
    assert _png_size(tmp_path / "metrics.png") == (3 * 450, 320)  # one subplot each: kl, value_loss, baseline


def test_resume_after_interruption_is_bit_identical(tmp_path: Path) -> None:
    full = _models(0)
    fit(KLStage(full, ListBatches(_data(5))), _cfg(tmp_path / "full"))

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):  # dies in step 5, after the step-4 checkpoint
        fit(KLStage(_models(0), ListBatches(_data(5)), stop_at=5), _cfg(out))
    resumed = _models(7)  # other weights: the checkpoint's must replace them
    resumed["reference"] = copy.deepcopy(_models(0)["reference"])  # a stage rebuilds frozen models
    stage = KLStage(resumed, ListBatches(_data(5)))
    res = fit(stage, _cfg(out), resume=True)
    assert res.step == 6 and stage.count == 6
    for name in ("policy", "value", "reference"):
        want, got = full[name].state_dict(), resumed[name].state_dict()
        for k in want:
            assert torch.equal(want[k], got[k]), f"{name}.{k}"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in lines if '"train"' in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulation_equals_one_big_batch_against_a_hand_built_step(tmp_path: Path, clip: float) -> None:
    k = 3
    big = _data(1, rows=k * 2)[0]  # (6, T+1)
    small = [big[i * 2 : (i + 1) * 2] for i in range(k)]
    cfg = _cfg(tmp_path, max_steps=1, warmup_steps=0, grad_clip=clip, grad_accum=k, eval_every=0)
    grads: list[dict[int, Tensor]] = []

    def capture(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        grads.append({id(p): p.grad.clone() for p in params if p.grad is not None})

    models = _models(0)
    handle = register_optimizer_step_pre_hook(capture)
    try:
        fit(KLStage(models, ListBatches(small), running=False), cfg)
    finally:
        handle.remove()

    hand = _models(0)
    loss, *_ = _losses(hand, big, 0.0)  # the mean over all 6 rows = the mean of 3 equal micro-batch means
    loss.backward()  # type: ignore[no-untyped-call]
    params = [p for m in ("policy", "value") for p in hand[m].parameters()]
    if clip:
        total = torch.nn.utils.clip_grad_norm_(params, clip)
        assert total > clip  # clipping is active, so the loop must clip the accumulated gradient
    want = [p.grad for p in params]
    got_by_id = grads[0]
    got = [got_by_id[id(p)] for m in ("policy", "value") for p in models[m].parameters()]
    assert len(got_by_id) == len(params)  # nothing else (the reference) reached the optimizer
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_stage_wiring_is_one_line_error(tmp_path: Path) -> None:
    models = _models(0)
    stage = KLStage(models, ListBatches(_data(2)))
    stage.trainable = {"critic": None}
    with pytest.raises(ConfigError, match=r"stage trains \['critic'\], which are not among its models"):
        fit(stage, _cfg(tmp_path / "a"))
    shared = KLStage({**models, "reference": models["policy"]}, ListBatches(_data(2)))
    with pytest.raises(ConfigError, match="frozen model 'reference' shares parameter"):
        fit(shared, _cfg(tmp_path / "b"))


def test_resume_with_other_trained_models_is_refused(tmp_path: Path) -> None:
    fit(KLStage(_models(0), ListBatches(_data(2))), _cfg(tmp_path, max_steps=2))
    stage = KLStage(_models(0), ListBatches(_data(2)))
    stage.trainable = {"policy": None}  # the value model now frozen
    with pytest.raises(CheckpointError, match=r"trains further models \['value'\], this run trains \[\]"):
        fit(stage, _cfg(tmp_path, max_steps=4), resume=True)


class StoppingStage(KLStage):
    """Asks to stop at its second evaluation (as PPO does when its held-out reward stops improving)."""

    def __init__(self, models: dict[str, nn.Module], batches: ListBatches) -> None:
        super().__init__(models, batches)
        self.evals = 0

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        self.evals += 1
        return super().evaluate(max_batches, device)

    def should_stop(self) -> bool:
        return self.evals >= 2


def test_should_stop_ends_the_run_after_an_evaluation_with_a_checkpoint(tmp_path: Path) -> None:
    res = fit(StoppingStage(_models(0), ListBatches(_data(4))), _cfg(tmp_path, max_steps=12, ckpt_every=5))
    assert res.step == 6  # evaluations at steps 3 and 6; the second one stops the run
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000006.pt"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
