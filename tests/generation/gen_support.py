"""Helpers for generation tests: a tiny random-weight Llama with the real Llama 2 vocabulary, built
in transformers (the oracle), saved with `save_pretrained` and loaded with our checkpoint loader."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from llama2.checkpoint.load import load_model
from llama2.config import ModelArgs
from llama2.model import Transformer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
TOKENIZER = FIXTURES / "tokenizer.model"

TINY = ModelArgs(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=64
)


def make_hf(seed: int = 0, args: ModelArgs = TINY) -> torch.nn.Module:
    """A random transformers LlamaForCausalLM whose logits are spread out (no near-ties for greedy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in args.to_hf_config().items() if k != "architectures"}
    hf = LlamaForCausalLM(LlamaConfig(**cfg, initializer_range=0.1)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "lm_head.weight":
                p.normal_(0.0, 0.5)
    return hf


def hf_to_ours(hf: torch.nn.Module, folder: Path) -> Transformer:
    """`save_pretrained` + our loader (which un-permutes q/k)."""
    hf.save_pretrained(folder)  # type: ignore[operator]
    return load_model(folder, progress=False).model


def full_forward_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain cache-free forward over `ids`: (T, V). The model's caches are restored."""
    caches = [layer.attention.cache for layer in model.layers]
    model.clear_caches()
    try:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    finally:
        for layer, cache in zip(model.layers, caches, strict=True):
            layer.attention.cache = cache


# Code Llama's vocabulary: the fixture's 32000 pieces + 16 more; 32007-32010 are the infilling pieces.
CODELLAMA_SPECIAL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}


def _piece_entry(piece: str, piece_type: int) -> bytes:
    """One serialised `ModelProto.pieces` entry (piece, score 0.0, type); short pieces only."""
    raw = piece.encode("utf-8")
    body = (
        b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + bytes([piece_type])
    )
    return b"\x0a" + bytes([len(body)]) + body


def codellama_tokenizer_bytes() -> bytes:
    """The fixture `tokenizer.model` with Code Llama's 16 extra pieces appended (protobuf merges a
    repeated field that appears again), the infilling ones as CONTROL pieces (type 3)."""
    extra = b"".join(
        _piece_entry(CODELLAMA_SPECIAL.get(i, f"<cl_extra_{i}>"), 3 if i in CODELLAMA_SPECIAL else 5)
        for i in range(32000, 32016)
    )
    return TOKENIZER.read_bytes() + extra


CODE_TINY = TINY.replace(vocab_size=32016, rope_theta=1e6)


def save_tiny_checkpoint(
    folder: Path, seed: int = 0, args: ModelArgs = CODE_TINY, tokenizer: bool = True
) -> Path:
    """A random-weight model in our format (`save_checkpoint`), with a Code Llama tokenizer beside it."""
    from llama2.checkpoint.save import save_checkpoint

    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.5)
    tok_path = None
    if tokenizer:
        tok_path = folder.parent / f"{folder.name}-tokenizer.model"
        tok_path.write_bytes(codellama_tokenizer_bytes())
    return save_checkpoint(model, args, folder, tokenizer_path=tok_path)
