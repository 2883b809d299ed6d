"""Calibrating the safety reward model, so that its threshold means what the paper means by it.

The ranking loss -log σ(r_c - r_r - m) only sees score *differences*: adding a constant to every score
changes nothing it measures, so the level of σ(score) after training is arbitrary. The paper uses
R_s = σ(score) as a probability — PPO switches to the safety reward when R_s < 0.15 — which needs a
score scale. We fit it the standard way (Platt scaling): labels come from the safety pairs themselves
(the rejected side of a "chosen safe, rejected unsafe" pair and both sides of a "both unsafe" pair are
unsafe; every other response is safe), and a scale `a > 0` and shift `b` minimise the binary
cross-entropy of σ(a·score + b) against "safe". Folding them into the head (w ← a·w, bias ← a·bias +
b) leaves every ranking, and so every pairwise accuracy, unchanged.

Decisions:
  - Only the safety model is calibrated by default: R_s is compared to a fixed threshold; R_h enters
    PPO only through whiten(logit(R_c)) and best-of-K comparisons, which need no absolute level.
  - The fit is in float64 with L-BFGS on (log a, b); a is kept positive so better stays better.
  - The result (scale, shift, the share of unsafe labels, the fit's loss) is stored in reward.json
    under "calibration"; the head saved already includes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llama2.data.preferences import PreferencePair, reward_tokens
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel, score_rows
from llama2.tokenizer import Tokenizer


@dataclass(frozen=True)
class Calibration:
    """An affine map of raw scores: calibrated = scale * raw + shift."""

    scale: float
    shift: float
    n: int  # responses the fit used
    unsafe_share: float
    loss: float  # mean binary cross-entropy after the fit

    def to_json(self) -> dict[str, float | int]:
        return {
            "scale": self.scale, "shift": self.shift, "n": self.n, "unsafe_share": self.unsafe_share,
            "bce": self.loss,
        }  # fmt: skip


def safety_labels(pairs: Sequence[PreferencePair]) -> list[tuple[PreferencePair, str, bool]]:
    """(pair, response, is_safe) for both sides of every safety-kind pair (see the module docstring)."""
    out: list[tuple[PreferencePair, str, bool]] = []
    for p in pairs:
        if p.kind != "safety":
            continue
        chosen_unsafe, rejected_unsafe = p.unsafe_sides
        out += [(p, p.chosen, not chosen_unsafe), (p, p.rejected, not rejected_unsafe)]
    return out


def fit_platt(scores: torch.Tensor, safe: torch.Tensor, steps: int = 100) -> tuple[float, float, float]:
    """(scale, shift, loss): minimise BCE(σ(scale·s + shift), safe) with scale > 0 (float64 L-BFGS).

    Raises:
        ConfigError: fewer than two responses, or all of one class (nothing to calibrate against).
    """
    s, y = scores.double().flatten(), safe.double().flatten()  # (N,) each
    if s.numel() < 2 or bool((y == 0).all()) or bool((y == 1).all()):
        raise ConfigError(
            "calibration needs safe and unsafe responses among the safety pairs; expected pairs with "
            "safety_bin 'chosen_safe_rejected_unsafe'"
        )
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(log_a.exp() * s + b, y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(log_a.exp() * s + b, y)
    return float(log_a.detach().exp()), float(b.detach()), float(loss)


def calibrate_safety(
    model: RewardModel, tokenizer: Tokenizer, pairs: Sequence[PreferencePair], batch_size: int = 64
) -> Calibration:
    """Fit the Platt scale/shift on the safety pairs' labels and fold it into `model.head` (in place)."""
    labelled = safety_labels(pairs)
    if not labelled:
        raise ConfigError("no safety-kind pairs to calibrate the safety reward model on")
    rows = [reward_tokens(tokenizer, p.dialog, r) for p, r, _ in labelled]
    raw = score_rows(model, rows, batch_size)  # (N,)
    safe = torch.tensor([ok for _, _, ok in labelled], dtype=torch.bool)  # (N,)
    scale, shift, loss = fit_platt(raw, safe)
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale).add_(shift)
    return Calibration(scale, shift, len(labelled), float((~safe).float().mean()), loss)


__all__ = ["Calibration", "calibrate_safety", "fit_platt", "safety_labels"]
