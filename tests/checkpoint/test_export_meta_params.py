"""`export_meta` writes a folder Meta's own code loads: `params.json` holds only fields of Meta's
`ModelArgs` and, read with Meta's FFN rule and model-parallel split, gives exactly the shapes of the
shards. Oracle: Meta's `ModelArgs` and `FeedForward` width rule, copied here from facebookresearch/llama
and codellama `llama/model.py` (not from our code), constructed as Meta's `Llama.build` does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llama2.checkpoint import load_model
from llama2.checkpoint.save import export_meta
from llama2.config import ModelArgs, RopeScaling
from llama2.errors import ConfigError
from llama2.model import Transformer


@dataclass
class MetaModelArgs:
    """facebookresearch/llama `llama/model.py` (Llama 2)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # defined later by tokenizer
    multiple_of: int = 256  # make SwiGLU hidden layer size multiple of large power of 2
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5

    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class CodeLlamaModelArgs:
    """facebookresearch/codellama `llama/model.py`: Llama 2's plus rope_theta."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000

    max_batch_size: int = 32
    max_seq_len: int = 2048


def meta_hidden_dim(dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's `FeedForward.__init__`, called with hidden_dim = 4 * dim."""
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def meta_shard_shapes(a: Any, mp: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one model-parallel shard as fairscale's Column/RowParallelLinear and
    ParallelEmbedding hold them in Meta's `Transformer` (layer 0 and the top-level tensors)."""
    head_dim = a.dim // a.n_heads
    kv = a.n_heads if a.n_kv_heads is None else a.n_kv_heads
    hidden = meta_hidden_dim(a.dim, 4 * a.dim, a.multiple_of, a.ffn_dim_multiplier)
    return {
        "tok_embeddings.weight": (a.vocab_size, a.dim // mp),
        "layers.0.attention.wq.weight": (a.n_heads * head_dim // mp, a.dim),
        "layers.0.attention.wk.weight": (kv * head_dim // mp, a.dim),
        "layers.0.attention.wv.weight": (kv * head_dim // mp, a.dim),
        "layers.0.attention.wo.weight": (a.dim, a.n_heads * head_dim // mp),
        "layers.0.feed_forward.w1.weight": (hidden // mp, a.dim),
        "layers.0.feed_forward.w2.weight": (a.dim, hidden // mp),
        "layers.0.feed_forward.w3.weight": (hidden // mp, a.dim),
        "layers.0.attention_norm.weight": (a.dim,),
        "layers.0.ffn_norm.weight": (a.dim,),
        "norm.weight": (a.dim,),
        "output.weight": (a.vocab_size // mp, a.dim),
    }


BASE = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, max_seq_len=32)
CASES: dict[str, ModelArgs] = {
    # an HF-style explicit width (intermediate_size 80) below Meta's 2/3 * 4 * dim: needs a multiplier
    "hf-width-gqa": ModelArgs(**BASE, n_kv_heads=2, hidden_dim=80),
    # an explicit width above it (no multiplier needed) and a width no power-of-two rounding gives
    "hf-width-wide": ModelArgs(**BASE, hidden_dim=352),
    "hf-width-odd": ModelArgs(**BASE, hidden_dim=174),
    # Meta's own fields (70B style), kept as they are
    "meta-70b-style": ModelArgs(**BASE, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3),
    # Code Llama: rope_theta
    "codellama": ModelArgs(**BASE, multiple_of=16, rope_theta=1e6, norm_eps=1e-6),
}


def _model(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(args).eval()


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_code_reads_the_export(case: str, n_shards: int, tmp_path: Path) -> None:
    args = CASES[case]
    model = _model(args)
    out = export_meta(model, args, tmp_path / "meta", n_shards=n_shards)
    params = json.loads((out / "params.json").read_text())
    assert not {"max_seq_len", "max_batch_size", "hidden_dim", "rope_scaling", "format"} & set(params)
    # As Meta's Llama.build: ModelArgs(max_seq_len=..., max_batch_size=..., **params), then the vocab.
    meta_cls = CodeLlamaModelArgs if "rope_theta" in params else MetaModelArgs
    meta_args = meta_cls(max_seq_len=512, max_batch_size=4, **params)
    meta_args.vocab_size = args.vocab_size  # tokenizer.n_words
    if args.rope_theta != 10000.0:
        assert isinstance(meta_args, CodeLlamaModelArgs) and meta_args.rope_theta == args.rope_theta
    assert meta_args.norm_eps == args.norm_eps
    assert (meta_args.n_kv_heads or meta_args.n_heads) == args.kv_heads
    expected = meta_shard_shapes(meta_args, n_shards)
    for i in range(n_shards):
        shard = torch.load(out / f"consolidated.{i:02d}.pth", weights_only=True)
        for name, shape in expected.items():
            assert tuple(shard[name].shape) == shape, (name, i)
    # Meta's width equals ours, and our own loader reads the export back to the same logits.
    width = meta_hidden_dim(args.dim, 4 * args.dim, meta_args.multiple_of, meta_args.ffn_dim_multiplier)
    assert width == model.blocks[0].feed_forward.w1.weight.shape[0]
    loaded = load_model(out, progress=False)
    assert loaded.args.ffn_hidden_dim == width and loaded.args.rope_theta == args.rope_theta
    toks = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(toks), model(toks), rtol=0, atol=1e-5)


def test_meta_70b_fields_are_written_as_meta_does(tmp_path: Path) -> None:
    args = CASES["meta-70b-style"]
    params = json.loads((export_meta(_model(args), args, tmp_path) / "params.json").read_text())
    assert params == {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 96,
        "multiple_of": 64,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
    }


def test_rope_scaling_is_refused_before_writing(tmp_path: Path) -> None:
    args = ModelArgs(**BASE, rope_scaling=RopeScaling("linear", 2.0))
    with pytest.raises(ConfigError, match=r"params\.json cannot express rope scaling"):
        export_meta(_model(args), args, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
