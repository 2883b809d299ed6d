"""PPO rollouts (Llama 2 paper, sec. 3.2.3): the prompt pool and `PPOBatches`, the resumable buffer of
PPO mini-batches that `llama2.train.ppo.PPOStage` trains on.

When its buffer is empty, `next(PPOBatches)` runs one rollout:

1. draw `rollout_batch` prompts from the pool (instruct-suite train prompts plus safety prompts, the
   latter flagged `is_safety`) in a seeded order that depends only on the running prompt position;
2. sample one response per prompt on the engine (`sample_responses`, temperature 1, no filters) with
   the seed `derived_seed(seed, "rollout", r)` of rollout `r`, so nothing depends on global RNG;
3. score it: R_c = R_s for safety prompts or R_s < 0.15, else R_h (`RewardScorer`); the sequence
   score is `whiten(logit(R_c))` over the rollout, and a response that hit the length limit (no EOS)
   gets `no_eos_score` instead of its whitened score;
4. recompute the old logprobs, old values and reference logprobs per MINI-BATCH: on exactly the rows,
   shapes, autocast and autograd mode of the first epoch's training forward (grad enabled, then
   detached), so the first mini-batch's probability ratio is exactly 1 (`logprob_check` logs the max
   |engine logprob - recomputed| as a check of the engine);
5. per-token rewards -beta * k1 with the score added on the sequence's own last response token (its
   EOS; right padding only), GAE (gamma, lam) with whitened advantages and returns;
6. fill the buffer with `ppo_epochs` seeded shuffles of the rollout, split into mini-batches.

Tensors are response-aligned: a row's response token j sits at `tokens[b, start[b] + j]` and is
predicted by the logits at `start[b] + j - 1`; `mask` (B, R) marks real response tokens (a prefix of
each row). `state_dict()` holds the buffer tensors, the buffer position, the prompt position and the
rollout count, so a resume mid-buffer continues bit-identically.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llama2.chat import Message
from llama2.data.instruct_suite import TASKS, InstructItem, Split, generate_items
from llama2.data.safety_suite import SafetyPrompt, benign_alarming_prompts, harmful_prompts
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel
from llama2.model.transformer import Transformer
from llama2.tokenizer import Tokenizer
from llama2.train.reward_scoring import RewardScorer
from llama2.train.rl_losses import gae, kl_estimates, safe_logit, shaped_rewards, whiten
from llama2.train.rollout import Sample, sample_responses
from llama2.train.trainer import autocast

# Per-rollout statistics carried with every mini-batch (logged by the stage), in this order.
ROLLOUT_STATS: tuple[str, ...] = (
    "reward", "r_h", "r_s", "score_whitened", "kl_k1", "kl_k3", "response_len", "eos_rate",
    "logprob_check",
)  # fmt: skip
PAD_ID = 0  # never read: every position after a row's last response token is masked
BUFFER_KEYS = ("tokens", "start", "mask", "old_logprobs", "old_values", "advantages", "returns")


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from `seed` and `parts` (SHA-256), e.g. (seed, "rollout", r)."""
    digest = hashlib.sha256("/".join(str(p) for p in ("ppo", seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PPOPrompt:
    """One prompt of the pool: the dialog (ends with the user turn), whether R_c must use the safety
    reward, and its source item (for exact-match checks of held-out responses)."""

    dialog: list[Message]
    is_safety: bool
    task: str
    item: InstructItem | None = None
    safety: SafetyPrompt | None = None

    def correct(self, response: str) -> bool:
        """Exact match: the suite's check; a refusal for harmful prompts; the answer for benign ones."""
        if self.item is not None:
            return self.item.check(response)
        if self.safety is not None:
            return self.safety.check(response)
        return False


def prompt_pool(split: Split, n_per_task: int, safety_fraction: float, seed: int) -> list[PPOPrompt]:
    """Instruct-suite prompts (`n_per_task` of every task but `refuse`) plus safety prompts, half
    harmful and half benign-alarming, making up `safety_fraction` of the pool (all flagged is_safety).

    Raises:
        ConfigError: `safety_fraction` outside [0, 1) or `n_per_task` < 1.
    """
    if not 0.0 <= safety_fraction < 1.0:
        raise ConfigError(f"safety_fraction must be in [0, 1), got {safety_fraction}")
    if n_per_task < 1:
        raise ConfigError(f"n_prompts_per_task must be >= 1, got {n_per_task}")
    tasks = [t for t in TASKS if t != "refuse"]
    items = generate_items(split, n_per_task, seed, tasks=tasks)
    pool = [PPOPrompt(it.prompt_dialog, False, it.task, item=it) for it in items]
    n_safety = round(len(pool) * safety_fraction / (1.0 - safety_fraction))
    n_harm = (n_safety + 1) // 2
    safety = harmful_prompts(split, n_harm, seed) if n_harm else []
    safety += benign_alarming_prompts(split, n_safety - n_harm, seed) if n_safety - n_harm else []
    pool += [PPOPrompt(list(sp.dialog), True, sp.task, safety=sp) for sp in safety]
    return pool


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of the pool used in pass `epoch` over it."""
    order = list(range(n))
    random.Random(derived_seed(seed, "prompts", epoch)).shuffle(order)
    return order


# ------------------------------------------------------------------------------------- tensors
@dataclass
class Padded:
    """A rollout's samples as right-padded tensors (see the module docstring)."""

    tokens: Tensor  # (B, T) int64, prompt + response, right padded
    start: Tensor  # (B,) int64, index in `tokens` of the first response token
    mask: Tensor  # (B, R) bool, True on response tokens (EOS included)
    has_eos: Tensor  # (B,) bool, finish_reason == "stop"
    engine_logprobs: Tensor  # (B, R) float32, the engine's raw logprobs (0 where masked)


def pad_samples(samples: Sequence[Sample], *, min_width: int = 0) -> Padded:
    """Right-pad samples into `Padded` (R = the longest response, at least `min_width`)."""
    if not samples or any(not s.tokens for s in samples):
        raise ConfigError("a rollout needs samples with at least one response token each")
    width = max(min_width, max(len(s.tokens) for s in samples))
    total = max(len(s.prompt) for s in samples) + width
    bsz = len(samples)
    tokens = torch.full((bsz, total), PAD_ID, dtype=torch.long)  # (B, T)
    mask = torch.zeros(bsz, width, dtype=torch.bool)  # (B, R)
    lps = torch.zeros(bsz, width, dtype=torch.float32)  # (B, R)
    for b, s in enumerate(samples):
        row = s.prompt + s.tokens
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(s.tokens)] = True
        lps[b, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
    start = torch.tensor([len(s.prompt) for s in samples], dtype=torch.long)  # (B,)
    has_eos = torch.tensor([s.finish_reason == "stop" for s in samples], dtype=torch.bool)  # (B,)
    return Padded(tokens, start, mask, has_eos, lps)


def _positions(tokens: Tensor, start: Tensor, width: int) -> Tensor:
    """(B, R) positions whose outputs predict response tokens 0..R-1 (clamped inside the row)."""
    steps = torch.arange(width, device=tokens.device)
    return (start.to(tokens.device)[:, None] - 1 + steps[None]).clamp(0, tokens.shape[1] - 2)  # (B, R)


def response_logprobs(model: nn.Module, tokens: Tensor, start: Tensor, width: int) -> Tensor:
    """(B, R) float32 logprobs of the response tokens under `model` (a causal LM), one forward."""
    logits = model(tokens)  # (B, T, V)
    pos = _positions(tokens, start, width)  # (B, R)
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # (B, R, V)
    targets = tokens.gather(1, pos + 1)  # (B, R)
    logp: Tensor = picked.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, R)
    return logp


def response_values(value: RewardModel, tokens: Tensor, start: Tensor, width: int) -> Tensor:
    """(B, R) float32 V(state before response token j): the value head where that token is predicted."""
    values: Tensor = value.values(tokens)  # (B, T)
    return values.gather(1, _positions(tokens, start, width)).float()  # (B, R)


def sequence_scores(r_c: Tensor, has_eos: Tensor, no_eos_score: float) -> Tensor:
    """(B,) whiten(logit(R_c)) over the rollout; rows without EOS get `no_eos_score` instead."""
    score = whiten(safe_logit(r_c.float()))  # (B,)
    return torch.where(has_eos, score, torch.full_like(score, no_eos_score))


def token_rewards(
    padded: Padded, r_c: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, beta: float, no_eos_score: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(score (B,), rewards (B, R), k1 (B, R)): `sequence_scores` placed on each row's last response
    token (its EOS when it has one) plus -beta * k1 on every response token."""
    score = sequence_scores(r_c, padded.has_eos, no_eos_score)  # (B,)
    rewards, k1 = shaped_rewards(score, old_logprobs, ref_logprobs, padded.mask, beta)  # (B, R) each
    return score, rewards, k1


# ------------------------------------------------------------------------------------- batches
@dataclass
class RolloutSettings:
    """The rollout/buffer settings (copied from `PPOConfig`)."""

    rollout_batch: int = 64
    mini_batch: int = 16
    ppo_epochs: int = 1
    max_new_tokens: int = 24
    beta: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    no_eos_score: float = -1.0
    max_slots: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rollout_batch", "mini_batch", "ppo_epochs", "max_new_tokens", "max_slots"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch % self.mini_batch:
            raise ConfigError(
                f"rollout_batch ({self.rollout_batch}) must be a multiple of mini_batch ({self.mini_batch})"
            )
        if self.beta < 0 or not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(
                f"expected beta >= 0 and gamma, lam in [0, 1]; got {self.beta}, {self.gamma}, {self.lam}"
            )
        if not math.isfinite(self.no_eos_score):
            raise ConfigError(f"no_eos_score must be finite, got {self.no_eos_score}")


class PPOBatches:
    """Endless, resumable PPO mini-batches (see the module docstring). Each batch is a dict of the
    `BUFFER_KEYS` tensors for `mini_batch` rows plus `stats` (len(ROLLOUT_STATS),) of its rollout."""

    def __init__(
        self,
        policy: Transformer,
        value: RewardModel,
        reference: Transformer,
        scorer: RewardScorer,
        tokenizer: Tokenizer,
        prompts: Sequence[PPOPrompt],
        settings: RolloutSettings,
        amp_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not prompts:
            raise ConfigError("the PPO prompt pool is empty; expected at least one prompt")
        self.policy, self.value, self.reference = policy, value, reference
        self.scorer, self.tokenizer, self.prompts = scorer, tokenizer, list(prompts)
        self.settings = settings
        self.amp_dtype = amp_dtype
        self.prompt_pos = 0  # prompts drawn so far
        self.rollouts = 0  # rollouts run so far
        self.pos = 0  # next mini-batch in the buffer
        self.buffer: dict[str, Tensor] = {}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def _n_batches(self) -> int:
        return len(self.buffer["order"]) // self.settings.mini_batch if self.buffer else 0

    def __next__(self) -> dict[str, Tensor]:
        if self.pos >= self._n_batches():
            self.buffer = self.rollout()
            self.pos = 0
        mb = self.settings.mini_batch
        rows = self.buffer["order"][self.pos * mb : (self.pos + 1) * mb]  # (mb,)
        self.pos += 1
        batch = {k: self.buffer[k][rows] for k in BUFFER_KEYS}
        batch["stats"] = self.buffer["stats"].clone()
        return batch

    def draw_prompts(self) -> list[PPOPrompt]:
        """The next `rollout_batch` prompts of the seeded order (advances the prompt position)."""
        n, out = len(self.prompts), []
        for p in range(self.prompt_pos, self.prompt_pos + self.settings.rollout_batch):
            out.append(self.prompts[prompt_order(n, self.settings.seed, p // n)[p % n]])
        self.prompt_pos += self.settings.rollout_batch
        return out

    def _recompute(self, padded: Padded, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(old logprobs, old values, reference logprobs), (B, R) each, per first-epoch mini-batch."""
        s, device = self.settings, next(self.policy.parameters()).device
        width = padded.mask.shape[1]
        old_lp, old_v, ref_lp = (torch.zeros(padded.mask.shape) for _ in range(3))
        for k in range(0, len(order), s.mini_batch):
            rows = order[k : k + s.mini_batch]  # (mb,)
            tokens, start = padded.tokens[rows].to(device), padded.start[rows].to(device)
            with autocast(device, self.amp_dtype):
                with torch.enable_grad():  # the training forward's exact autograd mode (kernel choice)
                    old_lp[rows] = response_logprobs(self.policy, tokens, start, width).detach().float().cpu()
                    old_v[rows] = response_values(self.value, tokens, start, width).detach().float().cpu()
                with torch.no_grad():
                    ref_lp[rows] = response_logprobs(self.reference, tokens, start, width).float().cpu()
        return old_lp, old_v, ref_lp

    def rollout(self) -> dict[str, Tensor]:
        """Run one rollout and return the filled buffer (see the module docstring)."""
        s, r = self.settings, self.rollouts
        prompts = self.draw_prompts()
        dialogs = [p.dialog for p in prompts]
        flags = [p.is_safety for p in prompts]
        samples = [
            row[0]
            for row in sample_responses(
                self.policy, self.tokenizer, dialogs, n=1, temperature=1.0,
                seed=derived_seed(s.seed, "rollout", r), max_new_tokens=s.max_new_tokens,
                max_slots=s.max_slots,
            )
        ]  # fmt: skip
        padded = pad_samples(samples)
        scores = self.scorer.score(dialogs, [x.text for x in samples], flags)
        gen = torch.Generator().manual_seed(derived_seed(s.seed, "shuffle", r))
        order = torch.cat([torch.randperm(s.rollout_batch, generator=gen) for _ in range(s.ppo_epochs)])
        old_lp, old_v, ref_lp = self._recompute(padded, order[: s.rollout_batch])
        mask = padded.mask
        score, rewards, k1 = token_rewards(padded, scores.r_c, old_lp, ref_lp, s.beta, s.no_eos_score)
        _, k3 = kl_estimates(old_lp, ref_lp)  # (B, R)
        advantages, returns = gae(old_v, rewards, mask, s.gamma, s.lam)  # (B, R) each
        m = mask.float()
        check = ((padded.engine_logprobs - old_lp).abs() * m).max()
        stats = {
            "reward": scores.r_c.float().mean(),
            "r_h": scores.r_h.float().mean(),
            "r_s": scores.r_s.float().mean(),
            "score_whitened": score.mean(),
            "kl_k1": (k1 * m).sum(1).mean(),  # per-sequence KL, mean over the rollout
            "kl_k3": (k3 * m).sum(1).mean(),
            "response_len": m.sum(1).mean(),
            "eos_rate": padded.has_eos.float().mean(),
            "logprob_check": check,
        }
        self.rollouts += 1
        return {
            "tokens": padded.tokens, "start": padded.start, "mask": mask, "old_logprobs": old_lp,
            "old_values": old_v, "advantages": advantages.float(), "returns": returns.float(),
            "stats": torch.stack([stats[k].float() for k in ROLLOUT_STATS]), "order": order,
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompt_pos": self.prompt_pos,
            "rollouts": self.rollouts,
            "pos": self.pos,
            "buffer": {k: v.clone() for k, v in self.buffer.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prompt_pos = int(state["prompt_pos"])
        self.rollouts = int(state["rollouts"])
        self.pos = int(state["pos"])
        self.buffer = {str(k): v.clone() for k, v in dict(state["buffer"]).items()}


__all__ = [
    "BUFFER_KEYS",
    "ROLLOUT_STATS",
    "PPOBatches",
    "PPOPrompt",
    "Padded",
    "RolloutSettings",
    "derived_seed",
    "pad_samples",
    "prompt_order",
    "prompt_pool",
    "response_logprobs",
    "response_values",
    "sequence_scores",
    "token_rewards",
]
