"""`Transformer` numerics against transformers' `LlamaForCausalLM` (GQA 8/2 heads, rope theta 1e6):
full forward, cached prefill + decode, per-row positions with slots (continuous batching)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from llama2.config import ModelArgs
from llama2.errors import GenerationError
from llama2.model import Transformer

ATOL = 1e-4
Pair = tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 80, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf(pair: Pair, toks: torch.Tensor) -> torch.Tensor:
    return pair[0](toks).logits.float()


@torch.no_grad()
def test_full_forward_and_hidden_states(pair: Pair, ours: Transformer) -> None:
    toks = _tokens(3, 20, seed=1)
    ref = _hf(pair, toks)
    logits = ours(toks)
    assert (logits - ref).abs().max().item() < ATOL
    assert torch.allclose(ours.output(ours.hidden_states(toks)).float(), logits)
    hf_hidden = pair[0].model(toks).last_hidden_state
    assert (ours.hidden_states(toks) - hf_hidden).abs().max().item() < ATOL


@torch.no_grad()
def test_prefill_and_decode_with_cache(pair: Pair, ours: Transformer) -> None:
    toks = _tokens(2, 18, seed=2)
    ref = _hf(pair, toks)
    ours.setup_caches(max_batch_size=4, max_seq_len=32)
    steps = [ours(toks[:, :5], 0)]
    for pos in range(5, 18):
        steps.append(ours(toks[:, pos : pos + 1], pos))
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < ATOL
    # Prefill in two chunks, then decode: same logits.
    ours.clear_caches()
    ours.setup_caches(max_batch_size=2, max_seq_len=32)
    chunks = [ours(toks[:, :7], 0), ours(toks[:, 7:12], 7), ours(toks[:, 12:13], 12)]
    assert (torch.cat(chunks, dim=1) - ref[:, :13]).abs().max().item() < ATOL


@torch.no_grad()
def test_per_row_positions_and_slots(pair: Pair, ours: Transformer) -> None:
    """Continuous batching: sequences of different lengths in arbitrary cache slots, decoded together."""
    a, b = _tokens(1, 15, seed=3), _tokens(1, 9, seed=4)
    ref_a, ref_b = _hf(pair, a), _hf(pair, b)
    ours.setup_caches(max_batch_size=4, max_seq_len=32)
    slots = torch.tensor([3, 1])
    # Prefill each sequence alone into its slot (10 and 4 tokens).
    out_a = ours(a[:, :10], torch.tensor([0]), slots=slots[:1])
    out_b = ours(b[:, :4], torch.tensor([0]), slots=slots[1:])
    assert (out_a - ref_a[:, :10]).abs().max().item() < ATOL
    assert (out_b - ref_b[:, :4]).abs().max().item() < ATOL
    # Decode both together at different positions.
    for step in range(5):
        pos = torch.tensor([10 + step, 4 + step])
        batch = torch.stack([a[0, 10 + step], b[0, 4 + step]])[:, None]  # (2, 1)
        out = ours(batch, pos, slots=slots)
        assert (out[0, 0] - ref_a[0, 10 + step]).abs().max().item() < ATOL
        assert (out[1, 0] - ref_b[0, 4 + step]).abs().max().item() < ATOL


@torch.no_grad()
def test_cache_overflow_is_a_user_error(ours: Transformer) -> None:
    ours.setup_caches(max_batch_size=1, max_seq_len=8)
    with pytest.raises(GenerationError, match="past the KV cache length 8"):
        ours(_tokens(1, 9, seed=5), 0)


@torch.no_grad()
def test_bfloat16_weights_close_to_float32(pair: Pair, ours: Transformer) -> None:
    toks = _tokens(2, 12, seed=6)
    ref = _hf(pair, toks)
    bf = ours.to(torch.bfloat16)
    logits = bf(toks)
    assert logits.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (logits - ref).abs().max().item() < 0.1 * scale
