"""Key-map tables cover exactly transformers' and our parameter names; the q/k permutation is what
makes HF weights compute Meta's rotary layout (checked against transformers' logits)."""

from __future__ import annotations

import torch
from ckpt_support import hf_logits, hf_model, tokens

from llama2.checkpoint import keymaps
from llama2.config import ModelArgs
from llama2.model import Transformer


def test_tables_cover_transformers_and_our_names() -> None:
    hf = hf_model("gqa")
    hf_names = set(hf.state_dict())
    ours = set(
        Transformer(
            ModelArgs(
                dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=80, max_seq_len=16
            )
        ).state_dict()
    )
    assert ours == set(keymaps.meta_names(2))
    mapped = {keymaps.rename(n, keymaps.META_TO_HF) for n in ours}
    assert mapped == hf_names
    assert {keymaps.rename(n, keymaps.HF_TO_META) for n in hf_names} == ours
    assert keymaps.rename("model.layers.0.self_attn.q_norm.weight", keymaps.HF_TO_META) is None
    assert {keymaps.template_of(n)[0] for n in ours} == set(keymaps.META_SPLIT_DIM)


def test_permutation_inverse_and_layout() -> None:
    n_heads, hd, dim = 3, 8, 5
    w = torch.arange(n_heads * hd * dim, dtype=torch.float32).reshape(n_heads * hd, dim)
    hf = keymaps.meta_to_hf_qk(w, n_heads)
    assert torch.equal(keymaps.hf_to_meta_qk(hf, n_heads), w)
    # Meta row (head h, pair j, half r) sits at HF row h*hd + r*hd/2 + j.
    for h in range(n_heads):
        for j in range(hd // 2):
            for r in range(2):
                assert torch.equal(hf[h * hd + r * hd // 2 + j], w[h * hd + 2 * j + r])


@torch.no_grad()
def test_unpermuted_weights_give_wrong_logits() -> None:
    """Control: without undoing the permutation the logits are far off, so the 1e-4 checks in the
    numerics tests would catch a broken permutation."""
    hf = hf_model("gqa", seed=2)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=96,
        hidden_dim=80,
        norm_eps=1e-5,
        max_seq_len=16,
    )
    toks = tokens(2, 10)
    ref = hf_logits(hf, toks)
    for permute in (True, False):
        sd = {}
        for hf_name, t in hf.state_dict().items():
            name = keymaps.rename(hf_name, keymaps.HF_TO_META)
            assert name is not None
            if permute and name.endswith("wq.weight"):
                t = keymaps.hf_to_meta_qk(t, 4)
            elif permute and name.endswith("wk.weight"):
                t = keymaps.hf_to_meta_qk(t, 2)
            sd[name] = t
        model = Transformer(args)
        model.load_state_dict(sd)
        diff = (model(toks) - ref).abs().max().item()
        assert (diff < 1e-4) if permute else (diff > 1e-2)
