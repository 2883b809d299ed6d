"""`Generator` is a driver of the one step engine (the server's class): its lockstep mode against an
independent transcription of Meta's `generate` loop (different prompt lengths, torch's global
generator), the caller's cache checked, and a reused slot carrying no stale `logit_bias`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from gen_support import hf_to_ours

from llama2.errors import GenerationError
from llama2.generation import Generator, SamplingParams
from llama2.generation.engine import EngineConfig, SequenceSpec, StepEngine
from llama2.model import Transformer
from llama2.serve.async_engine import Engine as ServerEngine
from llama2.serve.server import add_arguments
from llama2.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine_model(hf: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """A second copy of the weights for engines that own their cache."""
    folder: Path = tmp_path_factory.mktemp("hf_engine2")
    return hf_to_ours(hf, folder)


def _meta_sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """facebookresearch/llama `generation.sample_top_p`, verbatim."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


@torch.inference_mode()
def _meta_generate(
    model: Transformer, prompts: list[list[int]], max_gen_len: int, temperature: float, top_p: float, eos: int
) -> list[list[int]]:
    """Meta's `Llama.generate` loop (pad id 0 is never fed: prompt tokens are forced)."""
    bsz = len(prompts)
    min_len, max_len = min(len(p) for p in prompts), max(len(p) for p in prompts)
    total_len = min(model.args.max_seq_len, max_gen_len + max_len)
    model.setup_caches(bsz, total_len, strict=False)
    tokens = torch.full((bsz, total_len), -1, dtype=torch.long)
    for k, t in enumerate(prompts):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    input_text_mask = tokens != -1
    tokens[~input_text_mask] = 0
    prev_pos = 0
    eos_reached = torch.tensor([False] * bsz)
    for cur_pos in range(min_len, total_len):
        logits = model(tokens[:, prev_pos:cur_pos], prev_pos)
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            next_token = _meta_sample_top_p(probs, top_p)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        next_token = next_token.reshape(-1)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        eos_reached |= (~input_text_mask[:, cur_pos]) & (next_token == eos)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    out = []
    for i, toks in enumerate(tokens.tolist()):
        toks = toks[len(prompts[i]) : len(prompts[i]) + max_gen_len]
        out.append(toks[: toks.index(eos)] if eos in toks else toks)
    return out


def test_generator_and_the_server_step_the_same_engine(
    model: Transformer, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert issubclass(ServerEngine, StepEngine)
    calls = []
    real_step = StepEngine.step

    def counting(self: StepEngine) -> object:
        calls.append(self.config.lockstep)
        return real_step(self)

    monkeypatch.setattr(StepEngine, "step", counting)
    prompt = tokenizer.encode("Hello world", bos=True, eos=False)
    [r] = Generator(model, tokenizer).generate([prompt], 5)
    assert len(r.tokens) == 5 and r.finish_reason == "length"
    assert calls == [True] * 5  # one engine step per token, nothing generated outside the engine


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_lockstep_batch_matches_metas_generate_loop(
    model: Transformer, tokenizer: Tokenizer, temperature: float
) -> None:
    prompts = [
        tokenizer.encode(t, bos=True, eos=False)
        for t in ("The capital of France is a city that", "Once", "Hello world")
    ]
    assert len({len(p) for p in prompts}) == 3  # rows leave their prompts at different steps
    torch.manual_seed(7)
    expected = _meta_generate(model, prompts, 6, temperature, 0.9, tokenizer.eos_id)
    torch.manual_seed(7)
    got = Generator(model, tokenizer).generate(prompts, 6, SamplingParams(temperature=temperature, top_p=0.9))
    assert [r.tokens for r in got] == expected
    torch.manual_seed(7)  # and the global generator is left where Meta's loop leaves it
    _meta_generate(model, prompts, 6, temperature, 0.9, tokenizer.eos_id)
    after_meta = torch.rand(1)
    torch.manual_seed(7)
    Generator(model, tokenizer).generate(prompts, 6, SamplingParams(temperature=temperature, top_p=0.9))
    assert torch.equal(torch.rand(1), after_meta)


def test_a_caller_cache_too_small_is_refused(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    engine_model.setup_caches(1, 16)
    with pytest.raises(GenerationError, match=r"KV cache \(1 x 16\) is too small; expected at least 3 rows"):
        StepEngine(engine_model, tokenizer, EngineConfig(max_slots=2, caller_cache=True))
    lock = StepEngine(engine_model, tokenizer, EngineConfig(max_slots=2, caller_cache=True, lockstep=True))
    spec = SequenceSpec([tokenizer.bos_id, 100], 4)
    with pytest.raises(GenerationError, match=r"expected at least 2 rows of 6 positions"):
        lock.run([spec, spec])


def test_a_reused_slot_keeps_no_logit_bias(engine_model: Transformer, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time", bos=True, eos=False)
    plain = SequenceSpec(prompt, 4)
    [alone] = StepEngine(engine_model, tokenizer, EngineConfig(max_slots=2)).run([plain])
    ban = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(alone.tokens, -100.0))
    banned = SequenceSpec(prompt, 4, ban)
    engine = StepEngine(engine_model, tokenizer, EngineConfig(max_slots=2))
    first = engine.run([banned, banned])  # both slots now have held a logit_bias
    assert not set(first[0].tokens) & set(alone.tokens)
    # Decoded in one batch with a biased row: the plain row must not read its slot's old bias.
    again, _ = engine.run([plain, banned])
    assert again.tokens == alone.tokens


def test_serve_has_a_compile_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--compile"]).compile is True
    assert parser.parse_args([]).compile is False
