"""Generation never poisons training, and `model(tokens, start_pos)` has Meta's cached semantics.

Oracles: transformers' `LlamaForCausalLM` (full forward logits) and the gradients of an identical
copy of the model that never generated anything.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from model_support import ARGS
from transformers import LlamaForCausalLM

from llama2.config import ModelArgs
from llama2.errors import GenerationError
from llama2.generation import Generator, SamplingParams
from llama2.model import Transformer

ATOL = 1e-4
Pair = tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]


class _Tok:
    """The least a `Generator` needs: an EOS id outside the test vocabulary's hot range, and text."""

    eos_id = ARGS.vocab_size - 1

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)


class _Detok:
    def add(self, token_id: int) -> str:
        return f" {token_id}"

    def flush(self) -> str:
        return ""


def _generator(model: Transformer) -> Generator:
    return Generator(model, _Tok(), detokenizer_factory=lambda _: _Detok())


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARGS.vocab_size - 1, (batch, length), generator=gen)


def _loss(model: Transformer, toks: torch.Tensor) -> torch.Tensor:
    logits = model(toks[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_meta_prefill_then_step_reads_the_cache_without_no_grad(pair: Pair, ours: Transformer) -> None:
    """As Meta's `model(tokens, start_pos)`: plain calls (grad mode on, no decorator) read and write
    the cache; logits equal the oracle's full forward (batch 2, float32) and are ordinary tensors."""
    toks = _tokens(2, 16, seed=1)
    with torch.no_grad():
        ref = pair[0](toks).logits.float()  # (2, 16, V)
    ours.setup_caches(max_batch_size=2, max_seq_len=32)
    assert torch.is_grad_enabled()
    steps = [ours(toks[:, :5], 0)] + [ours(toks[:, t : t + 1], t) for t in range(5, 16)]
    out = torch.cat(steps, dim=1)  # (2, 16, V)
    assert (out - ref).abs().max().item() < ATOL
    last = steps[-1]
    assert not last.requires_grad and not torch.is_inference(last)
    last[:, :, 0] = 0.0  # an ordinary tensor: in-place edits are allowed (Meta's code does them)
    # Without the cache the single-token step would ignore the past (the bug of issue 10).
    fresh = copy.deepcopy(ours)
    fresh.clear_caches()
    with torch.no_grad():
        assert (fresh(toks[:, 15:16], 15)[:, 0] - ref[:, 15]).abs().max().item() > 10 * ATOL


def test_training_after_generation_matches_a_model_that_never_generated(
    pair: Pair, ours: Transformer
) -> None:
    twin = copy.deepcopy(ours)  # same weights, never used for generation
    gen = _generator(ours)
    gen.generate(_tokens(2, 6, seed=2).tolist(), 5, SamplingParams(temperature=0.0))
    gen.generate(_tokens(1, 4, seed=3).tolist(), 5, SamplingParams(temperature=0.8, top_p=0.9, seed=1))
    table = ours.rope._table
    cache = ours.cache
    assert table is not None and not torch.is_inference(table)
    assert cache is not None and not torch.is_inference(cache.k_cache)

    toks = _tokens(3, 12, seed=4)  # batch 3: larger than the generation's cache of 2 rows
    for model in (ours, twin):
        model.train()
        _loss(model, toks).backward()
    got, want = _grads(ours), _grads(twin)
    assert set(got) == set(want) and len(got) == len(list(twin.parameters()))
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6, msg=name)
    # The training forward is the plain causal pass: logits equal the oracle's.
    with torch.no_grad():
        ours.train()
        assert (ours(toks) - pair[0](toks).logits.float()).abs().max().item() < ATOL


def test_eval_and_plain_calls_after_generation(pair: Pair, ours: Transformer) -> None:
    """After generating (cache allocated under inference mode), `model(tokens, 0)` without any
    context manager, and a no_grad evaluation of a batch larger than the cache, both work."""
    _generator(ours).generate(_tokens(1, 5, seed=5).tolist(), 4, SamplingParams(temperature=0.0))
    toks = _tokens(4, 20, seed=6)
    with torch.no_grad():
        ref = pair[0](toks).logits.float()
    assert (ours(toks[:1, :6], 0) - ref[:1, :6]).abs().max().item() < ATOL  # in the cache
    with torch.no_grad():  # 4 rows, 20 positions: does not fit the 1-row cache; a plain pass
        assert (ours(toks) - ref).abs().max().item() < ATOL


def test_generation_after_training_matches_full_forwards(ours: Transformer) -> None:
    ours.train()
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    for seed in range(2):
        opt.zero_grad()
        _loss(ours, _tokens(2, 10, seed=10 + seed)).backward()
        opt.step()
    prompt = _tokens(1, 5, seed=7)[0].tolist()
    [res] = _generator(ours).generate([prompt], 6, SamplingParams(temperature=0.0))
    ids = list(prompt)
    plain = copy.deepcopy(ours)
    plain.clear_caches()
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(plain(torch.tensor([ids]))[0, -1].argmax()))
    assert res.tokens == ids[len(prompt) :]


def test_training_forward_with_a_cache_refuses_a_nonzero_start(ours: Transformer) -> None:
    ours.setup_caches(max_batch_size=1, max_seq_len=16)
    ours.train()
    toks = _tokens(1, 4, seed=8)
    with pytest.raises(GenerationError, match=r"training forward .* start_pos 3"):
        ours(toks[:, :1], 3)
    with torch.no_grad():  # without gradients the same call is a cached decode step
        ours(toks[:, :3], 0)
        assert ours(toks[:, 3:4], 3).shape == (1, 1, ARGS.vocab_size)


def test_caches_built_inside_inference_mode_are_ordinary(ours: Transformer) -> None:
    with torch.inference_mode():
        ours.setup_caches(max_batch_size=1, max_seq_len=16)
        ours.rope._table = None
        ours(_tokens(1, 3, seed=9), 0)
    cache = ours.cache
    assert cache is not None
    assert not torch.is_inference(cache.k_cache) and not torch.is_inference(cache.v_cache)
    assert ours.rope._table is not None and not torch.is_inference(ours.rope._table)
    with torch.no_grad():  # writes the cache outside inference mode
        ours(_tokens(1, 4, seed=9), 0)
