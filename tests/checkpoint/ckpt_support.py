"""Helpers for checkpoint tests: tiny random-weight transformers `LlamaForCausalLM` models (the
oracle), saved with `save_pretrained`, and their reference logits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Tiny shapes covering MHA/GQA, rope theta, and linear/dynamic rope scaling.
HF_CASES: dict[str, dict[str, Any]] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa-theta1e6": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6),
    "linear": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "dynamic": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
}
VOCAB = 96
MAX_POS = 16  # dynamic scaling kicks in past this


def hf_config(case: str) -> LlamaConfig:
    kwargs: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(HF_CASES[case])
    return LlamaConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is sharp (a wrong q/k layout changes the logits a lot)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 2:
                std = 1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_model(case: str, seed: int = 0) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf_config(case))
    randomize_(model, seed)
    return model.eval()


def save_hf(model: LlamaForCausalLM, out: Path, **kwargs: Any) -> Path:
    model.save_pretrained(out, **kwargs)
    return out


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)
