"""Quantizing while loading (`load_model(..., quantize=...)`) and loading saved quantized checkpoints.

The oracle is the in-memory path (`quantize_model` on the float model), whose numerics are checked
against bitsandbytes and the gguf package in tests/quant: loading must give the same bits. Memory is
checked in a subprocess: the resident set must grow by about the quantized size, not the float size.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import export_hf, export_meta, save_checkpoint
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.quant import QuantConfig, accelerate, parse_quant_spec, quantization_metadata, quantize_model
from llama2.quant.linear import QuantizedLinear

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=512, max_seq_len=64)
SCHEMES = ["int8", "int4,groupsize=64", "nf4", "nf4,double_quant=false", "q8_0", "q4_0", "q4_k"]
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


def _model(dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if name.startswith("tok_") else 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("float")
    model = _model()
    return {
        "llama2": save_checkpoint(model, ARGS, root / "ours"),
        "meta": export_meta(model, ARGS, root / "meta"),
        "hf": export_hf(model, ARGS, root / "hf"),
        "llama2-bf16": save_checkpoint(_model(torch.bfloat16), ARGS, root / "bf16"),
    }


@torch.no_grad()
def _reference(spec: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    config = parse_quant_spec(spec)
    assert config is not None
    model = accelerate(quantize_model(copy.deepcopy(_model(dtype)), config))  # as load_model does on CPU
    return model(TOKENS)  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("fmt", ["llama2", "meta", "hf"])
def test_quantize_while_loading_equals_quantizing_after(
    float_dirs: dict[str, Path], spec: str, fmt: str
) -> None:
    loaded = load_model(float_dirs[fmt], quantize=spec, progress=False)
    swapped = [n for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 7 * ARGS.n_layers and "output" not in swapped
    assert loaded.quantization == parse_quant_spec(spec)
    assert not any(t.is_meta for t in loaded.model.state_dict().values())
    with torch.no_grad():
        out = loaded.model(TOKENS)
    assert torch.equal(out, _reference(spec))


def test_bfloat16_source_and_output_head(float_dirs: dict[str, Path]) -> None:
    loaded = load_model(float_dirs["llama2-bf16"], quantize="q8_0,include_output=true", progress=False)
    assert isinstance(loaded.model.output, QuantizedLinear)
    assert loaded.model.tok_embeddings.weight.dtype == torch.bfloat16  # embeddings keep their dtype
    with torch.no_grad():
        out = loaded.model(TOKENS)
    assert torch.equal(out, _reference("q8_0,include_output=true", torch.bfloat16))


@pytest.mark.parametrize("spec", ["nf4", "int4,groupsize=128", "q4_k,include_output=false"])
def test_saved_quantized_checkpoint_loads_as_stored(tmp_path: Path, spec: str) -> None:
    config = parse_quant_spec(spec)
    assert config is not None
    model = quantize_model(_model(), config)
    out_dir = save_checkpoint(model, ARGS, tmp_path / "q", metadata=quantization_metadata(config))
    assert json.loads((out_dir / "params.json").read_text())["format"] == "llama2"
    loaded = load_model(out_dir, progress=False)
    assert loaded.quantization == config
    with torch.no_grad():
        assert torch.equal(loaded.model(TOKENS), _reference(spec))
    # asking for the stored scheme is fine; asking for another one is refused
    load_model(out_dir, quantize=config, progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(out_dir, quantize="int8", progress=False)


def test_layers_the_scheme_cannot_hold_stay_float(tmp_path: Path) -> None:
    """q4_k needs rows of whole 256-value blocks: with dim 256 and hidden 320, w2 (in 320) cannot take
    it, stays float (with a warning naming it), and saving/re-loading keeps that split."""
    args = ARGS.replace(hidden_dim=320)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    path = save_checkpoint(model, args, tmp_path / "float")
    unfit = r"2 layers cannot be quantized with q4_k.*layers\.0\.feed_forward\.w2"
    with pytest.warns(UserWarning, match=unfit):
        loaded = load_model(path, quantize="q4_k", progress=False)
    blocks = loaded.model.layers
    assert isinstance(blocks[0].feed_forward.w1, QuantizedLinear)
    assert type(blocks[0].feed_forward.w2) is torch.nn.Linear
    with torch.no_grad():
        expected = loaded.model(TOKENS)
    out_dir = save_checkpoint(
        loaded.model, args, tmp_path / "q4_k", metadata=quantization_metadata(QuantConfig("q4_k"))
    )
    again = load_model(out_dir, progress=False)
    assert type(again.model.layers[1].feed_forward.w2) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(again.model(TOKENS), expected)


def test_refuses_early_when_it_will_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama2.plan
    from llama2.errors import OutOfMemoryError

    path = save_checkpoint(_model(), ARGS, tmp_path / "m")
    monkeypatch.setattr(llama2.plan, "available_memory", lambda device=None: 1 << 20)  # 1 MiB free
    with pytest.raises(OutOfMemoryError, match="nf4"):
        load_model(path, progress=False)
    load_model(path, progress=False, check_memory=False)  # the check can be turned off


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int5", "unknown quantization scheme"),
        ("int4,groupsize=abc", "must be an integer"),
        ("int4,groupsize=48", "groupsize must be one of"),
        ("nf4,colour=blue", "bad quantization option"),
        ("nf4,double_quant=maybe", "true or false"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_quant_spec(spec)


def test_spec_options() -> None:
    assert parse_quant_spec("int4, groupsize=64") == QuantConfig("int4", groupsize=64)
    assert parse_quant_spec("nf4,double_quant=false,compute_dtype=bfloat16") == QuantConfig(
        "nf4", double_quant=False, compute_dtype="bfloat16"
    )


_MEASURE = textwrap.dedent(
    """
    import sys
    from llama2.checkpoint.load import load_model

    def rss_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    load_model(sys.argv[1], quantize=sys.argv[3], progress=False)  # warm-up: imports, thread pools
    before = rss_kib("VmRSS:")
    loaded = load_model(sys.argv[2], quantize=sys.argv[3], progress=False)
    print(rss_kib("VmHWM:") - before, rss_kib("VmRSS:") - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fmt", ["llama2", "meta"])
def test_peak_memory_is_about_the_quantized_size(tmp_path: Path, fmt: str) -> None:
    """A 206 MB float32 checkpoint quantized to int8 (52 MB) while loading: the process must grow by
    about the quantized size plus one tensor's temporaries. Without releasing the source pages and
    trimming the heap it grows by ~1.7x the float size."""
    save = save_checkpoint if fmt == "llama2" else export_meta
    tiny = save(_model(), ARGS, tmp_path / "tiny")
    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, vocab_size=320, hidden_dim=2816, max_seq_len=64)
    model = Transformer(args)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    path = save(model, args, tmp_path / fmt)
    del model
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tiny), str(path), "int8"],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_kib, final_kib = (int(v) for v in result.stdout.split())
    assert final_kib * 1024 < 0.4 * float_bytes, (final_kib, float_bytes)
    assert peak_kib * 1024 < 0.6 * float_bytes, (peak_kib, float_bytes)
