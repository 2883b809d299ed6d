"""Decode-speed paths against transformers' `LlamaForCausalLM`: the fixed-shape decode step (whole
cache, tensor positions, as `torch.compile` runs it), multi-head attention (no GQA), a float32
cache under bfloat16 weights; and the cache/rope invariants the speed relies on (cache reads are
views, the rotary table is neither a buffer nor cast with the weights)."""

from __future__ import annotations

import pytest
import torch
from model_support import ARGS, build_ours, make_pair
from transformers import LlamaForCausalLM

from llama2.config import ModelArgs
from llama2.generation import decode_one_token
from llama2.model import Transformer

ATOL = 1e-4
Pair = tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 80, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_static_decode_step_matches_transformers(pair: Pair, ours: Transformer) -> None:
    toks = _tokens(2, 18, seed=7)
    ref = pair[0](toks).logits.float()
    ours.setup_caches(max_batch_size=2, max_seq_len=32)
    assert (ours(toks[:, :6], 0) - ref[:, :6]).abs().max().item() < ATOL
    for pos in range(6, 18):
        out = decode_one_token(ours, toks[:, pos : pos + 1], torch.full((2,), pos))  # (2, V)
        assert out.shape == (2, ARGS.vocab_size)
        assert (out - ref[:, pos]).abs().max().item() < ATOL


@pytest.fixture(scope="module")
def mha_pair() -> Pair:
    return make_pair(ARGS.replace(n_kv_heads=None))


@torch.no_grad()
def test_multi_head_attention_prefill_decode_and_slots(mha_pair: Pair) -> None:
    hf, args, sd = mha_pair
    model = build_ours(args, sd)
    toks = _tokens(3, 14, seed=8)
    ref = hf(toks).logits.float()
    assert (model(toks) - ref).abs().max().item() < ATOL
    model.setup_caches(max_batch_size=4, max_seq_len=32)
    steps = [model(toks[:, :4], 0), model(toks[:, 4:9], 4)]
    steps += [model(toks[:, p : p + 1], p) for p in range(9, 14)]
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < ATOL
    # Per-row positions in slots 2 and 0: rows at different lengths decoded together.
    model.setup_caches(max_batch_size=4, max_seq_len=32)
    slots = torch.tensor([2, 0])
    model(toks[:1, :10], torch.tensor([0]), slots=slots[:1])
    model(toks[1:2, :6], torch.tensor([0]), slots=slots[1:])
    out = model(torch.stack([toks[0, 10], toks[1, 6]])[:, None], torch.tensor([10, 6]), slots=slots)
    assert (out[0, 0] - ref[0, 10]).abs().max().item() < ATOL
    assert (out[1, 0] - ref[1, 6]).abs().max().item() < ATOL


@torch.no_grad()
def test_cache_reads_are_views_in_head_major_layout(ours: Transformer) -> None:
    ours.setup_caches(max_batch_size=2, max_seq_len=16)
    cache = ours.cache
    assert cache is not None
    ours(_tokens(2, 4, seed=9), 0)
    k = torch.randn(2, 1, ARGS.kv_heads, ARGS.head_dim)  # (B, T, Hkv, D)
    v = torch.randn(2, 1, ARGS.kv_heads, ARGS.head_dim)
    keys, values = cache.update(k, v, None, 5, 4, None)
    assert keys.shape == (2, ARGS.kv_heads, 5, ARGS.head_dim)
    assert keys.data_ptr() == cache.k_cache.data_ptr() and values.data_ptr() == cache.v_cache.data_ptr()
    assert torch.equal(cache.k_cache[:, :, 4], k[:, 0]) and torch.equal(cache.v_cache[:, :, 4], v[:, 0])


@torch.no_grad()
def test_rope_table_is_lazy_float32_and_not_state(pair: Pair, ours: Transformer) -> None:
    assert not any("rope" in name for name in ours.state_dict())  # built on meta: nothing to load
    toks = _tokens(1, 8, seed=10)
    ref = pair[0](toks).logits.float()
    bf = ours.to(torch.bfloat16)
    bf(toks)
    table = bf.rope.table(8, toks.device)
    assert table.dtype == torch.float32 and table.shape[0] >= ARGS.max_seq_len
    # A float32 cache under bfloat16 weights: attention runs in float32; close to the oracle.
    bf.setup_caches(max_batch_size=1, max_seq_len=16, dtype=torch.float32)
    cache = bf.cache
    assert cache is not None and cache.k_cache.dtype == torch.float32
    out = torch.cat([bf(toks[:, :5], 0)] + [bf(toks[:, p : p + 1], p) for p in range(5, 8)], dim=1)
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
