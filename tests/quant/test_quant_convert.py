"""Swapping a tiny Transformer's linears for quantized ones; saving and re-loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError
from llama2.model import Transformer
from llama2.quant import QuantConfig, load_quantized, prepare_model, quantize_model, save_quantized
from llama2.quant.linear import QuantizedLinear

ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=256, max_seq_len=64)
# scheme -> (max relative logit error, min top-1 agreement); measured errors are ~2x below the bounds
CASES = {
    "int8": (0.015, 1.0),
    "int4": (0.12, 1.0),
    "nf4": (0.12, 1.0),
    "q8_0": (0.015, 1.0),
    "q4_0": (0.12, 1.0),
    "q4_k": (0.12, 1.0),
}


def _model() -> Transformer:
    """A random model whose float top-1 is confident (the output head is a copy of the embeddings,
    so each position's logits peak at its own token with a margin of ~80), so every scheme's
    top-1 must agree while the logit error still measures the quantization noise."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("output", "tok_embeddings")):
                p.normal_(0, 0.03)
        model.tok_embeddings.weight.normal_(0, 1)
        model.output.weight.copy_(model.tok_embeddings.weight * 0.5)
    return model.eval()


TOKENS = torch.randint(0, ARGS.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("scheme", list(CASES))
def test_quantized_logits_close_to_float(scheme: str) -> None:
    model = _model()
    with torch.no_grad():
        ref = model(TOKENS)
        config = QuantConfig(scheme, groupsize=64, include_output=True)
        quantize_model(model, config)
        out = model(TOKENS)
    swapped = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == ARGS.n_layers * 7 + 1 and "output" in swapped
    assert model.tok_embeddings.weight.dtype == torch.float32  # embeddings/norms untouched
    max_rel, min_agree = CASES[scheme]
    rel = float((out - ref).norm() / ref.norm())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    assert rel < max_rel, rel
    assert agree >= min_agree, agree


def test_output_head_kept_by_default_and_cache_decode_works() -> None:
    model = _model()
    quantize_model(model, QuantConfig("int8"))
    assert type(model.output).__name__ == "Linear"
    model.setup_caches(1, 32)
    with torch.no_grad():
        full = model(TOKENS[:1, :8], 0)
        step = model(TOKENS[:1, 8:9], 8)
    assert full.shape == (1, 8, ARGS.vocab_size) and step.shape == (1, 1, ARGS.vocab_size)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig("nf4", blocksize=64, double_quant=True, include_output=True),
        QuantConfig("nf4", double_quant=False),
        QuantConfig("int4", groupsize=32, compute_dtype="bfloat16"),
        QuantConfig("q8_0"),
    ],
)
def test_save_and_reload_without_requantizing(tmp_path: Path, config: QuantConfig) -> None:
    model = quantize_model(_model(), config)
    path = tmp_path / "model.safetensors"
    save_quantized(model, config, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["quantization"])
    assert meta["scheme"] == config.scheme
    if config.scheme == "nf4":
        assert meta["blocksize"] == 64 and meta["double_quant"] == config.double_quant

    state, loaded_config = load_quantized(path)
    assert loaded_config == config
    with torch.device("meta"):
        fresh = Transformer(ARGS)
    prepare_model(fresh, loaded_config)
    fresh.load_state_dict(state, assign=True)  # strict: every buffer present, shapes match
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_config_validation_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="groupsize"):
        QuantConfig("int4", groupsize=100)
    with pytest.raises(ConfigError, match="compute_dtype"):
        QuantConfig("int8", compute_dtype="float64")
    with pytest.raises(ConfigError, match="only the keys"):
        QuantConfig.from_metadata({"scheme": "int8", "bits": 8})
    bad = Transformer(ARGS.replace(dim=96, n_heads=2, n_kv_heads=None, hidden_dim=160))
    with pytest.raises(ConfigError, match="cannot quantize layer"):
        quantize_model(bad, QuantConfig("q4_k"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors")
