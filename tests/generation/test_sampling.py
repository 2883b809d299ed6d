"""Sampling functions against independent references: a literal copy of Meta's `sample_top_p`,
transformers' logits processors, and OpenAI's documented penalty formula written out with loops."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from llama2.errors import GenerationError
from llama2.generation.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    make_sampler,
    min_p_mask,
    sample_top_p,
    top_k_mask,
)

V = 257


def meta_sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Meta's `llama/generation.py: sample_top_p`, verbatim apart from the explicit generator."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


def logits(b: int = 4, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches_meta_reference(p: float) -> None:
    x = logits()
    probs = torch.softmax(x / 0.7, dim=-1)
    for trial in range(20):
        ours = sample_top_p(probs.clone(), p, torch.Generator().manual_seed(trial))
        ref = meta_sample_top_p(probs.clone(), p, torch.Generator().manual_seed(trial))
        assert torch.equal(ours, ref)


def test_top_p_small_p_keeps_only_argmax() -> None:
    x = logits()
    probs = torch.softmax(x, dim=-1)
    for seed in range(5):
        out = sample_top_p(probs, 1e-6, torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(out, x.argmax(-1))


def test_sampler_temperature_top_p_reproduces_meta_per_row() -> None:
    """Each row has its own generator: row i's samples equal Meta's pipeline run alone with that seed."""
    x = logits(b=3)
    seeds = [11, 22, 33]
    sampler = Sampler([SamplingParams(temperature=0.6, top_p=0.9, seed=s) for s in seeds], V, x.device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(10):
        ours = sampler.sample(x)
        for i in range(3):
            probs = torch.softmax(x[i : i + 1] / 0.6, dim=-1)
            ref = meta_sample_top_p(probs, 0.9, gens[i])
            assert ours[i].item() == ref.item()


def test_seeded_rows_do_not_depend_on_batch() -> None:
    x = logits(b=2)
    alone = Sampler([SamplingParams(temperature=1.0, seed=5)], V, x.device)
    batch = Sampler(
        [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.3, seed=9)], V, x.device
    )
    a = [alone.sample(x[:1]).item() for _ in range(15)]
    b = [batch.sample(x)[0].item() for _ in range(15)]
    assert a == b
    assert len(set(a)) > 1  # really sampling


@pytest.mark.parametrize("k", [1, 5, 50, V, V + 10])
def test_top_k_matches_transformers(k: int) -> None:
    x = logits()
    x[0, :10] = 1.0  # ties at the boundary
    ref = TopKLogitsWarper(top_k=k)(torch.zeros(4, 1, dtype=torch.long), x.clone())
    assert torch.equal(top_k_mask(x, k), ref)


def test_top_k_per_row() -> None:
    x = logits()
    ks = torch.tensor([1, 0, 7, 30])
    out = top_k_mask(x, ks)
    for i, k in enumerate(ks.tolist()):
        ref = (
            x[i : i + 1]
            if k == 0
            else TopKLogitsWarper(top_k=k)(torch.zeros(1, 1, dtype=torch.long), x[i : i + 1])
        )
        assert torch.equal(out[i : i + 1], ref)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p: float) -> None:
    x = logits()
    ref = MinPLogitsWarper(min_p=min_p)(torch.zeros(4, 1, dtype=torch.long), x.clone())
    assert torch.equal(min_p_mask(x, min_p), ref)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    x = logits()
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, V, (4, 40), generator=g)  # prompt + output so far, with repeats
    seen = torch.zeros(4, V, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(input_ids, x.clone())
    assert torch.allclose(apply_repetition_penalty(x, seen, penalty), ref, atol=0, rtol=0)


def test_presence_frequency_match_openai_formula() -> None:
    x = logits(b=2)
    generated = [[3, 3, 7, 100, 3], [5]]
    counts = torch.zeros(2, V, dtype=torch.int32)
    for i, toks in enumerate(generated):
        for t in toks:
            counts[i, t] += 1
    out = apply_presence_frequency_penalty(x, counts, 0.5, 0.25)
    ref = x.clone()
    for i, toks in enumerate(
        generated
    ):  # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
        for t in set(toks):
            ref[i, t] -= toks.count(t) * 0.25 + 0.5
    assert torch.allclose(out, ref)


def test_sampler_penalties_track_prompt_and_output() -> None:
    x = torch.zeros(1, V)
    x[0, 10] = 2.0
    x[0, 11] = 1.9
    sampler = Sampler([SamplingParams(temperature=0.0, repetition_penalty=2.0)], V, x.device, prompts=[[10]])
    assert sampler.sample(x).item() == 11  # 10 was in the prompt: 2.0 / 2 < 1.9
    sampler = Sampler([SamplingParams(temperature=0.0, frequency_penalty=0.2)], V, x.device, prompts=[[10]])
    assert sampler.sample(x).item() == 10  # the prompt does not count for OpenAI's penalties
    sampler.update(torch.tensor([10]))
    assert sampler.sample(x).item() == 11


def test_logit_bias_and_greedy() -> None:
    x = logits(b=2)
    top = x.argmax(-1)
    sampler = Sampler(
        [
            SamplingParams(temperature=0.0, logit_bias={int(top[0]): float("-inf")}),
            SamplingParams(temperature=0.0),
        ],
        V,
        x.device,
    )
    out = sampler.sample(x)
    assert out[0].item() == x[0].topk(2).indices[1].item()
    assert out[1].item() == top[1].item()
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        Sampler([SamplingParams(logit_bias={V: 1.0})], V, x.device)


def test_make_sampler_top_k_one_is_greedy() -> None:
    x = logits()
    sampler = make_sampler(temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler(x), x.argmax(-1))
    assert torch.equal(make_sampler(temperature=0.0)(x), x.argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
    ],
)
def test_invalid_params_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
