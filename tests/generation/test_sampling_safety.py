"""One greedy rule, parameters validated when built, and non-finite logits never reaching
`torch.multinomial` (which would raise a raw RuntimeError)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llama2.errors import GenerationError
from llama2.generation.sampling import (
    GREEDY_TEMPERATURE,
    Sampler,
    SamplingParams,
    is_greedy,
    make_sampler,
    sample_top_p,
)

V = 50
NAN, INF = float("nan"), float("inf")


def _logits(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_greedy_rule_threshold() -> None:
    assert GREEDY_TEMPERATURE == 1e-5
    assert is_greedy(0.0) and is_greedy(1e-40) and is_greedy(9.99e-6)
    assert not is_greedy(1e-5) and not is_greedy(0.7)
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_tiny_temperatures_are_greedy_everywhere(temperature: float) -> None:
    x = _logits()
    want = x.argmax(-1)
    assert torch.equal(make_sampler(temperature=temperature)(x), want)
    sampler = Sampler([SamplingParams(temperature=temperature, top_p=0.9, seed=1)] * 3, V, x.device)
    assert torch.equal(sampler.sample(x), want)


def test_smallest_sampling_temperature_does_not_overflow() -> None:
    """logits / 1e-5 overflows float32 for logits above ~3.4e33: such rows are shifted first."""
    x = torch.zeros(2, V)
    x[:, 7] = 1e36
    x[:, 8] = 1e36 - 1e31  # also finite; below the max by far more than the temperature
    x[1] = _logits(1)[0]
    g = torch.Generator().manual_seed(0)
    out = make_sampler(temperature=GREEDY_TEMPERATURE, generator=g)(x)
    assert out[0].item() == 7 and out[1].item() == x[1].argmax().item()
    sampler = Sampler([SamplingParams(temperature=GREEDY_TEMPERATURE, seed=3)] * 2, V, x.device)
    assert sampler.sample(x).tolist() == out.tolist()


def test_nan_logits_are_never_chosen() -> None:
    x = _logits(2)
    x[0, 5] = NAN
    x[0, 6] = x[0].nan_to_num().max() + 5.0  # the best finite token
    x[1, ::2] = NAN
    greedy = make_sampler(temperature=0.0)(x)
    assert greedy[0].item() == 6  # argmax over raw logits would pick the NaN at 5
    assert greedy[1].item() == int(x[1, 1::2].argmax()) * 2 + 1
    g = torch.Generator().manual_seed(0)
    sampler = make_sampler(temperature=5.0, generator=g)  # hot: every finite token is likely
    draws = torch.stack([sampler(x) for _ in range(200)])  # (200, 2)
    assert not (draws[:, 0] == 5).any() and (draws[:, 1] % 2 == 1).all()


def test_positive_inf_logits_share_the_probability() -> None:
    """softmax's limit: only the +inf tokens, equally likely; greedy takes one of them."""
    x = _logits(1)
    x[0, 3] = INF
    x[0, 40] = INF
    assert make_sampler(temperature=0.0)(x).item() in (3, 40)
    sampler = Sampler([SamplingParams(temperature=0.7, seed=0)], V, x.device)
    seen = {int(sampler.sample(x).item()) for _ in range(60)}
    assert seen == {3, 40}


def test_a_row_with_no_candidate_raises_a_clear_error() -> None:
    x = _logits(2)
    x[1] = -INF
    x[1, :10] = NAN
    with pytest.raises(GenerationError, match=r"row 1: no token can be chosen"):
        make_sampler(temperature=0.8)(x)
    with pytest.raises(GenerationError, match=r"row 1: no token can be chosen"):
        make_sampler(temperature=0.0)(x)
    # All tokens banned by logit_bias.
    ban_all = {t: -INF for t in range(V)}
    sampler = Sampler([SamplingParams(temperature=0.9), SamplingParams(logit_bias=ban_all)], V, x.device)
    with pytest.raises(GenerationError, match="row 1"):
        sampler.sample(_logits(2))
    # A row that is not generating at this step (still in its prompt) does not need a token.
    out = sampler.sample(_logits(2), active=[True, False])
    assert out.shape == (2,)


def test_sample_top_p_refuses_non_finite_probabilities() -> None:
    probs = torch.softmax(_logits(2), dim=-1)
    for bad in (NAN, INF, -0.5):
        p = probs.clone()
        p[1, 4] = bad
        with pytest.raises(GenerationError, match="row 1: probabilities are not a distribution"):
            sample_top_p(p, 0.9, torch.Generator().manual_seed(0))
    with pytest.raises(GenerationError, match="row 0"):
        sample_top_p(torch.zeros(1, V), 0.9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": NAN},
        {"temperature": INF},
        {"temperature": -1e-9},
        {"temperature": "0.5"},
        {"top_p": NAN},
        {"top_p": -0.1},
        {"top_k": 2.5},
        {"top_k": True},
        {"min_p": NAN},
        {"min_p": -0.01},
        {"repetition_penalty": INF},
        {"repetition_penalty": NAN},
        {"presence_penalty": NAN},
        {"frequency_penalty": -INF},
        {"seed": 1.5},
        {"seed": 2**64},
        {"logit_bias": {3: NAN}},
        {"logit_bias": {3: INF}},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {"3": 1.0}},
    ],
)
def test_invalid_params_are_rejected_when_built(kwargs: dict[str, Any]) -> None:
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)


def test_valid_edge_params_are_accepted() -> None:
    SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1.0, seed=2**64 - 1, logit_bias={0: -INF, 1: 100.0})
    SamplingParams(temperature=GREEDY_TEMPERATURE, presence_penalty=-2.0, frequency_penalty=2.0)
