"""Sampling as pure functions over logits, plus a batched `Sampler` that applies one `SamplingParams`
per row.

Order of operations per decoding step (the order transformers applies its processors in):

1. logit processors on the raw logits: repetition penalty (CTRL / HF: over tokens of prompt and
   output), presence and frequency penalties (OpenAI: over generated tokens), `logit_bias`;
2. `finite_logits`: NaN logits are never chosen; if some logits are +inf, only those remain,
   equally likely (softmax's limit); a generating row with nothing left raises `GenerationError`;
3. greedy rows (`is_greedy(temperature)`: below `GREEDY_TEMPERATURE`, 0 included) take the argmax;
4. temperature (`scale_logits`, overflow-safe), then top-k and min-p masks (removed tokens get
   probability 0);
5. Meta's `sample_top_p`: sort descending, cumulative sum, drop tokens whose preceding mass already
   exceeds p, renormalise, draw with `torch.multinomial`. Probabilities that are not finite never
   reach `torch.multinomial` (`top_p_probs` raises `GenerationError`).

`process_logits` is step 1 and `sample_tokens` steps 3-5: the one chain `Sampler` (the
generator), `make_sampler` and the server's engine all run. The tensor operations they compose
(`finite_logits`, the penalties, masks and Meta's nucleus step) live in `llama2.generation.logit_ops`
and are re-exported here.

With only temperature and top-p set, step 5 consumes random numbers exactly as Meta's reference
does, so a seeded `torch.Generator` reproduces Meta's samples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama2.errors import GenerationError
from llama2.generation.logit_ops import (
    NEG_INF,
    POS_INF,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    finite_logits,
    min_p_mask,
    require_candidates,
    sample_top_p,
    scale_logits,
    top_k_mask,
    top_p_probs,
)

# Temperatures below this decode greedily (vLLM's threshold): logits / T would overflow float32 for
# tiny T (1e-40), and the distribution is already the argmax's to float precision.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(temperature: float) -> bool:
    """The one greedy rule (Generator, `make_sampler`, `Sampler`, the server): a temperature below
    `GREEDY_TEMPERATURE` (0 included) picks the argmax."""
    return temperature < GREEDY_TEMPERATURE


def _number(name: str, value: object) -> float:
    """`value` as a float; GenerationError unless it is a real number (bools are not) and not NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if math.isnan(out):
        raise GenerationError(f"{name} must be a number, got NaN")
    return out


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenerationError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token of one sequence.

    Every field is validated here (GenerationError), so invalid settings never reach the sampler.

    Attributes:
        temperature: finite softmax temperature >= 0; below `GREEDY_TEMPERATURE` (1e-5; 0 included)
            decoding is greedy (argmax), see `is_greedy`.
        top_p: nucleus mass in (0, 1]; 1 disables it. Meta's semantics (see `sample_top_p`).
        top_k: keep the k most likely tokens (ties at the k-th value are kept); 0 disables it.
        min_p: drop tokens whose probability is below `min_p` times the top probability; 0 disables it.
        repetition_penalty: CTRL / transformers penalty over tokens seen in prompt and output:
            positive logits are divided by it, negative ones multiplied; 1 disables it.
        presence_penalty: OpenAI's: subtracted once from the logit of every token already generated.
        frequency_penalty: OpenAI's: subtracted per occurrence of a token among generated tokens.
        seed: seeds a per-sequence `torch.Generator`, so samples do not depend on the rest of the
            batch; None uses torch's global generator.
        logit_bias: token id (>= 0) -> value added to its logit: finite, or -inf to ban a token
            (e.g. -100 also bans it in practice); NaN and +inf are rejected.
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
        temperature = _number("temperature", self.temperature)
        if not 0.0 <= temperature < POS_INF:
            raise GenerationError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < _number("top_p", self.top_p) <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if _integer("top_k", self.top_k) < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= _number("min_p", self.min_p) <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < _number("repetition_penalty", self.repetition_penalty) < POS_INF:
            raise GenerationError(
                f"repetition_penalty must be finite and > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2] (OpenAI's range), got {value}")
        if self.seed is not None and not -(2**63) <= _integer("seed", self.seed) < 2**64:
            raise GenerationError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        for tok, bias in (self.logit_bias or {}).items():
            if _integer("logit_bias token id", tok) < 0:
                raise GenerationError(f"logit_bias token id must be >= 0, got {tok}")
            if _number(f"logit_bias[{tok}]", bias) == POS_INF:
                raise GenerationError(f"logit_bias[{tok}] must be finite or -inf, got +inf")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (`is_greedy(temperature)`)."""
        return is_greedy(self.temperature)


# ------------------------------------------------------------------------------ seeding
def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The one seeding rule: a seeded sequence draws from its own `torch.Generator` on the logits'
    device, seeded with `seed` (so its samples do not depend on the batch); None: no generator of
    its own (callers draw from torch's global generator, as Meta does)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice` of a request asking for several (OpenAI's `n`): distinct,
    reproducible streams `seed, seed + 1, ...` (mod 2**64); None stays None."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice) % 2**64


def process_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    seen: Tensor | None = None,
    counts: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Step 1 (logit processors) on raw logits (B, V) -> float32 (B, V).

    Args:
        logits: (B, V) raw model logits.
        params: one `SamplingParams` per row.
        seen: (B, V) bool tokens of prompt and output (repetition penalty), or None.
        counts: (B, V) int counts of generated tokens (presence / frequency penalties), or None.
        bias: (B, V) float32 `logit_bias` rows, or None.
    """
    x = logits.float()

    def column(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=x.device)[:, None]  # (B, 1)

    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        x = apply_repetition_penalty(x, seen, column([p.repetition_penalty for p in params]))
    if counts is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        x = apply_presence_frequency_penalty(
            x,
            counts,
            column([p.presence_penalty for p in params]),
            column([p.frequency_penalty for p in params]),
        )
    if bias is not None:
        x = x + bias
    return x


def sample_tokens(
    x: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None,
    active: Sequence[bool] | None = None,
) -> Tensor:
    """Steps 3-5, the one sampling chain: greedy rows take the argmax, the others are drawn.

    Args:
        x: (B, V) processed logits through `finite_logits`; every row has a token left.
        params: one `SamplingParams` per row.
        generators: one per row (`seeded_generator`), or one (or None) for the batch. One
            generator, None, or every entry None: one draw covers the whole batch (from torch's
            global generator when None), exactly as Meta's reference; otherwise each active,
            non-greedy row draws from its own generator (None: the global one).
        active: rows that really generate (others get a placeholder without drawing); None: all.

    Returns:
        (B,) int64 token ids.
    """
    greedy_rows = [p.greedy for p in params]
    chosen = x.argmax(dim=-1)  # (B,)
    if all(greedy_rows):
        return chosen
    dev = x.device

    def column(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]  # (B, 1)

    y = scale_logits(x, column([1.0 if p.greedy else p.temperature for p in params]))  # (B, V)
    if any(p.top_k > 0 for p in params):
        y = top_k_mask(y, torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev))
    if any(p.min_p > 0 for p in params):
        y = min_p_mask(y, column([p.min_p for p in params]))
    probs = torch.softmax(y, dim=-1)  # (B, V)
    # top_p 1 -> inf: nothing is masked (not even float round-off in the cumulative sum).
    top_p = column([p.top_p if p.top_p < 1.0 else POS_INF for p in params])
    if generators is None or isinstance(generators, torch.Generator):
        sampled = sample_top_p(probs, top_p, generators).squeeze(-1)  # (B,)
    elif all(g is None for g in generators):
        sampled = sample_top_p(probs, top_p).squeeze(-1)  # (B,)
    else:
        probs_sort, probs_idx = top_p_probs(probs, top_p)  # (B, V) each
        draws = []
        for i, g in enumerate(generators):
            if (active is None or active[i]) and not greedy_rows[i]:
                draws.append(torch.multinomial(probs_sort[i : i + 1], num_samples=1, generator=g))
            else:
                draws.append(torch.zeros(1, 1, dtype=torch.long, device=dev))
        sampled = torch.gather(probs_idx, -1, torch.cat(draws)).squeeze(-1)  # (B,)
    return torch.where(torch.tensor(greedy_rows, device=dev), chosen, sampled)


def make_sampler(
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """A function `logits (B, V) -> token ids (B,)` for fixed settings (mlx-lm's `make_sampler`).

    The same chain as `Sampler.sample` and the engine (`finite_logits`, then `sample_tokens`).

    Raises:
        GenerationError: invalid settings (as `SamplingParams`); at call time, a row with no
            finite logit.
    """
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)

    def sampler(logits: Tensor) -> Tensor:
        x = finite_logits(logits)  # (B, V)
        require_candidates(x)
        return sample_tokens(x, [params] * x.shape[0], generator)

    return sampler


# ------------------------------------------------------------------------------ batched sampler
class Sampler:
    """Applies a `SamplingParams` per row of a batch; holds the penalty state (tokens seen so far).

    A thin holder of per-row state over `process_logits`, `finite_logits` and `sample_tokens` (the
    chain the server's engine uses too); nothing here loops over the vocabulary in Python.
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
        self.generators = [seeded_generator(p.seed, device) for p in self.params]
        self.seen: Tensor | None = None
        if any(p.repetition_penalty != 1.0 for p in self.params):
            self.seen = torch.zeros(bsz, vocab_size, dtype=torch.bool, device=device)  # (B, V)
            for i, ids in enumerate(prompts or []):
                if ids:
                    self.seen[i, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
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
        return process_logits(logits, self.params, self.seen, self.counts, self.bias)

    def sample(self, logits: Tensor, active: Sequence[bool] | None = None) -> Tensor:
        """Pick the next token of every row from raw logits (B, V) -> (B,) int64.

        `active` marks the rows that really generate at this step (others, e.g. rows still inside
        their prompt, get a placeholder). A row with its own seeded generator draws a random number
        only when it is active and not greedy, so its samples do not depend on the batch.

        Raises:
            GenerationError: an active row has no token left (all logits -inf or NaN after
                penalties and `logit_bias`).
        """
        x = finite_logits(self.process(logits))  # (B, V)
        rows = None if active is None else torch.tensor(list(active), dtype=torch.bool, device=x.device)
        require_candidates(x, rows)
        if rows is not None:  # an idle row with nothing left gets a placeholder distribution
            x = x.masked_fill(rows.logical_not()[:, None] & (x == NEG_INF).all(-1, keepdim=True), 0.0)
        return sample_tokens(x, self.params, self.generators, active)

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


__all__ = [
    "GREEDY_TEMPERATURE",
    "NEG_INF",
    "POS_INF",
    "Sampler",
    "SamplingParams",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "choice_seed",
    "finite_logits",
    "is_greedy",
    "make_sampler",
    "min_p_mask",
    "process_logits",
    "require_candidates",
    "sample_tokens",
    "sample_top_p",
    "scale_logits",
    "seeded_generator",
    "top_k_mask",
    "top_p_probs",
]
