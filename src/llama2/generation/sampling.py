"""Sampling as pure functions over logits, plus a batched `Sampler` that applies one `SamplingParams`
per row.

Order of operations per decoding step (the order transformers applies its processors in):

1. logit processors on the raw logits: repetition penalty (CTRL / HF: over tokens of prompt and
   output), presence and frequency penalties (OpenAI: over generated tokens), `logit_bias`;
2. greedy rows (temperature 0) take the argmax here;
3. temperature, then top-k and min-p masks (removed tokens get probability 0);
4. Meta's `sample_top_p`: sort descending, cumulative sum, drop tokens whose preceding mass already
   exceeds p, renormalise, draw with `torch.multinomial`.

With only temperature and top-p set, step 4 consumes random numbers exactly as Meta's reference
does, so a seeded `torch.Generator` reproduces Meta's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama2.errors import GenerationError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence.

    Attributes:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus mass in (0, 1]; 1 disables it. Meta's semantics (see `sample_top_p`).
        top_k: keep the k most likely tokens (ties at the k-th value are kept); 0 disables it.
        min_p: drop tokens whose probability is below `min_p` times the top probability; 0 disables it.
        repetition_penalty: CTRL / transformers penalty over tokens seen in prompt and output:
            positive logits are divided by it, negative ones multiplied; 1 disables it.
        presence_penalty: OpenAI's: subtracted once from the logit of every token already generated.
        frequency_penalty: OpenAI's: subtracted per occurrence of a token among generated tokens.
        seed: seeds a per-sequence `torch.Generator`, so samples do not depend on the rest of the
            batch; None uses torch's global generator.
        logit_bias: token id -> value added to its logit (e.g. -inf, or -100, to ban a token).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2] (OpenAI's range), got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ------------------------------------------------------------------------------ pure functions
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
    """
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


def make_sampler(
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """A function `logits (B, V) -> token ids (B,)` for fixed settings (mlx-lm's `make_sampler`)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)

    def sampler(logits: Tensor) -> Tensor:
        if params.greedy:
            return logits.argmax(dim=-1)
        x = logits.float() / params.temperature
        if params.top_k:
            x = top_k_mask(x, params.top_k)
        if params.min_p:
            x = min_p_mask(x, params.min_p)
        return sample_top_p(torch.softmax(x, dim=-1), params.top_p, generator).squeeze(-1)

    return sampler


# ------------------------------------------------------------------------------ batched sampler
class Sampler:
    """Applies a `SamplingParams` per row of a batch; holds the penalty state (tokens seen so far).

    Per-row settings become (B, 1) tensors so one step costs a handful of vectorised ops whatever
    the mix of settings; nothing here loops over the vocabulary in Python.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Build the per-row state.

        Args:
            params: one `SamplingParams` per row.
            vocab_size: V.
            device: where logits live.
            prompts: prompt token ids per row (the repetition penalty also covers them).
        """
        self.params = list(params)
        bsz = len(self.params)
        self.vocab_size = vocab_size
        self.device = device

        def column(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # (B, 1)

        self.greedy_rows = torch.tensor([p.greedy for p in self.params], device=device)  # (B,)
        self.all_greedy = bool(self.greedy_rows.all())
        self.temperature = column([p.temperature if not p.greedy else 1.0 for p in self.params])
        # top_p 1 -> inf: nothing is masked (not even float round-off in the cumulative sum).
        self.top_p = column([p.top_p if p.top_p < 1.0 else float("inf") for p in self.params])
        self.top_k = torch.tensor([p.top_k for p in self.params], dtype=torch.long, device=device)
        self.use_top_k = any(p.top_k > 0 for p in self.params)
        self.min_p = column([p.min_p for p in self.params])
        self.use_min_p = any(p.min_p > 0 for p in self.params)
        self.generators: list[torch.Generator | None] = []
        for p in self.params:
            if p.seed is None:
                self.generators.append(None)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(p.seed)
                self.generators.append(g)

        self.repetition = column([p.repetition_penalty for p in self.params])
        self.seen: Tensor | None = None
        if any(p.repetition_penalty != 1.0 for p in self.params):
            self.seen = torch.zeros(bsz, vocab_size, dtype=torch.bool, device=device)  # (B, V)
            for i, ids in enumerate(prompts or []):
                if ids:
                    self.seen[i, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
        self.presence = column([p.presence_penalty for p in self.params])
        self.frequency = column([p.frequency_penalty for p in self.params])
        self.counts: Tensor | None = None
        if any(p.presence_penalty or p.frequency_penalty for p in self.params):
            self.counts = torch.zeros(bsz, vocab_size, dtype=torch.int32, device=device)  # (B, V)
        self.bias: Tensor | None = None
        if any(p.logit_bias for p in self.params):
            self.bias = torch.zeros(bsz, vocab_size, dtype=torch.float32, device=device)  # (B, V)
            for i, p in enumerate(self.params):
                for tok, value in (p.logit_bias or {}).items():
                    if not 0 <= int(tok) < vocab_size:
                        raise GenerationError(
                            f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})"
                        )
                    self.bias[i, int(tok)] = float(value)

    @property
    def tracks_history(self) -> bool:
        """True when `update` records anything (repetition, presence or frequency penalties)."""
        return self.seen is not None or self.counts is not None

    def process(self, logits: Tensor) -> Tensor:
        """Penalties and bias on raw logits (B, V) -> processed float32 logits (B, V)."""
        x = logits.float()
        if self.seen is not None:
            x = apply_repetition_penalty(x, self.seen, self.repetition)
        if self.counts is not None:
            x = apply_presence_frequency_penalty(x, self.counts, self.presence, self.frequency)
        if self.bias is not None:
            x = x + self.bias
        return x

    def sample(self, logits: Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """Pick the next token of every row from raw logits (B, V) -> (B,) int64.

        `active` marks the rows that really generate at this step (others, e.g. rows still inside
        their prompt, get a placeholder). A row with its own seeded generator draws a random number
        only when it is active and not greedy, so its samples do not depend on the batch.
        """
        x = self.process(logits)
        greedy = x.argmax(dim=-1)  # (B,)
        if self.all_greedy:
            return greedy
        x = x / self.temperature
        if self.use_top_k:
            x = top_k_mask(x, self.top_k)
        if self.use_min_p:
            x = min_p_mask(x, self.min_p)
        probs = torch.softmax(x, dim=-1)  # (B, V)
        if all(g is None for g in self.generators):
            sampled = sample_top_p(probs, self.top_p).squeeze(-1)  # (B,)
        else:
            probs_sort, probs_idx = top_p_probs(probs, self.top_p)  # (B, V) each
            draws = []
            for i, g in enumerate(self.generators):
                if (active is None or active[i]) and not self.params[i].greedy:
                    draws.append(torch.multinomial(probs_sort[i : i + 1], num_samples=1, generator=g))
                else:
                    draws.append(torch.zeros(1, 1, dtype=torch.long, device=probs.device))
            sampled = torch.gather(probs_idx, -1, torch.cat(draws)).squeeze(-1)  # (B,)
        return torch.where(self.greedy_rows, greedy, sampled)

    def update(self, tokens: Tensor, active: Tensor | None = None) -> None:
        """Record the tokens (B,) just generated (rows where `active` is False are skipped)."""
        if self.seen is None and self.counts is None:
            return
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if active is not None:
            rows, tokens = rows[active], tokens[active]
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1
