"""A scalar reward (or value) model: our `Transformer` trunk with a `Linear(dim, 1)` head.

Llama 2 (sec. 3.2.2) initialises each reward model from a chat-model checkpoint and replaces the
next-token classification head with a regression head that outputs one scalar. Decisions:
  - the trunk is an unchanged `Transformer`; its `output` (vocabulary) head is kept, unused, so the
    trunk's weights still save and load as an ordinary model folder (`checkpoint/reward_io.py`);
  - the score of a sequence is the head applied to the final normalised hidden state
    (`Transformer.hidden_states`) at one position per row, `index` (the EOS of the response for
    right-padded rows), so right padding after `index` never changes it (causal attention);
  - head init: weight ~ N(0, 1/sqrt(dim + 1)), bias 0 (the usual fan-in scale with the bias counted;
    scores start near 0, i.e. sigmoid(score) near 0.5);
  - scores are returned as float32 whatever the trunk's dtype.
`pad_rows`/`score_rows` batch token rows for scoring (used by `train/reward_scoring.py` and
`train/reward_report.py`). The module does no I/O and no sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.errors import GenerationError
from llama2.model.transformer import Transformer

PAD_ID = 0  # any id works: positions after a row's last token are never read (causal attention)


class RewardModel(nn.Module):
    """`trunk` (a `Transformer`) plus a scalar `head`.

    Call as `model(tokens, index)`: tokens (B, T) int64, index (B,) int64 positions to score;
    returns (B,) float32 raw scores. `values(tokens)` scores every position (a PPO value model).
    """

    def __init__(self, trunk: Transformer) -> None:
        super().__init__()
        self.trunk = trunk
        dim = trunk.args.dim
        weight = trunk.tok_embeddings.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.head = nn.Linear(dim, 1, device=weight.device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(dim + 1))
            nn.init.zeros_(self.head.bias)

    @property
    def args(self) -> ModelArgs:
        """The trunk's shape."""
        return self.trunk.args

    def _head(self, h: Tensor) -> Tensor:
        """(..., dim) hidden states -> (...) float32 scores."""
        out: Tensor = self.head(h.to(self.head.weight.dtype))  # (..., 1)
        return out.squeeze(-1).float()

    def forward(self, tokens: Tensor, index: Tensor) -> Tensor:
        """Raw scores (B,) of the hidden state at `index[b]` of each row.

        Raises:
            GenerationError: `index` is not one position per row, or lies outside [0, T).
        """
        if tokens.dim() != 2:
            raise GenerationError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        index = index.to(device=tokens.device, dtype=torch.long)
        if index.shape != (bsz,):
            raise GenerationError(
                f"index must have shape ({bsz},), one position per row, got {tuple(index.shape)}"
            )
        if bsz and (int(index.min()) < 0 or int(index.max()) >= seqlen):
            raise GenerationError(
                f"index must lie in [0, {seqlen}) for rows of {seqlen} tokens, got "
                f"{int(index.min())}..{int(index.max())}"
            )
        h = self.trunk.hidden_states(tokens)  # (B, T, dim)
        rows = torch.arange(bsz, device=tokens.device)
        picked = h[rows, index]  # (B, dim)
        return self._head(picked)  # (B,)

    def values(self, tokens: Tensor) -> Tensor:
        """Raw scores (B, T) at every position (position t sees tokens[:, : t + 1])."""
        h = self.trunk.hidden_states(tokens)  # (B, T, dim)
        return self._head(h)  # (B, T)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad token rows: ((B, T) int64 tokens, (B,) int64 index of each row's last token).

    Raises:
        GenerationError: an empty row (nothing to score).
    """
    if any(len(r) == 0 for r in rows):
        raise GenerationError("cannot score an empty token row; expected prompt + response + EOS tokens")
    width = max((len(r) for r in rows), default=1)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    index = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)  # (B,)
    return tokens, index


def score_rows(model: RewardModel, rows: Sequence[Sequence[int]], batch_size: int = 64) -> Tensor:
    """(N,) float32 CPU raw scores of token rows at their last token: no grad, right-padded batches
    of up to `batch_size` rows formed in order of length (less padding), results in input order.

    Raises:
        GenerationError: an empty row, or batch_size < 1.
    """
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    out = torch.zeros(len(rows), dtype=torch.float32)
    device = model.head.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            tokens, index = pad_rows([rows[i] for i in chunk])
            scores = model(tokens.to(device), index.to(device))  # (b,)
            out[torch.tensor(chunk, dtype=torch.long)] = scores.float().cpu()
    return out


__all__ = ["PAD_ID", "RewardModel", "pad_rows", "score_rows"]
