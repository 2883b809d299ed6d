"""Score responses with the helpfulness and safety reward models, combined as Llama 2 does (sec. 3.2.3).

`RewardScorer` turns (dialog, response) pairs into `Scores`: R_h and R_s are the sigmoids of the two
models' raw scores and R_c = `combine_rewards(R_h, R_s, is_safety, threshold)` (R_s for safety prompts
or when R_s < threshold, else R_h). Decisions:
  - rows are encoded by `data.preferences.reward_tokens` (prompt + response + EOS), right padded and
    scored at their last real token (the EOS), the position the reward models were trained on; right
    padding never changes a score (causal attention), so batches may be formed freely;
  - rows are batched by `model.reward.score_rows` (in order of length, scores back in input order);
  - no gradients; the models' train/eval mode is left as found; scores come back float32 on the CPU;
  - when both models are the same object, it is run once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llama2.chat import Message
from llama2.checkpoint.reward_io import load_reward_model
from llama2.data.preferences import reward_tokens
from llama2.errors import ConfigError, GenerationError
from llama2.model.reward import RewardModel, score_rows
from llama2.tokenizer import Tokenizer
from llama2.train.rl_losses import SAFETY_THRESHOLD, combine_rewards


@dataclass
class Scores:
    """Per-row rewards, (N,) float32 probabilities: R_h, R_s and the combined R_c."""

    r_h: Tensor
    r_s: Tensor
    r_c: Tensor


class RewardScorer:
    """The pair of reward models used as the RLHF reward (see the module docstring)."""

    def __init__(
        self,
        helpful: RewardModel,
        safety: RewardModel,
        tokenizer: Tokenizer,
        threshold: float = SAFETY_THRESHOLD,
        batch_size: int = 64,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"safety threshold must be a probability in (0, 1), got {threshold}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.helpful = helpful
        self.safety = safety
        self.tokenizer = tokenizer
        self.threshold = threshold
        self.batch_size = batch_size

    def score(
        self,
        dialogs: Sequence[Sequence[Message]],
        responses: Sequence[str],
        is_safety: Sequence[bool],
    ) -> Scores:
        """Scores of `responses[i]` answering `dialogs[i]` (each ending with the user turn).

        Raises:
            GenerationError: the three sequences differ in length.
            DialogError: a malformed dialog (see `llama2.chat`).
        """
        if not len(dialogs) == len(responses) == len(is_safety):
            raise GenerationError(
                f"dialogs ({len(dialogs)}), responses ({len(responses)}) and is_safety "
                f"({len(is_safety)}) must have the same length"
            )
        rows = [reward_tokens(self.tokenizer, d, r) for d, r in zip(dialogs, responses, strict=True)]
        return self.score_tokens(rows, is_safety)

    def score_tokens(self, token_rows: Sequence[list[int]], is_safety: Sequence[bool]) -> Scores:
        """Scores of rows already encoded by `reward_tokens`, each scored at its last token.

        Raises:
            GenerationError: lengths differ, or an empty row.
        """
        if len(token_rows) != len(is_safety):
            raise GenerationError(
                f"token_rows ({len(token_rows)}) and is_safety ({len(is_safety)}) must have the same length"
            )
        raw_h = score_rows(self.helpful, token_rows, self.batch_size)  # (N,)
        same = self.safety is self.helpful
        raw_s = raw_h if same else score_rows(self.safety, token_rows, self.batch_size)  # (N,)
        r_h, r_s = torch.sigmoid(raw_h), torch.sigmoid(raw_s)
        flags = torch.tensor([bool(x) for x in is_safety], dtype=torch.bool)  # (N,)
        r_c = combine_rewards(r_h, r_s, flags, self.threshold)
        return Scores(r_h=r_h, r_s=r_s, r_c=r_c)

    @classmethod
    def load(
        cls,
        helpful: Path | str,
        safety: Path | str,
        tokenizer: Tokenizer,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        threshold: float | None = None,
        batch_size: int = 64,
    ) -> RewardScorer:
        """Load both reward-model folders (`save_reward_model`). `threshold` None: the safety
        model's `reward.json` "threshold" when it has one, else 0.15 (the paper's).

        Raises:
            CheckpointError: a folder is not a reward model (see `load_reward_model`).
            ConfigError: an invalid threshold or batch size.
        """
        h_model, _, _ = load_reward_model(helpful, device=device, dtype=dtype)
        s_model, s_info, _ = load_reward_model(safety, device=device, dtype=dtype)
        if threshold is None:
            stored = s_info.get("threshold", SAFETY_THRESHOLD)
            if isinstance(stored, bool) or not isinstance(stored, int | float):
                raise ConfigError(
                    f"{safety}: reward.json threshold is {stored!r}; expected a number in (0, 1)"
                )
            threshold = float(stored)
        return cls(h_model, s_model, tokenizer, threshold=threshold, batch_size=batch_size)


__all__ = ["RewardScorer", "Scores"]
