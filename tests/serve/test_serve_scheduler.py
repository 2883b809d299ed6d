"""The continuous-batching engine in-process (no HTTP): batch invariance against the static-batch
`Generator` run alone, chunked prefill interleaved with decode, slot accounting, queue limit, and
per-sequence failure isolation."""

from __future__ import annotations

import asyncio

import pytest
from serve_support import tiny_model, tokenizer_for

from llama2.generation import Generator, SamplingParams
from llama2.generation.sequence import TokenEvent
from llama2.serve.scheduler import (
    Engine,
    EngineConfig,
    EngineOverloadedError,
    QueueItem,
    RequestHandle,
    SequenceDone,
    SequenceFailed,
    SequenceSpec,
)
from llama2.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer_for(32000)


@pytest.fixture(scope="module")
def oracle(tok: Tokenizer) -> Generator:
    """The generation helper's static-batch generator over an identical model, used one prompt at a time."""
    return Generator(tiny_model(), tok)


def _engine(tok: Tokenizer, **kw: int) -> Engine:
    return Engine(tiny_model(), tok, EngineConfig(**kw))


async def _drain(handle: RequestHandle) -> list[QueueItem]:
    items: list[QueueItem] = []
    ended = 0
    while ended < len(handle.specs):
        item = await asyncio.wait_for(handle.queue.get(), 60)
        items.append(item)
        if isinstance(item, SequenceDone | SequenceFailed):
            ended += 1
    return items


def _prompts(tok: Tokenizer) -> list[list[int]]:
    texts = [
        "Hello world",
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a",
        "1, 2, 3, 4,",
        "Ünïcödé and emoji 🦙 are",
        "A " * 40 + "long prompt that needs several prefill chunks",
        "Q: What is 2+2?\nA:",
    ]
    return [tok.encode(t, bos=True, eos=False) for t in texts]


def test_greedy_under_load_equals_solo_generator(tok: Tokenizer, oracle: Generator) -> None:
    prompts = _prompts(tok)
    limits = [12, 20, 7, 25, 16, 9, 30, 14]
    expected = [oracle.generate([p], n, GREEDY)[0].tokens for p, n in zip(prompts, limits, strict=True)]
    engine = _engine(tok, max_slots=4, prefill_chunk=8, prefill_budget=16)  # more requests than slots
    engine.start()

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        handles = []
        for p, n in zip(prompts, limits, strict=True):
            handles.append(engine.submit([SequenceSpec(p, n, GREEDY)], loop))
            await asyncio.sleep(0.003)  # arrive while others are mid-decode
        results = await asyncio.gather(*(_drain(h) for h in handles))
        return [next(i for i in items if isinstance(i, SequenceDone)).result.tokens for items in results]

    try:
        got = asyncio.run(run())
    finally:
        engine.shutdown(5)
    assert got == expected
    assert engine.stats()["free_slots"] == 4


def test_long_prompt_prefill_is_interleaved_with_decode(tok: Tokenizer) -> None:
    engine = _engine(tok, max_slots=4, prefill_chunk=8, prefill_budget=8)
    engine.start()
    long_prompt = tok.encode("word " * 150, bos=True, eos=False)  # ~150 tokens: ~19 chunks of 8
    assert len(long_prompt) > 120
    events: list[tuple[str, int]] = []  # arrival order of ("short", token) / ("long", token)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        short = engine.submit([SequenceSpec(tok.encode("Hi", bos=True, eos=False), 60, GREEDY)], loop)
        first = await short.queue.get()  # the short stream is decoding
        events.append(("short", 0))
        assert isinstance(first, TokenEvent)
        long = engine.submit([SequenceSpec(long_prompt, 4, GREEDY)], loop)

        async def follow(name: str, h: RequestHandle) -> None:
            while True:
                item = await h.queue.get()
                if isinstance(item, SequenceDone | SequenceFailed):
                    return
                events.append((name, 0))

        await asyncio.gather(follow("short", short), follow("long", long))

    try:
        asyncio.run(run())
    finally:
        engine.shutdown(5)
    first_long = next(i for i, (name, _) in enumerate(events) if name == "long")
    # One chunk of 8 prompt tokens per step and one decode step per step: the short stream keeps getting
    # a token per chunk while the long prompt is read (a frozen stream would show ~1 token here).
    short_before = sum(1 for name, _ in events[:first_long] if name == "short")
    assert short_before >= len(long_prompt) // 8 - 2


def test_cancel_frees_slot_and_queue_limit(tok: Tokenizer) -> None:
    engine = _engine(tok, max_slots=2, max_queue=3, prefill_chunk=16, prefill_budget=16)
    engine.start()
    prompt = tok.encode("Hello", bos=True, eos=False)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        handles = [engine.submit([SequenceSpec(prompt, 200, GREEDY)], loop) for _ in range(2)]
        for h in handles:
            await h.queue.get()  # both decoding: both slots taken
        assert engine.stats()["free_slots"] == 0
        queued = engine.submit([SequenceSpec(prompt, 5, GREEDY)] * 3, loop)  # fills the queue (3)
        with pytest.raises(EngineOverloadedError):
            engine.submit([SequenceSpec(prompt, 5, GREEDY)], loop)
        for h in handles:
            h.cancel()
        items = await _drain(queued)  # the cancelled slots go to the queued sequences
        assert sum(isinstance(i, SequenceDone) for i in items) == 3
        for _ in range(100):
            if engine.idle():
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(run())
        stats = engine.stats()
    finally:
        engine.shutdown(5)
    assert stats == {"waiting": 0, "running": 0, "free_slots": 2, "cache_tokens": 0}


def test_failure_of_one_sequence_leaves_others_running(tok: Tokenizer, oracle: Generator) -> None:
    class Faulty(Engine):
        def _accept_token(self, seq, token, logprob, top):  # type: ignore[no-untyped-def]
            if seq.spec.stop == ("<fail>",) and seq.sampled == 2:
                raise RuntimeError("boom")
            return super()._accept_token(seq, token, logprob, top)

    engine = Faulty(tiny_model(), tok, EngineConfig(max_slots=4))
    engine.start()
    good = tok.encode("The capital of France is", bos=True, eos=False)
    expected = oracle.generate([good], 20, GREEDY)[0].tokens

    async def run() -> tuple[list[QueueItem], list[QueueItem]]:
        loop = asyncio.get_running_loop()
        ok = engine.submit([SequenceSpec(good, 20, GREEDY)], loop)
        bad = engine.submit([SequenceSpec(good, 20, GREEDY, stop=("<fail>",))], loop)
        return await asyncio.gather(_drain(ok), _drain(bad))

    try:
        ok_items, bad_items = asyncio.run(run())
    finally:
        engine.shutdown(5)
    assert isinstance(bad_items[-1], SequenceFailed) and "boom" in bad_items[-1].message
    done = ok_items[-1]
    assert isinstance(done, SequenceDone) and done.result.tokens == expected
    assert engine.stats()["free_slots"] == 4


def test_sampling_with_seed_is_batch_independent(tok: Tokenizer) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    prompt = tok.encode("Once upon a time", bos=True, eos=False)
    engine = _engine(tok, max_slots=8)
    engine.start()

    async def run() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        solo = await _drain(engine.submit([SequenceSpec(prompt, 24, params)], loop))
        others = [
            engine.submit([SequenceSpec(p, 24, SamplingParams(temperature=1.0))], loop)
            for p in _prompts(tok)[:6]
        ]
        crowded = engine.submit([SequenceSpec(prompt, 24, params)], loop)
        items, *_ = await asyncio.gather(_drain(crowded), *(_drain(h) for h in others))
        tokens = next(i for i in items if isinstance(i, SequenceDone)).result.tokens
        solo_tokens = next(i for i in solo if isinstance(i, SequenceDone)).result.tokens
        return solo_tokens, tokens

    try:
        solo, crowded = asyncio.run(run())
    finally:
        engine.shutdown(5)
    assert solo == crowded
    assert len(set(solo)) > 3  # really sampled, not a constant


def test_degenerate_sampling_settings_do_not_break_the_batch(tok: Tokenizer, oracle: Generator) -> None:
    """A denormal repetition penalty makes one row's distribution NaN: that row falls back to its
    argmax, and a tiny temperature decodes greedily; the rest of the batch is untouched."""
    prompt = tok.encode("Hello world", bos=True, eos=False)
    expected = oracle.generate([prompt], 12, GREEDY)[0].tokens
    engine = _engine(tok, max_slots=4)
    engine.start()

    async def run() -> list[list[QueueItem]]:
        loop = asyncio.get_running_loop()
        handles = [
            engine.submit([SequenceSpec(prompt, 12, GREEDY)], loop),
            engine.submit(
                [SequenceSpec(prompt, 12, SamplingParams(temperature=1.0, repetition_penalty=1e-300))], loop
            ),
            engine.submit([SequenceSpec(prompt, 12, SamplingParams(temperature=1e-30, seed=1))], loop),
        ]
        return list(await asyncio.gather(*(_drain(h) for h in handles)))

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown(5)
    done = [items[-1] for items in results]
    assert all(isinstance(d, SequenceDone) for d in done), done
    assert done[0].result.tokens == expected  # type: ignore[union-attr]
    assert done[2].result.tokens == expected  # type: ignore[union-attr]
    assert len(done[1].result.tokens) == 12  # type: ignore[union-attr]
