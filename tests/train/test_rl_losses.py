"""`llama2.train.rl_losses` against independent oracles (torchtune's `rlhf`, TRL's reward loss, torch's
exact categorical KL) and closed forms. Oracles are loaded by `rl_oracles` (see there; `make setup`)."""

from __future__ import annotations

import math

import pytest
import torch
from rl_oracles import Torchtune, load_torchtune, trl_reward_loss
from torch import Tensor

from llama2.errors import ConfigError
from llama2.train.rl_losses import (
    MARGINS,
    RATINGS,
    SAFETY_THRESHOLD,
    combine_rewards,
    dpo_loss,
    gae,
    kl_estimates,
    margin_for,
    margin_ranking_loss,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    safe_logit,
    score_index,
    shaped_rewards,
    whiten,
)

B, T = 5, 9
LENGTHS = torch.tensor([9, 4, 1, 6, 7])  # response lengths (EOS included), right padded to T


@pytest.fixture(scope="module")
def tt() -> Torchtune:
    return load_torchtune()


def _mask(lengths: Tensor = LENGTHS, steps: int = T) -> Tensor:
    return torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T) bool


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- reward-model ranking loss ----------------------------------------------------------------


def test_margin_tables_exact() -> None:
    assert RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert MARGINS["none"] == dict.fromkeys(RATINGS, 0.0)
    assert MARGINS["small"] == dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0), strict=True))
    assert MARGINS["large"] == dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0), strict=True))
    m = margin_for(["better", "negligibly_better", "significantly_better", "slightly_better"], "large")
    assert m.dtype == torch.float32
    assert m.tolist() == [2.0, 0.0, 3.0, 1.0]
    assert margin_for(["slightly_better"], "small").item() == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="margin table"):
        margin_for(["better"], "medium")
    with pytest.raises(ConfigError, match="much_better"):
        margin_for(["better", "much_better"], "small")


@pytest.mark.parametrize("table", ["none", "small", "large", None])
def test_margin_ranking_loss_matches_trl(table: str | None) -> None:
    oracle = trl_reward_loss()
    chosen, rejected = torch.randn(8) * 2, torch.randn(8) * 2
    ratings = [RATINGS[i % 4] for i in torch.randint(0, 4, (8,)).tolist()]
    margin = None if table is None else margin_for(ratings, table)
    ours = margin_ranking_loss(chosen, rejected, margin)
    _close(ours, oracle(chosen, rejected, margin))
    if table == "large":  # the margin matters: a larger margin asks for a larger score gap
        assert ours > margin_ranking_loss(chosen, rejected)


# ---- whitening ------------------------------------------------------------------------------------


def test_masked_mean_matches_torchtune(tt: Torchtune) -> None:
    x, mask = torch.randn(B, T), _mask()
    _close(masked_mean(x, mask), tt.rewards.masked_mean(x, mask))
    _close(masked_mean(x, mask, dim=1), tt.rewards.masked_mean(x, mask, dim=1))
    _close(masked_mean(x, mask, dim=0), tt.rewards.masked_mean(x, mask, dim=0))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_whiten_matches_torchtune(tt: Torchtune) -> None:
    # torchtune 0.6.1 inverts TRL's `shift_mean` flag (its True adds the mean back): compare crosswise.
    x, mask = torch.randn(B, T) * 3 + 2, _mask()
    _close(whiten(x), tt.rewards.whiten(x, shift_mean=False))
    _close(whiten(x, shift_mean=False), tt.rewards.whiten(x, shift_mean=True))
    _close(masked_whiten(x, mask)[mask], tt.rewards.whiten(x, mask=mask, shift_mean=False)[mask])
    _close(masked_whiten(x, mask, shift_mean=False)[mask], tt.rewards.whiten(x, mask=mask)[mask])
    w = masked_whiten(x, mask)[mask]  # closed form: zero mean, unit unbiased variance on the mask
    assert abs(w.mean().item()) < 1e-5
    assert w.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    one = masked_whiten(x, _mask(torch.tensor([1, 0, 0, 0, 0])))  # one entry: no nan, 0
    assert one[0, 0].item() == 0.0


def test_safe_logit() -> None:
    x = torch.linspace(-6, 6, 13)
    _close(safe_logit(torch.sigmoid(x)), x)
    ends = safe_logit(torch.tensor([0.0, 1.0], dtype=torch.float64), eps=1e-6)
    bound = math.log((1 - 1e-6) / 1e-6)
    assert ends.tolist() == pytest.approx([-bound, bound], rel=1e-4)


# ---- PPO reward -----------------------------------------------------------------------------------


def test_combine_rewards_safety_switch_on_boundaries() -> None:
    assert SAFETY_THRESHOLD == 0.15
    r_h = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2, 0.9])
    r_s = torch.tensor([0.15, 0.1499, 0.15, 0.9, 0.0, 0.1500001])
    is_safety = torch.tensor([False, False, True, True, False, False])
    out = combine_rewards(r_h, r_s, is_safety)
    # 0.15 exactly is not below the threshold: helpfulness; just below: safety; safety prompts: safety
    assert out.tolist() == pytest.approx([0.9, 0.1499, 0.15, 0.9, 0.0, 0.9])
    custom = combine_rewards(r_h, r_s, is_safety, threshold=0.95)
    assert custom.tolist() == pytest.approx(r_s.tolist())


def test_kl_estimates_are_unbiased_for_exact_categorical_kl() -> None:
    # Weighting per-token estimates by pi(x) gives their expectation under pi: both equal KL(pi || ref).
    pi = torch.softmax(torch.randn(4, 11), dim=-1)
    ref = torch.softmax(torch.randn(4, 11), dim=-1)
    k1, k3 = kl_estimates(pi.log(), ref.log())  # (4, 11): every token of the vocabulary
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=pi), torch.distributions.Categorical(probs=ref)
    )
    _close((pi * k1).sum(-1), exact)
    _close((pi * k3).sum(-1), exact)
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 is unbiased but not pointwise positive
    _close(k1, pi.log() - ref.log())


def test_score_index_is_eos_and_ignores_extra_padding() -> None:
    mask = _mask()
    idx = score_index(mask)
    assert idx.dtype == torch.int64
    assert idx.tolist() == (LENGTHS - 1).tolist()
    padded = torch.cat([mask, torch.zeros(B, 6, dtype=torch.bool)], dim=1)
    assert score_index(padded).tolist() == idx.tolist()
    with pytest.raises(ConfigError, match=r"rows \[1\]"):
        score_index(_mask(torch.tensor([2, 0])))


def test_shaped_rewards_match_torchtune(tt: Torchtune) -> None:
    mask = _mask()
    logprobs, ref = -torch.rand(B, T) * 3, -torch.rand(B, T) * 3
    scores = torch.randn(B)
    beta = 0.05
    # torchtune reads every position: its recipe sets padded logprobs equal (kl = 0 there); ours ignores them.
    tt_logprobs, tt_ref = logprobs.masked_fill(~mask, 1.0), ref.masked_fill(~mask, 1.0)
    tt_total, tt_kl, _ = tt.rewards.get_rewards_ppo(scores, tt_logprobs, tt_ref, beta, LENGTHS - 1)
    rewards, k1 = shaped_rewards(scores, logprobs, ref, mask, beta)
    _close(rewards, tt_total)
    _close(k1, tt_kl)
    explicit = torch.zeros(B, dtype=torch.int64)  # another score position, given explicitly
    tt_total0, _, _ = tt.rewards.get_rewards_ppo(scores, tt_logprobs, tt_ref, beta, explicit)
    _close(shaped_rewards(scores, logprobs, ref, mask, beta, index=explicit)[0], tt_total0)


# ---- GAE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_torchtune(tt: Torchtune, gamma: float, lam: float) -> None:
    mask = _mask()
    values, rewards = torch.randn(B, T), torch.randn(B, T)
    # torchtune reads padded positions: give it zeros there (its recipe does); ours must ignore garbage.
    tt_adv, tt_ret = tt.rewards.estimate_advantages(values * mask, rewards * mask, gamma, lam, masks=mask)
    adv, ret = gae(values, rewards, mask, gamma=gamma, lam=lam)
    _close(ret, tt_ret)
    # torchtune's whiten (shift_mean=True) adds the raw advantages' mean back; ours are zero-mean.
    tt_mean = tt.rewards.masked_mean(tt_ret - values * mask, mask)
    _close(adv, (tt_adv - tt_mean) * mask)


def test_gae_terminal_reward_closed_form() -> None:
    mask = _mask()
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    rewards = torch.zeros(B, T).scatter(1, (LENGTHS - 1).unsqueeze(1), scores.unsqueeze(1))
    adv, ret = gae(torch.zeros(B, T), rewards, mask, gamma=1.0, lam=1.0)
    # every earlier token's (undiscounted, zero-baseline) return is the final reward
    assert ret.tolist() == (scores.unsqueeze(1) * mask).tolist()
    raw = scores.repeat_interleave(LENGTHS)  # the raw advantages on the mask, row by row
    _close(adv[mask], (raw - raw.mean()) / raw.std(unbiased=True))
    assert (adv[~mask] == 0).all()


# ---- PPO losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.2, 0.1])
def test_ppo_losses_match_torchtune(tt: Torchtune, clip: float) -> None:
    mask = _mask()
    old = -torch.rand(B, T) * 3
    logprobs = (old + 0.3 * torch.randn(B, T)).requires_grad_()
    advantages = torch.randn(B, T)
    old_values, returns = torch.randn(B, T), torch.randn(B, T)
    values = (old_values + 0.4 * torch.randn(B, T)).requires_grad_()
    oracle = tt.PPOLoss(epsilon=clip, value_clip_range=clip, value_coeff=1.0)
    _, tt_pl, tt_vl, tt_ratio, tt_clipfrac = oracle(
        old, logprobs, advantages, old_values, values, returns, padding_masks=mask, value_padding_masks=mask
    )
    pl, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip=clip)
    vl, vstats = ppo_value_loss(values, old_values, returns, mask, clip=clip)
    _close(pl.detach(), tt_pl)
    _close(vl.detach(), tt_vl)
    assert stats["clipfrac"] == pytest.approx(tt_clipfrac.item(), abs=1e-6)
    assert 0.0 < stats["clipfrac"] < 1.0 and 0.0 < vstats["vf_clipfrac"] < 1.0  # both regimes exercised
    # gradients agree too (torchtune's loss recomputed with gradient)
    tt_loss, *_ = oracle(old, logprobs, advantages, old_values, values, returns, mask, mask)
    tt_grads = torch.autograd.grad(tt_loss, [logprobs, values])
    grads = torch.autograd.grad(pl + vl, [logprobs, values])
    for g, tg in zip(grads, tt_grads, strict=True):
        _close(g, tg)
    # torchtune's ratio mean is over every position: compare with a full mask
    _, full_stats = ppo_policy_loss(logprobs, old, advantages, torch.ones_like(mask), clip=clip)
    assert full_stats["ratio_mean"] == pytest.approx(tt_ratio.item(), rel=1e-5)


def test_ppo_policy_loss_at_ratio_one() -> None:
    mask = _mask()
    logprobs, advantages = -torch.rand(B, T), torch.randn(B, T)
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask)
    _close(loss, -advantages[mask].mean())
    assert stats == {"clipfrac": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0}
    # samples from pi_old, r = pi_new / pi_old = e^d everywhere: k3 of KL(old || new) = (r - 1) - log r
    d = 0.5
    _, shifted = ppo_policy_loss(logprobs + d, logprobs, advantages, mask)
    assert shifted["approx_kl"] == pytest.approx(math.exp(d) - 1 - d, rel=1e-5)
    assert shifted["ratio_mean"] == pytest.approx(math.exp(d), rel=1e-5)


def test_ppo_value_loss_clipping_closed_form() -> None:
    mask = _mask()
    old = torch.zeros(B, T)
    values = old + 0.5
    # returns above: the clipped value (0.2) is farther from R = 1 -> clipped term wins everywhere
    loss, stats = ppo_value_loss(values, old, torch.ones(B, T), mask, clip=0.2)
    assert stats["vf_clipfrac"] == 1.0
    assert loss.item() == pytest.approx(0.5 * 0.8**2)
    # returns below: the unclipped value is farther from R = -1
    loss, stats = ppo_value_loss(values, old, -torch.ones(B, T), mask, clip=0.2)
    assert stats["vf_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(0.5 * 1.5**2)


# ---- DPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_matches_torchtune(tt: Torchtune, beta: float, smoothing: float) -> None:
    pc, pr, rc, rr = (-torch.rand(8) * 40 for _ in range(4))
    tt_losses, tt_chosen, tt_rejected = tt.DPOLoss(beta=beta, label_smoothing=smoothing)(pc, pr, rc, rr)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
    _close(loss, tt_losses.mean())
    _close(chosen, tt_chosen)
    _close(rejected, tt_rejected)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
