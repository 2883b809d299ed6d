"""Pure tensor operations on logits (B, V), the steps `llama2.generation.sampling` composes (and
re-exports): finiteness (`finite_logits`, `require_candidates`), overflow-safe temperature
(`scale_logits`), the repetition / presence / frequency penalties, the top-k and min-p masks, and
Meta's nucleus step (`top_p_probs`, `sample_top_p`). Nothing here knows about `SamplingParams`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llama2.errors import GenerationError

NEG_INF = float("-inf")
POS_INF = float("inf")


def finite_logits(logits: Tensor) -> Tensor:
    """Float32 logits (B, V) safe to sample from: NaN -> -inf (never chosen); in a row with +inf
    logits only those tokens remain, equally likely (the limit of softmax), as 0 and the rest -inf."""
    x = logits.float()
    x = x.masked_fill(torch.isnan(x), NEG_INF)
    top = x == POS_INF  # (B, V)
    limit = torch.zeros_like(x).masked_fill(top.logical_not(), NEG_INF)  # (B, V)
    return torch.where(top.any(dim=-1, keepdim=True), limit, x)


def require_candidates(logits: Tensor, rows: Tensor | None = None) -> None:
    """Raise GenerationError if a row (among `rows`, (B,) bool; default all) has no token left.

    Args:
        logits: (B, V) from `finite_logits` (NaN already -inf).
        rows: the rows that must yield a token (e.g. generating rows); None: every row.
    """
    dead = (logits == NEG_INF).all(dim=-1)  # (B,)
    if rows is not None:
        dead = dead & rows
    if bool(dead.any()):
        i = int(dead.nonzero()[0, 0])
        raise GenerationError(
            f"row {i}: no token can be chosen (every logit is -inf or NaN: all tokens banned by "
            "logit_bias, or the model produced NaN); expected at least one finite logit"
        )


def scale_logits(logits: Tensor, temperature: Tensor | float) -> Tensor:
    """`logits / temperature` (B, V), without overflow: a row where the quotient would overflow to
    +inf is shifted by its max first (softmax is shift-invariant). Other rows are exactly
    `logits / temperature`, so seeded draws reproduce Meta's.

    Args:
        logits: (B, V) from `finite_logits` (no NaN, no +inf).
        temperature: scalar or (B, 1), each >= `GREEDY_TEMPERATURE` (greedy rows may pass 1).
    """
    y = logits / temperature  # (B, V)
    overflow = (y == POS_INF).any(dim=-1, keepdim=True)  # (B, 1)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), <= 0
    return torch.where(overflow, shifted, y)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor | float) -> Tensor:
    """CTRL / transformers repetition penalty.

    Args:
        logits: (B, V) float logits.
        seen: (B, V) bool, True for tokens present in the prompt or the output so far.
        penalty: scalar or (B, 1) penalties (> 0; 1 leaves logits unchanged).

    Returns:
        (B, V) logits where seen tokens have positive logits divided and negative ones multiplied.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: Tensor, counts: Tensor, presence: Tensor | float, frequency: Tensor | float
) -> Tensor:
    """OpenAI's penalties: `logit - presence * [count > 0] - frequency * count`.

    Args:
        logits: (B, V) float logits.
        counts: (B, V) how many times each token was generated so far (the prompt is not counted).
        presence: scalar or (B, 1).
        frequency: scalar or (B, 1).
    """
    counts_f = counts.to(logits.dtype)  # (B, V)
    return logits - presence * (counts_f > 0).to(logits.dtype) - frequency * counts_f


def top_k_mask(logits: Tensor, k: Tensor | int) -> Tensor:
    """Set to -inf every logit below the k-th largest of its row (ties at the k-th value survive).

    Args:
        logits: (B, V).
        k: int or (B,) int64; values <= 0 or >= V disable the filter for that row.
    """
    vocab = logits.shape[-1]
    k_t = torch.as_tensor(k, device=logits.device).expand(logits.shape[0])  # (B,)
    k_t = torch.where((k_t <= 0) | (k_t > vocab), vocab, k_t)
    if bool((k_t == vocab).all()):
        return logits
    kmax = int(k_t.max())
    top = torch.topk(logits, kmax, dim=-1).values  # (B, kmax), descending
    kth = top.gather(-1, (k_t - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def min_p_mask(logits: Tensor, min_p: Tensor | float) -> Tensor:
    """Set to -inf the tokens whose probability is below `min_p * max probability` (min-p sampling).

    Args:
        logits: (B, V), already divided by the temperature.
        min_p: scalar or (B, 1) in [0, 1]; 0 disables the filter.
    """
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def top_p_probs(probs: Tensor, p: Tensor | float) -> tuple[Tensor, Tensor]:
    """Meta's nucleus step without the draw: sorted, masked and renormalised probabilities.

    Args:
        probs: (B, V) probabilities.
        p: scalar or (B, 1) nucleus mass.

    Returns:
        (probs_sort, probs_idx): (B, V) renormalised probabilities in descending order and the
        vocabulary index of each column.

    Raises:
        GenerationError: a row is not a distribution (NaN/inf/negative entries, or all zero), which
            `torch.multinomial` would reject with a raw error.
    """
    ok = torch.isfinite(probs).all(dim=-1) & (probs >= 0).all(dim=-1) & (probs.sum(dim=-1) > 0)  # (B,)
    if not bool(ok.all()):
        i = int(ok.logical_not().nonzero()[0, 0])
        raise GenerationError(
            f"row {i}: probabilities are not a distribution (NaN, inf, negative or all zero); expected "
            "finite non-negative values with a positive sum (logits through finite_logits/scale_logits)"
        )
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (B, V) each
    probs_sum = torch.cumsum(probs_sort, dim=-1)  # (B, V)
    mask = probs_sum - probs_sort > p  # mass before this token already exceeds p
    probs_sort = probs_sort.masked_fill(mask, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return probs_sort, probs_idx


def sample_top_p(
    probs: Tensor,
    p: Tensor | float,
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
) -> Tensor:
    """Nucleus sampling with Meta's semantics (`llama/generation.py: sample_top_p`).

    Args:
        probs: (B, V) probabilities.
        p: scalar or (B, 1) nucleus mass.
        generators: one generator for the batch, or one per row (None entries use the global RNG).
            With one generator per row, each row draws from its own stream.

    Returns:
        (B, 1) int64 sampled token ids.
    """
    probs_sort, probs_idx = top_p_probs(probs, p)
    if generators is None or isinstance(generators, torch.Generator):
        choice = torch.multinomial(probs_sort, num_samples=1, generator=generators)  # (B, 1)
    elif all(g is None for g in generators):
        choice = torch.multinomial(probs_sort, num_samples=1)
    else:
        choice = torch.cat(
            [
                torch.multinomial(probs_sort[i : i + 1], num_samples=1, generator=g)
                for i, g in enumerate(generators)
            ]
        )  # (B, 1)
    return torch.gather(probs_idx, -1, choice)
