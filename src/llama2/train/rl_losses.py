"""Losses and advantage estimates of the Llama 2-Chat alignment recipe (Llama 2 paper, sec. 3.2-3.3).

Pure torch functions over score / logprob / value tensors; no model code. What each one is:

- `margin_ranking_loss`, `MARGINS`, `margin_for`: the reward-model ranking loss with the
  preference-rating margin (paper eq. 2, `-log sigmoid(r(x, y_c) - r(x, y_r) - m(r))`; the margin
  tables are paper Table 27). Same math as TRL's `RewardTrainer.compute_loss`.
- `combine_rewards`, `safe_logit`, `whiten`: the PPO reward of paper sec. 3.2.3,
  `R_c = R_s if IS_SAFETY(p) or R_s < 0.15 else R_h`, then `R~_c = WHITEN(LOGIT(R_c))`. The switch is a
  strict `<` against the threshold as a float of the scores' dtype (0.15 in float32 is 0.15000000596):
  a safety score exactly equal to it keeps the helpfulness score.
- `kl_estimates`, `shaped_rewards`: the KL penalty of the PPO objective,
  `R(g|p) = R~_c(g|p) - beta * D_KL(pi_theta(g|p) || pi_0(g|p))`, spent per token as in Stiennon et al.
  (2020) / Ziegler et al. (2019): every response token gets `-beta * k1` and the final (EOS) token also
  gets the sequence score. Estimators of KL(pi || pi_ref) from samples of pi (J. Schulman, "Approximating
  KL divergence", 2020): `k1 = log pi - log pi_ref` (unbiased, high variance, can be negative) and
  `k3 = (r - 1) - log r` with `r = pi_ref / pi` (unbiased, always >= 0, lower variance). The reward uses
  k1 (as the paper and torchtune do); k3 is for logging.
- `gae`: Generalized Advantage Estimation (Schulman et al. 2016, eq. 16):
  `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = sum_l (gamma lam)^l delta_{t+l}`, computed backwards over the
  response; `returns = A + V` (the value-function targets); the advantages are then whitened over the
  response tokens of the whole batch.
- `ppo_policy_loss`, `ppo_value_loss`: the clipped surrogate of PPO (Schulman et al. 2017, eq. 7),
  written as a loss `max(-A r, -A clip(r, 1-eps, 1+eps))`, and the clipped value loss of OpenAI baselines
  `ppo2` (`0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)`), both as masked token means.
- `dpo_loss`: Direct Preference Optimization (Rafailov et al. 2023, eq. 7) with the conservative label
  smoothing of cDPO; inputs are per-sequence logprob sums.

Conventions, checked against torchtune's `rlhf` (0.6.1) and TRL (tests/train/test_rl_losses.py):
- Masks are bool `(B, T)` of response tokens, right padded (the EOS, when present, is the last True).
  Positions outside the mask are ignored everywhere: rewards and k1 are 0 there, GAE treats them as
  after the end of the episode (their values and rewards are not read), advantages and returns are 0.
  torchtune instead reads every position and relies on its recipe zeroing padded values and setting
  padded logprobs equal; with those inputs the numbers agree.
- `whiten(x, shift_mean=True)` returns `(x - mean) / sqrt(var + 1e-8)` and `shift_mean=False` adds the
  mean back (TRL's original convention, also the paper's WHITEN). torchtune 0.6.1 inverts the flag (its
  default adds the mean back, so its advantages are whitened + mean); ours are zero-mean.
- Variances are unbiased (Bessel's correction over the masked count), as in TRL and torchtune.
- `masked_mean` divides by `max(count, 1)` (torchtune: `count + 1e-8`; identical in float32 for
  count >= 1; both give 0 for an empty mask).
- Statistics (`clipfrac`, `ratio_mean`, `approx_kl`, `vf_clipfrac`) are masked means over response
  tokens, returned as Python floats (torchtune's `ratios.mean()` is over every position, padding included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2.errors import ConfigError

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")

# Paper Table 27: margin m(r) per preference rating; "none" is the plain Bradley-Terry loss.
MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0), strict=True)),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}

SAFETY_THRESHOLD = 0.15  # paper sec. 3.2.3: a safety score below it means "unsafe, use the safety RM"
_VAR_EPS = 1e-8  # added to the variance before the square root in whitening (TRL / torchtune)


def margin_for(ratings: Sequence[str], table: str) -> Tensor:
    """Margins of one batch of preference ratings.

    Args:
        ratings: one of `RATINGS` per pair.
        table: "none", "small" or "large" (paper Table 27).

    Returns:
        (B,) float32 margins.

    Raises:
        ConfigError: unknown table or rating.
    """
    if table not in MARGINS:
        raise ConfigError(f"unknown margin table {table!r}; expected one of {sorted(MARGINS)}")
    margins = MARGINS[table]
    bad = sorted({r for r in ratings if r not in margins})
    if bad:
        raise ConfigError(f"unknown preference rating(s) {bad}; expected one of {list(RATINGS)}")
    return torch.tensor([margins[r] for r in ratings], dtype=torch.float32)


def margin_ranking_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Binary ranking loss of the reward models (paper eq. 2): mean of `-log sigmoid(r_c - r_r - m)`.

    Args:
        chosen: (B,) raw scores of the chosen responses.
        rejected: (B,) raw scores of the rejected responses.
        margin: (B,) margins `m(r)` (`margin_for`), or None for no margin.
    """
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff).mean()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is True (over all dims, or along `dim`); 0 if none."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """`(x - mean) / sqrt(var + 1e-8)` with mean and unbiased variance over the masked entries.

    With `shift_mean=False` the mean is added back (only the scale is normalised). Entries outside the
    mask are transformed too (the caller zeroes them if needed).
    """
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    bessel = count / (count - 1.0).clamp(min=1.0)  # n / (n - 1); 1 when n <= 1 (the variance is then 0)
    var = masked_mean((x - mean) ** 2, mask) * bessel
    whitened = (x - mean) * torch.rsqrt(var + _VAR_EPS)
    return whitened + mean if not shift_mean else whitened


def whiten(x: Tensor, shift_mean: bool = True) -> Tensor:
    """`(x - mean) / sqrt(var + 1e-8)` over all entries (unbiased variance); `shift_mean=False` adds the
    mean back. The paper's WHITEN of the combined reward logits."""
    return masked_whiten(x, torch.ones_like(x, dtype=torch.bool), shift_mean=shift_mean)


def safe_logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """`log(p / (1 - p))` with `p` clamped to `[eps, 1 - eps]`: the paper's LOGIT, finite at 0 and 1."""
    q = p.clamp(eps, 1.0 - eps)
    return torch.log(q) - torch.log1p(-q)


def combine_rewards(
    r_h: Tensor, r_s: Tensor, is_safety: Tensor, threshold: float = SAFETY_THRESHOLD
) -> Tensor:
    """The combined PPO reward of paper sec. 3.2.3: `R_s` where the prompt is a safety prompt or
    `R_s < threshold`, else `R_h`.

    Args:
        r_h: (B,) helpfulness reward-model probabilities (sigmoid of the raw scores).
        r_s: (B,) safety reward-model probabilities.
        is_safety: (B,) bool, True for prompts from the safety set.
        threshold: strict upper bound on `r_s` below which a response is treated as unsafe.
    """
    use_safety = is_safety.to(torch.bool) | (r_s < threshold)  # (B,)
    return torch.where(use_safety, r_s, r_h)


def kl_estimates(logprobs: Tensor, ref_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token estimates `(k1, k3)` of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    `k1 = log pi - log pi_ref`; `k3 = (r - 1) - log r` with `log r = log pi_ref - log pi`. Both are unbiased
    (`E_pi[r] = 1`); k3 is never negative.
    """
    k1 = logprobs - ref_logprobs
    log_r = ref_logprobs - logprobs
    k3 = torch.expm1(log_r) - log_r
    return k1, k3


def score_index(response_mask: Tensor) -> Tensor:
    """Index of the last response token of each row (the EOS when the response ended with one).

    Args:
        response_mask: (B, T) bool, True on response tokens, right padded.

    Returns:
        (B,) int64.

    Raises:
        ConfigError: a row has no response token.
    """
    mask = response_mask.to(torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"response rows {empty} have no response token; expected at least one (the EOS)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask, positions, -1).amax(dim=1).to(torch.int64)


def shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: `-beta * k1` on response tokens, plus the sequence score at `index`.

    Args:
        scores: (B,) sequence rewards (e.g. whitened logits of `combine_rewards`).
        logprobs: (B, T) policy logprobs of the sampled response tokens.
        ref_logprobs: (B, T) reference (initial) policy logprobs of the same tokens.
        mask: (B, T) bool response mask.
        beta: KL coefficient (paper: 0.01 for 7B/34B, 0.005 for 13B/70B).
        index: (B,) position receiving the score; default `score_index(mask)`.

    Returns:
        (rewards (B, T), k1 (B, T)), both 0 outside the mask and detached (rewards are constants to PPO).
    """
    if index is None:
        index = score_index(mask)
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        k1 = (logprobs - ref_logprobs) * m  # (B, T)
        rewards = -beta * k1
        rewards.scatter_add_(1, index.view(-1, 1).to(torch.int64), scores.view(-1, 1).to(rewards))
    return rewards, k1


def gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over right-padded responses (no gradient).

    Args:
        values: (B, T) value estimates V_t of the state before each response token.
        rewards: (B, T) per-token rewards (`shaped_rewards`).
        mask: (B, T) bool response mask; the episode ends after the last True (V beyond it is 0).
        gamma: discount; lam: GAE lambda (both in [0, 1]).

    Returns:
        (advantages, returns), (B, T) each: the advantages whitened over the masked tokens of the whole
        batch (zero mean, unit unbiased variance) and the returns `A + V` (unwhitened A), 0 outside the mask.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ConfigError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    with torch.no_grad():
        m = mask.to(values.dtype)
        v = values * m  # (B, T)
        r = rewards * m
        steps = v.shape[1]
        adv = torch.zeros_like(v)
        next_value = torch.zeros_like(v[:, 0])  # (B,) V_{t+1}; 0 past the end
        next_adv = torch.zeros_like(v[:, 0])
        for t in reversed(range(steps)):
            delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
            next_adv = delta + gamma * lam * next_adv
            adv[:, t] = next_adv
            next_value = v[:, t]
        adv = adv * m
        returns = (adv + v) * m
        advantages = masked_whiten(adv, mask) * m
    return advantages, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a masked token-mean loss.

    Args:
        logprobs: (B, T) current policy logprobs (with gradient).
        old_logprobs: (B, T) logprobs of the policy that sampled the tokens.
        advantages: (B, T) advantages (`gae`).
        mask: (B, T) bool response mask.
        clip: epsilon of the ratio clip (paper: 0.2).

    Returns:
        (loss, stats) with stats `clipfrac` (share of tokens where the clipped term is the larger),
        `ratio_mean` and `approx_kl` (k3 estimate of KL(old || new)), masked means.
    """
    if clip <= 0.0:
        raise ConfigError(f"PPO clip must be > 0, got {clip}")
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (OpenAI baselines ppo2): `0.5 * masked mean of max((V - R)^2, (V_clip - R)^2)`
    with `V_clip = clip(V, V_old - clip, V_old + clip)`.

    Returns:
        (loss, {"vf_clipfrac": share of tokens where the clipped term is the larger}).
    """
    if clip <= 0.0:
        raise ConfigError(f"value clip must be > 0, got {clip}")
    old = old_values.detach()
    clipped_values = torch.clamp(values, old - clip, old + clip)  # (B, T)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask).item()
    return loss, {"vf_clipfrac": vf_clipfrac}


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss (Rafailov et al. 2023, eq. 7), with cDPO label smoothing.

    `logits = (log pi(y_c) - log pi(y_r)) - (log pi_ref(y_c) - log pi_ref(y_r))`;
    `loss = -(1 - s) log sigmoid(beta logits) - s log sigmoid(-beta logits)`.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) sequence logprob sums.
        beta: KL strength; label_smoothing: probability `s` in [0, 0.5) that a label is flipped.

    Returns:
        (mean loss, chosen_rewards (B,), rejected_rewards (B,)); the implicit rewards
        `beta * (log pi - log pi_ref)` are detached.
    """
    if beta <= 0.0:
        raise ConfigError(f"DPO beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    losses = (
        -F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
