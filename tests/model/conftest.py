"""Fixtures for model tests (helpers live in model_support.py)."""

from __future__ import annotations

import pytest
import torch
from model_support import ARGS, build_ours, make_pair
from transformers import LlamaForCausalLM

from llama2.config import ModelArgs
from llama2.model import Transformer


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]:
    """(HF model, our args, our state dict) with identical weights (GQA: 8 query, 2 KV heads)."""
    return make_pair(ARGS)


@pytest.fixture
def ours(pair: tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]) -> Transformer:
    """A fresh `Transformer` with the pair's weights, built on the meta device and assigned (as the
    checkpoint loader does)."""
    _, args, sd = pair
    return build_ours(args, sd)
