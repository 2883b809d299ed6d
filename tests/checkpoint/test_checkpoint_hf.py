"""Hugging Face checkpoints written by transformers' `save_pretrained` load to the same logits as
transformers' own `LlamaForCausalLM` (the oracle), for several tiny shapes and rope settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_support import HF_CASES, MAX_POS, hf_logits, hf_model, save_hf, tokens
from transformers import DynamicCache

from llama2.checkpoint import detect_format, load_model
from llama2.config import RopeScaling

ATOL = 1e-4


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    hf = hf_model(case, seed=11)
    save_hf(hf, tmp_path)
    assert detect_format(tmp_path) == "hf"
    loaded = load_model(tmp_path, progress=False)
    assert loaded.format == "hf"
    # Past max_position_embeddings for the dynamic case, so the NTK base actually grows.
    toks = tokens(batch=3, length=MAX_POS + 8 if case == "dynamic" else 12)
    ref = hf_logits(hf, toks)
    with torch.no_grad():
        ours = loaded.model(toks)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < ATOL


def test_shape_and_rope_settings_read_from_config(tmp_path: Path) -> None:
    for case, expected in [
        ("gqa-theta1e6", (8, 2, 1e6, None)),
        ("linear", (4, 2, 10000.0, RopeScaling("linear", 2.0))),
        ("dynamic", (4, None, 10000.0, RopeScaling("dynamic", 2.0))),
    ]:
        out = save_hf(hf_model(case), tmp_path / case)
        args = load_model(out, progress=False).args
        assert (args.n_heads, args.n_kv_heads, args.rope_theta, args.rope_scaling) == expected
        assert (args.dim, args.n_layers, args.hidden_dim, args.max_seq_len) == (64, 2, 80, MAX_POS)


def test_sharded_safetensors(tmp_path: Path) -> None:
    hf = hf_model("gqa", seed=5)
    save_hf(hf, tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path, progress=False)
    toks = tokens(2, 9)
    with torch.no_grad():
        assert (loaded.model(toks) - hf_logits(hf, toks)).abs().max().item() < ATOL


def test_pytorch_model_bin(tmp_path: Path) -> None:
    """Older HF repos ship `pytorch_model.bin` (a torch.save zip); read with weights_only + mmap."""
    hf = hf_model("mha", seed=6)
    save_hf(hf, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path, progress=False)
    toks = tokens(2, 7)
    with torch.no_grad():
        assert (loaded.model(toks) - hf_logits(hf, toks)).abs().max().item() < ATOL


def test_classic_rope_scaling_keys(tmp_path: Path) -> None:
    """A config.json written by transformers 4.x (`rope_theta` + `rope_scaling` with `type`)."""
    hf = hf_model("linear", seed=7)
    save_hf(hf, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 10000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path, progress=False)
    assert loaded.args.rope_scaling == RopeScaling("linear", 2.0)
    toks = tokens(1, 10)
    with torch.no_grad():
        assert (loaded.model(toks) - hf_logits(hf, toks)).abs().max().item() < ATOL


@pytest.mark.parametrize("case", ["gqa", "gqa-theta1e6", "linear"])
def test_prefill_then_decode_matches_full_forward(case: str, tmp_path: Path) -> None:
    hf = hf_model(case, seed=13)
    model = load_model(save_hf(hf, tmp_path), progress=False).model
    toks = tokens(batch=2, length=14)
    ref = hf_logits(hf, toks)
    prefill = 6
    model.setup_caches(max_batch_size=2, max_seq_len=MAX_POS)
    with torch.no_grad():
        steps = [model(toks[:, :prefill], 0)]
        for pos in range(prefill, toks.shape[1]):
            steps.append(model(toks[:, pos : pos + 1], pos))
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < ATOL


def test_dynamic_rope_decode_past_trained_length_matches_transformers_cache(tmp_path: Path) -> None:
    """With dynamic NTK scaling, each decode step rescales rope for the new length while cached keys
    keep their old rotation; transformers' own cached decode is the oracle for that."""
    hf = hf_model("dynamic", seed=17)
    model = load_model(save_hf(hf, tmp_path), progress=False).model
    toks = tokens(batch=2, length=MAX_POS + 6)
    prefill = 10
    with torch.no_grad():
        cache = DynamicCache(config=hf.config)
        out = hf(toks[:, :prefill], past_key_values=cache, use_cache=True)
        ref_steps = [out.logits]
        for pos in range(prefill, toks.shape[1]):
            out = hf(toks[:, pos : pos + 1], past_key_values=out.past_key_values, use_cache=True)
            ref_steps.append(out.logits)
        model.setup_caches(max_batch_size=2, max_seq_len=toks.shape[1])
        steps = [model(toks[:, :prefill], 0)]
        for pos in range(prefill, toks.shape[1]):
            steps.append(model(toks[:, pos : pos + 1], pos))
    ref = torch.cat(ref_steps, dim=1).float()
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < ATOL


def test_sharded_legacy_pytorch_bins_with_index(tmp_path: Path) -> None:
    """`pytorch_model-0000N-of-0000M.bin` shards listed in `pytorch_model.bin.index.json`, one of them
    in PyTorch's legacy (non-zip) serialization."""
    hf = hf_model("gqa", seed=8)
    save_hf(hf, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    sd = hf.state_dict()
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, tmp_path / fname, _use_new_zipfile_serialization=i == 0)
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(tmp_path, progress=False)
    toks = tokens(2, 9)
    with torch.no_grad():
        assert (loaded.model(toks) - hf_logits(hf, toks)).abs().max().item() < ATOL
