"""The one logprob computation: log-softmax of the raw model logits (before penalties, temperature
and filters) at chosen tokens, and the k most likely alternatives.

Used for sampled tokens (`Generator`, the engine) and for echoed prompt tokens alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-softmax of `logits` (..., V) at `targets` (...) int64 -> (...) float32."""
    lsm = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return lsm.gather(-1, targets[..., None]).squeeze(-1)


def token_logprobs(
    logits: Tensor, targets: Tensor, top: Sequence[int] | int = 0
) -> tuple[list[float], list[dict[int, float] | None]]:
    """Per row: the logprob of its target and its `top` most likely tokens.

    Args:
        logits: (N, V) raw logits.
        targets: (N,) int64 chosen (or prompt) tokens.
        top: k per row, or one k for all rows; 0: no alternatives (None for that row).

    Returns:
        (logprobs, tops): N floats, and N dicts {token id: logprob} (None where k is 0), most likely first.
    """
    n = logits.shape[0]
    ks = [top] * n if isinstance(top, int) else list(top)
    lsm = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen: list[float] = lsm.gather(-1, targets[:, None]).squeeze(-1).tolist()
    tops: list[dict[int, float] | None] = [None] * n
    kmax = max(ks, default=0)
    if kmax > 0:
        vals, idx = torch.topk(lsm, kmax, dim=-1)  # (N, kmax) each
        for i, (ix, vs) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True)):
            if ks[i] > 0:
                tops[i] = dict(zip(ix[: ks[i]], vs[: ks[i]], strict=True))
    return chosen, tops
