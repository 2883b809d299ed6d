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
generator), `make_sampler` and the server's engine all run.

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

NEG_INF = float("-inf")
POS_INF = float("inf")

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


# ------------------------------------------------------------------------------ pure functions
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
