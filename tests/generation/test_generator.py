"""The generator against transformers' `generate` and against plain full forwards of the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gen_support import full_forward_logprobs, hf_to_ours, make_hf

from llama2.errors import GenerationError
from llama2.generation import GenerationResult, Generator, SamplingParams, TokenEvent
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

PROMPTS = ["Hello world", "The capital of France is a city that", "Once"]


@pytest.fixture(scope="module")
def gen(model: Transformer, tokenizer: Tokenizer) -> Generator:
    return Generator(model, tokenizer)


def encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t, bos=True, eos=False) for t in texts]


def hf_greedy(hf: torch.nn.Module, ids: list[int], n: int, **kwargs: float) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
            **kwargs,
        )
    new: list[int] = out[0, len(ids) :].tolist()
    return new[: new.index(2)] if 2 in new else new


def test_greedy_batch_matches_transformers(gen: Generator, tokenizer: Tokenizer, hf: torch.nn.Module) -> None:
    prompts = encode(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) == 3
    results = gen.generate(prompts, 12, SamplingParams(temperature=0.0))
    for p, r in zip(prompts, results, strict=True):
        assert r.tokens == hf_greedy(hf, p, 12)
        assert len(r.tokens) == 12 or r.finish_reason == "stop"
        assert r.text == tokenizer.decode(r.tokens)


def test_repetition_penalty_matches_transformers(
    gen: Generator, tokenizer: Tokenizer, hf: torch.nn.Module
) -> None:
    prompts = encode(tokenizer, PROMPTS[:2])
    results = gen.generate(prompts, 10, SamplingParams(temperature=0.0, repetition_penalty=0.5))
    plain = gen.generate(prompts, 10, SamplingParams(temperature=0.0))
    assert [r.tokens for r in results] != [r.tokens for r in plain]
    for p, r in zip(prompts, results, strict=True):
        assert r.tokens == hf_greedy(hf, p, 10, repetition_penalty=0.5)


def test_batched_equals_one_at_a_time(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 3)]
    batched = gen.generate(prompts, 10, params, logprobs=True)
    for p, sp, b in zip(prompts, params, batched, strict=True):
        [alone] = gen.generate([p], 10, sp, logprobs=True)
        assert alone.tokens == b.tokens
        assert alone.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_seeded_sampling_reproducible(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS[:1])
    a = gen.generate(prompts, 16, SamplingParams(temperature=1.0, seed=7))[0].tokens
    b = gen.generate(prompts, 16, SamplingParams(temperature=1.0, seed=7))[0].tokens
    c = gen.generate(prompts, 16, SamplingParams(temperature=1.0, seed=8))[0].tokens
    assert a == b
    assert a != c


def test_stop_string_cuts_text_and_stream_agrees(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS[:1])
    [full] = gen.generate(prompts, 20)
    assert len(full.text) > 12
    stop = full.text[6:9]
    cut = full.text.index(stop)
    [r] = gen.generate(prompts, 20, stop=[stop, "\x00never"])
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert len(r.tokens) < len(full.tokens)
    events = list(gen.stream(prompts, 20, stop=[stop]))
    assert "".join(e.text for e in events) == r.text
    assert [e.finish_reason for e in events][-1] == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_stop_token_ids_and_eos(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS[:1])
    [full] = gen.generate(prompts, 12)
    stop_id = full.tokens[4]
    first = full.tokens.index(stop_id)
    [r] = gen.generate(prompts, 12, stop_token_ids=[stop_id])
    assert r.tokens == full.tokens[:first]
    assert r.finish_reason == "stop"
    # EOS always stops: make it the most likely token at step 3 by banning nothing but favouring it.
    [e] = gen.generate(prompts, 12, SamplingParams(temperature=0.0, logit_bias={tokenizer.eos_id: 1e4}))
    assert e.tokens == [] and e.text == "" and e.finish_reason == "stop"


def test_context_window_bounds(model: Transformer, tokenizer: Tokenizer) -> None:
    gen = Generator(model, tokenizer, max_seq_len=16)
    short = [1, 15043, 3186]
    [r] = gen.generate([list(range(3, 16))], 10)  # 13 tokens: room for 3
    assert len(r.tokens) == 3 and r.finish_reason == "length"
    full_window = list(range(3, 19))
    results = gen.generate([full_window, short], 5)
    assert results[0].tokens == [] and results[0].finish_reason == "length"
    assert len(results[1].tokens) == 5
    with pytest.raises(GenerationError, match="context window is 16"):
        gen.generate([list(range(3, 20))], 1)
    with pytest.raises(GenerationError, match="empty"):
        gen.generate([[]], 1)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([[1, 40000]], 1)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        gen.generate([short], -1)


def test_logprobs_equal_full_forward(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS)
    results = gen.generate(prompts, 8, SamplingParams(temperature=1.0, seed=3), logprobs=True, top_logprobs=3)
    for p, r in zip(prompts, results, strict=True):
        ref = full_forward_logprobs(gen.model, p + r.tokens)  # (T, V)
        assert r.logprobs is not None and r.top_logprobs is not None
        assert len(r.logprobs) == len(r.tokens) == len(r.top_logprobs)
        for j, (tok, lp, top) in enumerate(zip(r.tokens, r.logprobs, r.top_logprobs, strict=True)):
            row = ref[len(p) - 1 + j]
            assert lp == pytest.approx(row[tok].item(), abs=1e-4)
            vals, idx = row.topk(3)
            assert list(top) == idx.tolist()
            assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-4)


def test_echo_prompt_logprobs(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS)
    results = gen.generate(prompts, 5, logprobs=True, echo=True)
    for p, r in zip(prompts, results, strict=True):
        assert r.prompt_logprobs is not None and len(r.prompt_logprobs) == len(p)
        ref = full_forward_logprobs(gen.model, p)
        assert r.prompt_logprobs[0] == 0.0
        expected = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
        assert r.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert r.text == tokenizer.decode(p + r.tokens)
    # max_new_tokens=0 with equal-length prompts still gives prompt logprobs (Meta's special case)
    [r0] = gen.generate(prompts[:1], 0, logprobs=True, echo=True)
    assert r0.tokens == [] and r0.prompt_logprobs == pytest.approx(results[0].prompt_logprobs, abs=1e-5)


def test_stream_events(gen: Generator, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS)
    events: list[TokenEvent] = []
    for event in gen.stream(prompts, 6, logprobs=True):
        assert not torch.is_inference_mode_enabled()  # inference mode must not leak across yields
        events.append(event)
    results: list[GenerationResult] = gen.generate(prompts, 6)
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine if e.finish_reason != "stop"] == r.tokens
        assert "".join(e.text for e in mine) == r.text
        assert mine[-1].finish_reason == r.finish_reason
        assert all(e.logprob is not None for e in mine)


def test_cache_allocated_once_and_reused(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = hf_to_ours(make_hf(seed=1), tmp_path)
    gen = Generator(model, tokenizer)
    gen.generate([[1, 15043]], 6)
    cache = model.cache
    assert cache is not None and cache.max_batch_size == 1 and cache.max_seq_len == 8
    gen.generate([[1, 15043]], 3)
    assert model.cache is cache
    gen.generate([[1, 15043], [1]], 3)
    assert model.cache is not cache
