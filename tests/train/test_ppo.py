"""PPO (`llama2.train.ppo`, `llama2.train.ppo_rollout`) on tiny random models.

Oracles: the exact ratio 1 of an unchanged policy (closed form), hand-placed token positions of
crafted samples, hand-computed whitened logits, the paper's R_c rule evaluated in Python over the
drawn prompts' flags, an uninterrupted run (for resume) and a count of evaluations (patience).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llama2.checkpoint.load import load_model
from llama2.checkpoint.reward_io import save_reward_model
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel
from llama2.model.transformer import Transformer
from llama2.tokenizer import Tokenizer
from llama2.train.loop_config import LoopConfig
from llama2.train.metrics import MetricsLogger
from llama2.train.ppo import PPOConfig, PPOStage, run_ppo
from llama2.train.ppo_rollout import (
    ROLLOUT_STATS,
    PPOBatches,
    PPOPrompt,
    pad_samples,
    prompt_pool,
    token_rewards,
)
from llama2.train.pretrain import init_weights, save_model
from llama2.train.reward_scoring import RewardScorer
from llama2.train.rollout import Sample

TOK = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
STEP_METRICS = (
    "reward", "r_h", "r_s", "score_whitened", "kl_k1", "kl_k3", "policy_loss", "value_loss", "clipfrac",
    "vf_clipfrac", "ratio_mean", "approx_kl", "response_len", "eos_rate", "logprob_check",
)  # fmt: skip


def _policy(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    init_weights(model)
    return model


def _reward(seed: int, prob: float | None = None) -> RewardModel:
    """A random reward model; with `prob`, a constant one: sigmoid(score) == prob for every input."""
    torch.manual_seed(seed)
    trunk = Transformer(ARGS)
    init_weights(trunk)
    rm = RewardModel(trunk)
    if prob is not None:
        with torch.no_grad():
            rm.head.weight.zero_()
            rm.head.bias.fill_(math.log(prob / (1 - prob)))
    return rm


def _cfg(**kw: Any) -> PPOConfig:
    base: dict[str, Any] = dict(rollout_batch=4, mini_batch=2, max_new_tokens=6, max_slots=8, patience=2)
    return PPOConfig(**{**base, **kw})


def _setup(
    cfg: PPOConfig,
    h_prob: float | None = None,
    s_prob: float | None = None,
    pool: list[PPOPrompt] | None = None,
) -> tuple[PPOStage, PPOBatches]:
    tok = Tokenizer.from_file(TOK)
    policy = _policy()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    r_h, r_s = _reward(1, h_prob), _reward(2, s_prob)
    value = copy.deepcopy(r_h)
    pool = pool if pool is not None else prompt_pool("train", 2, 0.25, seed=0)
    scorer = RewardScorer(r_h, r_s, tok)
    batches = PPOBatches(policy, value, reference, scorer, tok, pool, cfg.rollout_settings())
    heldout = prompt_pool("heldout", 1, 0.25, seed=1)
    stage = PPOStage(policy, value, reference, r_h, r_s, batches, heldout, tok, cfg)
    return stage, batches


def test_first_minibatch_ratio_is_exactly_one() -> None:
    stage, batches = _setup(_cfg(ppo_epochs=2))
    policy = stage.models["policy"]
    policy.train()
    out = stage.step(next(batches))
    assert out.metrics["ratio_mean"] == 1.0
    assert out.metrics["clipfrac"] == 0.0
    assert out.metrics["approx_kl"] == 0.0
    assert set(STEP_METRICS) <= set(out.metrics)
    assert out.metrics["logprob_check"] < 1e-4  # the engine's logprobs agree with the training forward
    # after an update the next mini-batch of the same rollout no longer has ratio 1
    out.loss.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad.sign())
    assert stage.step(next(batches)).metrics["ratio_mean"] != 1.0


def _sample(prompt: list[int], tokens: list[int], stop: bool) -> Sample:
    return Sample(prompt, tokens, "x", [-1.0] * len(tokens), "stop" if stop else "length")


def test_score_lands_on_eos_and_truncation_gets_no_eos_score() -> None:
    eos = 2
    samples = [
        _sample([1, 5, 6, 7], [10, 11, eos], True),  # EOS at response index 2
        _sample([1, 5], [12, 13, 14, 15], False),  # hit the length limit: last index 3
        _sample([1, 5, 6], [16, eos], True),  # EOS at response index 1
        _sample([1, 9, 9, 9, 9], [eos], True),  # an empty answer: EOS at index 0
    ]
    r_c = torch.tensor([0.7, 0.4, 0.2, 0.9])
    beta, no_eos = 0.05, -1.0
    padded = pad_samples(samples)
    gen = torch.Generator().manual_seed(0)
    old_lp = -torch.rand(padded.mask.shape, generator=gen)
    ref_lp = -torch.rand(padded.mask.shape, generator=gen)
    score, rewards, k1 = token_rewards(padded, r_c, old_lp, ref_lp, beta, no_eos)

    logits = [math.log(p / (1 - p)) for p in r_c.tolist()]  # the oracle: whiten(logit(R_c)) by hand
    mean = sum(logits) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / 3 + 1e-8)
    expected = [(x - mean) / std for x in logits]
    expected[1] = no_eos  # truncated: the configured penalty replaces its whitened score
    assert score.tolist() == pytest.approx(expected, abs=1e-5)

    last = {0: 2, 1: 3, 2: 1, 3: 0}
    extra = rewards + beta * k1  # what is left besides the KL penalty
    for b, idx in last.items():
        n = len(samples[b].tokens)
        assert bool(padded.mask[b, :n].all()) and not bool(padded.mask[b, n:].any())
        assert padded.tokens[b, padded.start[b] + idx].item() == samples[b].tokens[idx]
        for j in range(extra.shape[1]):
            want = expected[b] if j == idx else 0.0
            assert extra[b, j].item() == pytest.approx(want, abs=1e-6)
        assert k1[b, :n].tolist() == pytest.approx((old_lp[b, :n] - ref_lp[b, :n]).tolist(), abs=1e-6)

    # more right padding (longer rows and responses) changes nothing in the real positions
    wide = pad_samples(samples, min_width=9)
    assert wide.mask.shape[1] == 9
    lp2 = torch.zeros(wide.mask.shape)
    ref2 = torch.zeros(wide.mask.shape)
    lp2[:, :4], ref2[:, :4] = old_lp, ref_lp
    score2, rewards2, _ = token_rewards(wide, r_c, lp2, ref2, beta, no_eos)
    assert torch.equal(score2, score)
    assert torch.equal(rewards2[:, :4], rewards)
    assert not bool(rewards2[:, 4:].any())


@pytest.mark.parametrize(("h_prob", "s_prob"), [(0.8, 0.6), (0.8, 0.1)])
def test_combined_reward_switch(h_prob: float, s_prob: float) -> None:
    pool = prompt_pool("train", 1, 0.5, seed=0)
    assert any(p.is_safety for p in pool) and not all(p.is_safety for p in pool)
    _, batches = _setup(_cfg(rollout_batch=8, mini_batch=4), h_prob, s_prob, pool)
    drawn = copy.copy(batches).draw_prompts()  # the prompts the rollout below draws
    stats = dict(zip(ROLLOUT_STATS, next(batches)["stats"].tolist(), strict=True))
    # the paper's rule: R_s for safety prompts or when R_s < 0.15, else R_h
    want = [s_prob if (p.is_safety or s_prob < 0.15) else h_prob for p in drawn]
    assert stats["reward"] == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert stats["r_h"] == pytest.approx(h_prob, abs=1e-6)
    assert stats["r_s"] == pytest.approx(s_prob, abs=1e-6)


def test_should_stop_after_patience() -> None:
    stage, _ = _setup(_cfg(patience=2))
    calls: list[int] = []
    stage.on_best = lambda: calls.append(stage.steps)
    stopped = []
    for _ in range(3):  # the policy never changes: only the first evaluation is an improvement
        with torch.no_grad():
            res = stage.evaluate(0, torch.device("cpu"))
        stopped.append(stage.should_stop())
    assert stopped == [False, False, True]
    assert calls == [0]
    assert set(res) == {"heldout_r_h", "heldout_r_c", "exact_match", "best_r_c"}
    assert 0.0 <= res["exact_match"] <= 1.0
    stage.cfg.patience = 0
    assert not stage.should_stop()


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="multiple of mini_batch"):
        _cfg(rollout_batch=6, mini_batch=4).rollout_settings()
    with pytest.raises(ConfigError, match="grad_accum"):
        run_ppo(_cfg(loop=LoopConfig(grad_accum=2)))


# ------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo")
    save_model(_policy(), ARGS, root / "policy", TOK)
    save_reward_model(_reward(1), root / "rm_h", TOK, {"objective": "helpfulness"})
    save_reward_model(_reward(2), root / "rm_s", TOK, {"objective": "safety"})
    return {"root": root, "policy": root / "policy", "rm_h": root / "rm_h", "rm_s": root / "rm_s"}


def _run_cfg(folders: dict[str, Path], out: str, max_steps: int, resume: bool = False) -> PPOConfig:
    loop = LoopConfig(
        lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, max_steps=max_steps, device="cpu", dtype="float32",
        progress=False, log_every=1, eval_every=2, ckpt_every=0, seed=3, out_dir=folders["root"] / out,
    )  # fmt: skip
    return PPOConfig(
        model=folders["policy"], reward_helpful=folders["rm_h"], reward_safety=folders["rm_s"],
        n_prompts_per_task=2, safety_fraction=0.25, rollout_batch=6, mini_batch=2, max_new_tokens=6,
        max_slots=8, heldout_n_per_task=1, patience=0, resume=resume, loop=loop,
    )  # fmt: skip


def _final_state(out_dir: Path) -> dict[str, Any]:
    ck = out_dir / "checkpoints"
    path = ck / (ck / "latest").read_text().strip()
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def test_short_run_trains_and_resume_is_bit_identical(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = run_ppo(_run_cfg(folders, "full", 4))
    out = folders["root"] / "full"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for name in STEP_METRICS:
        assert all(name in r for r in train), name
    assert train[0]["ratio_mean"] == 1.0 and train[0]["clipfrac"] == 0.0
    assert train[3]["ratio_mean"] == 1.0  # step 4 opens the second rollout (3 mini-batches each)
    assert (out / "metrics.png").is_file()
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4]

    start = load_model(folders["policy"], progress=False).model.state_dict()
    last = load_model(out / "last", progress=False).model.state_dict()
    assert any(not torch.equal(start[k], last[k]) for k in start)  # the policy changed
    best = load_model(out / "model", progress=False).model.state_dict()
    assert set(best) == set(start)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["best_step"] in (2, 4)
    assert summary["best_heldout_r_c"] == pytest.approx(full.best_r_c)
    assert {"heldout_r_h", "heldout_r_c", "exact_match"} <= set(summary["heldout"])

    # Resume: a run that ends (and checkpoints) at step 2, mid-buffer (after 2 of 3 mini-batches),
    # continued to step 4. Plots are skipped here: matplotlib is most of this test's time.
    monkeypatch.setattr(MetricsLogger, "plot_all", lambda self: None)
    run_ppo(_run_cfg(folders, "split", 2))
    run_ppo(_run_cfg(folders, "split", 4, resume=True))
    a, b = _final_state(out), _final_state(folders["root"] / "split")
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["models"]["value"].items():
        assert torch.equal(v, b["models"]["value"][k]), k
    assert a["stage"] == b["stage"]
