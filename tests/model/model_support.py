"""Helpers for model tests: a tiny random transformers `LlamaForCausalLM` (the oracle) and the same
weights in our `Transformer` (q/k rows un-permuted to Meta's rotary layout)."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama2.checkpoint import keymaps
from llama2.config import ModelArgs
from llama2.model import Transformer

ARGS = ModelArgs(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=80,
    hidden_dim=96,
    norm_eps=1e-5,
    rope_theta=1e6,
    max_seq_len=32,
)


def make_pair(args: ModelArgs) -> tuple[LlamaForCausalLM, ModelArgs, dict[str, torch.Tensor]]:
    """(HF model, our args, our state dict) with identical random weights."""
    cfg = LlamaConfig(**args.to_hf_config())
    hf = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                std = 1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    sd: dict[str, torch.Tensor] = {}
    for hf_name, t in hf.state_dict().items():
        name = keymaps.rename(hf_name, keymaps.HF_TO_META)
        assert name is not None
        if name.endswith("wq.weight"):
            t = keymaps.hf_to_meta_qk(t, args.n_heads)
        elif name.endswith("wk.weight"):
            t = keymaps.hf_to_meta_qk(t, args.kv_heads)
        sd[name] = t.clone()
    return hf, args, sd


def build_ours(args: ModelArgs, sd: dict[str, torch.Tensor]) -> Transformer:
    """Our `Transformer` built on the meta device and assigned `sd` (as the checkpoint loader does)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    return model.eval()
