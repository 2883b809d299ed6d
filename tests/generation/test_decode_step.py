"""The fixed-shape decode step inside the generator (the path `compile=` runs): same tokens as
transformers' greedy `generate` and as the plain generator when sampling; the compiled step itself
(slow: compilation takes a while on CPU)."""

from __future__ import annotations

import pytest
import torch
from test_generator import PROMPTS, encode, hf_greedy

from llama2.errors import GenerationError
from llama2.generation import DecodeStep, Generator, SamplingParams
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer


def _with_step(model: Transformer, tokenizer: Tokenizer, step: DecodeStep) -> Generator:
    gen = Generator(model, tokenizer)
    gen.decode_step = step
    return gen


def test_decode_step_greedy_matches_transformers(
    hf: torch.nn.Module, model: Transformer, tokenizer: Tokenizer
) -> None:
    gen = _with_step(model, tokenizer, DecodeStep(model))
    prompts = encode(tokenizer, PROMPTS)
    results = gen.generate(prompts, 12, SamplingParams(temperature=0.0))
    for ids, res in zip(prompts, results, strict=True):
        assert res.tokens == hf_greedy(hf, ids, 12)


def test_decode_step_sampling_matches_plain_generator(model: Transformer, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS[:2])
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(temperature=1.0, seed=4)]
    plain = Generator(model, tokenizer).generate(prompts, 10, params)
    stepped = _with_step(model, tokenizer, DecodeStep(model)).generate(prompts, 10, params)
    assert [r.tokens for r in stepped] == [r.tokens for r in plain]


def test_unknown_compile_mode(model: Transformer, tokenizer: Tokenizer) -> None:
    with pytest.raises(GenerationError, match="unknown compile mode 'fastest'"):
        Generator(model, tokenizer, compile="fastest")


@pytest.mark.slow
def test_compiled_generator_matches_eager(model: Transformer, tokenizer: Tokenizer) -> None:
    prompts = encode(tokenizer, PROMPTS)
    eager = Generator(model, tokenizer).generate(prompts, 8, SamplingParams(temperature=0.0))
    model.clear_caches()
    compiled = Generator(model, tokenizer, compile=True)
    assert compiled.decode_step is not None and compiled.decode_step.mode == "default"
    out = compiled.generate(prompts, 8, SamplingParams(temperature=0.0))
    assert [r.tokens for r in out] == [r.tokens for r in eager]
    cache = model.cache
    # Rounded up (capped by the context window): one graph serves generations of similar lengths.
    assert cache is not None and cache.max_seq_len == min(compiled.max_seq_len, 256)
