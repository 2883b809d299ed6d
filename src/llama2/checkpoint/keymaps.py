"""Tensor-name tables between our (Meta's) names and Hugging Face's and llama2.c's, plus the q/k
rotary permutation that transformers' conversion script applies.

Our model uses Meta's parameter names (`layers.{i}.attention.wq.weight`), so Meta checkpoints need no
renaming. Per-layer names are written with an `{i}` placeholder and expanded by `expand`.
"""

from __future__ import annotations

import re

from torch import Tensor

# --------------------------------------------------------------------------- our (Meta) names
META_GLOBAL_NAMES: tuple[str, ...] = ("tok_embeddings.weight", "norm.weight", "output.weight")
META_LAYER_NAMES: tuple[str, ...] = (
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "layers.{i}.attention_norm.weight",
    "layers.{i}.ffn_norm.weight",
)

# Tensors some checkpoints carry that the model recomputes: ignored on load.
META_IGNORED: tuple[str, ...] = ("rope.freqs",)
HF_IGNORED: tuple[str, ...] = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)

# Model-parallel split dimension of each tensor in Meta's `consolidated.NN.pth` shards (fairscale's
# ParallelEmbedding / RowParallelLinear split dim 1, ColumnParallelLinear dim 0); None: replicated in
# every shard (the norms), taken from shard 0.
META_SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.ffn_norm.weight": None,
}

# ------------------------------------------------------------------------------ Hugging Face
META_TO_HF: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_TO_META: dict[str, str] = {hf: meta for meta, hf in META_TO_HF.items()}

# ------------------------------------------------------------------------------------ llama2.c
# Tensor order of karpathy/llama2.c `.bin` files (export.py). A name with `{i}` stands for that tensor
# of every layer in turn (all layers' attention norms, then all layers' wq, ...). `freq_cis_real` and
# `freq_cis_imag` are the precomputed rotary tables (max_seq_len, head_dim/2) that only v0 files hold;
# the loader skips them. The output head comes last and only when the classifier is not shared.
LLAMA2C_V0_ORDER: tuple[str, ...] = (
    "tok_embeddings.weight",
    "layers.{i}.attention_norm.weight",
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "norm.weight",
    "freq_cis_real",
    "freq_cis_imag",
    "output.weight",
)
LLAMA2C_V1_ORDER: tuple[str, ...] = (
    "layers.{i}.attention_norm.weight",
    "layers.{i}.ffn_norm.weight",
    "norm.weight",
    "tok_embeddings.weight",
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "output.weight",
)
LLAMA2C_ROPE_TABLES: tuple[str, ...] = ("freq_cis_real", "freq_cis_imag")

_LAYER_RE = re.compile(r"^(.*?\.)(\d+)(\..*)$")


def expand(templates: tuple[str, ...] | list[str], n_layers: int) -> list[str]:
    """Expand `{i}` templates in order: a per-layer template yields one name per layer, in place."""
    out: list[str] = []
    for t in templates:
        if "{i}" in t:
            out.extend(t.format(i=i) for i in range(n_layers))
        else:
            out.append(t)
    return out


def meta_names(n_layers: int) -> list[str]:
    """Every parameter name of a Llama 2 model with `n_layers` layers."""
    return expand(list(META_GLOBAL_NAMES) + list(META_LAYER_NAMES), n_layers)


def template_of(name: str) -> tuple[str, int | None]:
    """`layers.3.attention.wq.weight` -> (`layers.{i}.attention.wq.weight`, 3); globals -> (name, None)."""
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}{{i}}{m.group(3)}", int(m.group(2))


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map `name` through a template table (`{i}` matches a layer index); None when absent."""
    if name in table:
        return table[name]
    template, layer = template_of(name)
    target = table.get(template)
    if target is None or layer is None:
        return None
    return target.format(i=layer)


def is_ignored(name: str, ignored: tuple[str, ...]) -> bool:
    return name in ignored or template_of(name)[0] in ignored


def split_dim(meta_name: str) -> int | None:
    """Meta's model-parallel split dimension of a tensor (None: replicated)."""
    template, _ = template_of(meta_name)
    if template not in META_SPLIT_DIM:
        raise KeyError(meta_name)
    return META_SPLIT_DIM[template]


# ------------------------------------------------------------------------ rotary permutation
def hf_to_meta_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo transformers' q/k permutation.

    HF rows of a q/k projection are ordered [head][half][pair] (rotate-half layout); Meta's rows are
    [head][pair][half] (adjacent-pair layout). w: (n_heads * head_dim, dim) -> same shape.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, dim)


def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Apply transformers' q/k permutation (Meta [head][pair][half] -> HF [head][half][pair] rows)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, dim)
