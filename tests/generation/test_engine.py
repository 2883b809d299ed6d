"""The slot-based step engine: greedy tokens against transformers, seeded sampling identical to the
`Generator` (batched or alone, more sequences than slots), stop strings never streamed, and a row
with nothing left to sample failing alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gen_support import hf_to_ours

from llama2.errors import GenerationError
from llama2.generation import DecodeStep, Generator, SamplingParams, TokenEvent
from llama2.generation.engine import EngineConfig, SequenceDone, SequenceFailed, SequenceSpec, StepEngine
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

PROMPTS = ["Hello world", "The capital of France is a city that", "Once"]


@pytest.fixture(scope="module")
def engine_model(hf: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """A second copy of the weights: the engine owns its model's KV cache."""
    folder: Path = tmp_path_factory.mktemp("hf_engine")
    return hf_to_ours(hf, folder)


def _engine(model: Transformer, tok: Tokenizer, **kw: int) -> StepEngine:
    return StepEngine(model, tok, EngineConfig(**{"max_slots": 4, "prefill_chunk": 4, **kw}))


def _ids(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(t, bos=True, eos=False) for t in PROMPTS]


def test_greedy_matches_transformers(
    engine_model: Transformer, tokenizer: Tokenizer, hf: torch.nn.Module
) -> None:
    prompts = _ids(tokenizer)
    results = _engine(engine_model, tokenizer).run([SequenceSpec(p, 10) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=0,
            )
        want = out[0, len(p) :].tolist()
        assert r.tokens == (want[: want.index(2)] if 2 in want else want)
        assert r.text == tokenizer.decode(r.tokens)


@pytest.mark.parametrize("max_slots", [1, 4])
def test_seeded_sampling_equals_generator(
    engine_model: Transformer, model: Transformer, tokenizer: Tokenizer, max_slots: int
) -> None:
    """Temperature 0.8 with per-sequence seeds: the engine (with fewer slots than sequences, too)
    gives the Generator's tokens, text and logprobs, batched and alone."""
    prompts = _ids(tokenizer)
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=s) for s in (5, 6, 7)]
    specs = [SequenceSpec(p, 12, sp, logprobs=2) for p, sp in zip(prompts, params, strict=True)]
    got = _engine(engine_model, tokenizer, max_slots=max_slots).run(specs)
    gen = Generator(model, tokenizer)
    batched = gen.generate(prompts, 12, params, logprobs=True, top_logprobs=2)
    greedy = gen.generate(prompts, 12)
    for i, (g, b) in enumerate(zip(got, batched, strict=True)):
        [alone] = gen.generate([prompts[i]], 12, params[i], logprobs=True, top_logprobs=2)
        assert g.tokens == b.tokens == alone.tokens
        assert g.text == b.text and g.finish_reason == b.finish_reason
        assert g.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert g.top_logprobs is not None and b.top_logprobs is not None
        assert [list(t) for t in g.top_logprobs] == [list(t) for t in b.top_logprobs]
    assert [r.tokens for r in got] != [r.tokens for r in greedy]  # really sampled


def test_stop_string_is_cut_and_never_streamed(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    engine = _engine(engine_model, tokenizer)
    prompt = _ids(tokenizer)[1]
    [plain] = engine.run([SequenceSpec(prompt, 16)])
    assert len(plain.text) > 6
    stop = plain.text[3:6]
    want = plain.text[: plain.text.find(stop)]
    engine.add([engine.new_sequence("me", 0, SequenceSpec(prompt, 16, stop=(stop,)))])
    streamed = ""
    done: SequenceDone | None = None
    while engine.has_work():
        for owner, item in engine.step():
            assert owner == "me"
            if isinstance(item, TokenEvent):
                streamed += item.text
                assert stop not in streamed
            elif isinstance(item, SequenceDone):
                done = item
    assert done is not None
    assert done.result.text == streamed == want
    assert done.result.finish_reason == "stop"


def test_a_row_with_nothing_to_sample_fails_alone(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    prompts = _ids(tokenizer)[:2]
    vocab = engine_model.args.vocab_size
    banned = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(range(vocab), float("-inf")))
    engine = _engine(engine_model, tokenizer)
    [expected] = engine.run([SequenceSpec(prompts[1], 6)])
    engine.add(
        [
            engine.new_sequence("a", 0, SequenceSpec(prompts[0], 6, banned)),
            engine.new_sequence("b", 0, SequenceSpec(prompts[1], 6)),
        ]
    )
    items: dict[str, list[object]] = {"a": [], "b": []}
    while engine.has_work():
        for owner, item in engine.step():
            items[str(owner)].append(item)
    assert isinstance(items["a"][-1], SequenceFailed) and "no token can be chosen" in items["a"][-1].message
    last = items["b"][-1]
    assert isinstance(last, SequenceDone) and last.result.tokens == expected.tokens
    assert engine.free_slots() == 4
    with pytest.raises(GenerationError, match="no token can be chosen"):
        engine.run([SequenceSpec(prompts[0], 6, banned)])


def test_specs_are_checked(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    engine = _engine(engine_model, tokenizer)
    with pytest.raises(GenerationError, match="empty"):
        engine.run([SequenceSpec([], 4)])
    with pytest.raises(GenerationError, match="context window"):
        engine.run([SequenceSpec([1] * 60, 10)])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.run([SequenceSpec([1, 10**6], 4)])


def test_fixed_shape_decode_step_gives_the_same_tokens(
    engine_model: Transformer, tokenizer: Tokenizer
) -> None:
    """The path `EngineConfig(compile=...)` runs (DecodeStep over the whole cache, batches padded to
    max_slots), here eager: greedy and seeded results equal the plain engine's."""
    prompts = _ids(tokenizer)
    specs = [SequenceSpec(p, 10) for p in prompts]
    specs += [SequenceSpec(p, 10, SamplingParams(temperature=0.8, seed=3)) for p in prompts]
    plain = _engine(engine_model, tokenizer, max_slots=6).run(specs)
    engine = _engine(engine_model, tokenizer, max_slots=6)
    engine.decode_step = DecodeStep(engine_model)
    fixed = engine.run(specs)
    assert [r.tokens for r in fixed] == [r.tokens for r in plain]


@pytest.mark.slow
def test_compiled_engine_matches_eager(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    prompts = _ids(tokenizer)
    specs = [SequenceSpec(p, 8) for p in prompts]
    eager = _engine(engine_model, tokenizer).run(specs)
    compiled = StepEngine(engine_model, tokenizer, EngineConfig(max_slots=4, compile="default"))
    assert [r.tokens for r in compiled.run(specs)] == [r.tokens for r in eager]
