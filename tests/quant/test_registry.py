"""`llama2.quant.registry`: each scheme's storage against the formats' specs, computed by hand; one
dtype table; one spec syntax; and `llama2 plan` on stored quantized checkpoints against their bytes.

Oracles: ggml's block sizes as the `gguf` package states them, byte counts worked out from the
layouts (gpt-fast int4, bitsandbytes NF4, ggml Q8_0/Q4_0/Q4_K), and the tensor headers of the
files themselves (read with `safetensors` and `gguf`, not with our readers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open

from llama2 import dtypes
from llama2.checkpoint.gguf_export import export_gguf
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.plan_cli import add_arguments, make_plan
from llama2.quant import (
    QuantConfig,
    parse_quant_spec,
    parse_quant_specs,
    quantization_metadata,
    quantize_model,
)
from llama2.quant.gguf_blocks import GGUF_BLOCKS
from llama2.quant.registry import SCHEMES, get_scheme
from llama2.quant.schemes import SCHEMES as SCHEME_NAMES

N = K = 4096  # a 7B attention projection


def test_gguf_block_geometry_is_ggmls() -> None:
    # ggml-common.h: block_q8_0 {fp16 d; int8 qs[32]}, block_q4_0 {fp16 d; uint8 qs[16]},
    # block_q4_K {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]} over QK_K = 256 values.
    assert {q: (b.values, b.nbytes) for q, b in GGUF_BLOCKS.items()} == {
        "q8_0": (32, 34),
        "q4_0": (32, 18),
        "q4_k": (256, 144),
    }
    for name, block in GGUF_BLOCKS.items():  # and as the gguf package (llama.cpp's Python) says
        qt = gguf.GGMLQuantizationType[name.upper()]
        assert block.ggml_type == int(qt)
        assert gguf.GGML_QUANT_SIZES[qt] == (block.values, block.nbytes)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("int8", N * K + 4 * N),  # int8 codes + fp32 scale per row
        ("int4", N * K // 2 + (K // 128) * N * 2 * 2),  # nibbles + bf16 (scale, zero) per 128
        ("int4,groupsize=64", N * K // 2 + (K // 64) * N * 4),
        ("nf4,double_quant=false", N * K // 2 + 4 * (N * K // 64)),  # nibbles + fp32 absmax per 64
        # nibbles + uint8 absmax per 64 + fp32 absmax per 256 blocks + 256-entry fp32 code + fp32 offset
        ("nf4", 8_388_608 + 262_144 + 4 * 1024 + 1024 + 4),
        ("q8_0", N * K // 32 * 34),
        ("q4_0", N * K // 32 * 18),
        ("q4_k", N * K // 256 * 144),
    ],
)
def test_storage_bytes_by_hand(spec: str, expected: int) -> None:
    config = parse_quant_spec(spec)
    assert config is not None
    assert get_scheme(config.scheme).storage_bytes(N, K, config) == expected


def test_bytes_per_weight() -> None:
    def bpw(spec: str) -> float:
        config = parse_quant_spec(spec)
        assert config is not None
        return get_scheme(config.scheme).bytes_per_weight(N, K, config)

    assert bpw("q8_0") == 34 / 32 == 1.0625
    assert bpw("q4_0") == 18 / 32 == 0.5625
    assert bpw("q4_k") == 144 / 256 == 0.5625
    assert bpw("int4") == 0.5 + 4 / 128
    assert bpw("nf4,double_quant=false") == 0.5 + 4 / 64
    assert bpw("int8") == 1 + 4 / K


@pytest.mark.parametrize("spec", ["int8", "int4,groupsize=32", "nf4", "nf4,blocksize=128,double_quant=false",
                                  "q8_0", "q4_0", "q4_k"])  # fmt: skip
def test_storage_bytes_are_the_modules_buffers(spec: str) -> None:
    config = parse_quant_spec(spec)
    assert config is not None
    scheme = get_scheme(config.scheme)
    module = scheme.empty(512, 96, config, "meta")
    assert isinstance(module, scheme.module)
    held = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert scheme.storage_bytes(96, 512, config) == held


def test_which_shapes_each_scheme_holds() -> None:
    for spec, k in [("int4,groupsize=64", 96), ("q8_0", 48), ("q4_0", 80), ("q4_k", 128)]:
        config = parse_quant_spec(spec)
        assert config is not None
        with pytest.raises(ConfigError, match="divisible"):
            get_scheme(config.scheme).storage_bytes(8, k, config)
    for spec in ("int8", "nf4"):  # any shape (NF4 blocks run over the flattened weight)
        config = parse_quant_spec(spec)
        assert config is not None
        assert get_scheme(config.scheme).storage_bytes(3, 5, config) > 0


def test_metadata_and_spec_round_trip() -> None:
    assert tuple(SCHEMES) == SCHEME_NAMES  # the torch-free names the CLI shows
    own = {"int8": set(), "int4": {"groupsize"}, "nf4": {"blocksize", "double_quant"}}
    for spec in ["int8", "int4,groupsize=64", "nf4,double_quant=false,compute_dtype=bf16",
                 "q4_0,include_output=true", "q4_k"]:  # fmt: skip
        config = parse_quant_spec(spec)
        assert config is not None
        meta = config.to_metadata()
        assert set(meta) == {"scheme", "compute_dtype", "include_output", *own.get(config.scheme, set())}
        assert QuantConfig.from_metadata(meta) == config
        assert parse_quant_spec(config.spec()) == config
    assert parse_quant_spec("nf4,compute_dtype=bf16") == QuantConfig("nf4", compute_dtype="bfloat16")
    assert parse_quant_spec("NONE") is None
    assert parse_quant_specs("none, int8,int4,groupsize=64,nf4") == [
        None,
        QuantConfig("int8"),
        QuantConfig("int4", groupsize=64),
        QuantConfig("nf4"),
    ]
    with pytest.raises(ConfigError, match="follows no scheme"):
        parse_quant_specs("groupsize=64,int4")


def test_one_dtype_table() -> None:
    for names, want in [(("float32", "fp32", "f32", "FP32"), torch.float32),
                        (("bfloat16", "bf16", "BF16"), torch.bfloat16),
                        (("float16", "fp16", "f16", "half"), torch.float16)]:  # fmt: skip
        for name in names:
            assert dtypes.parse_dtype(name) is want
    with pytest.raises(ConfigError, match="unknown dtype"):
        dtypes.parse_dtype("float64")
    with pytest.raises(ConfigError):
        dtypes.parse_dtype(torch.int8)
    from llama2.api import parse_dtype as api_parse
    from llama2.bench import parse_dtype as bench_parse
    from llama2.plan import parse_dtype as plan_parse
    from llama2.serve.server import _DTYPES as SERVE

    assert api_parse is not None and api_parse("half") is torch.float16
    assert bench_parse is plan_parse is dtypes.parse_dtype
    assert dtypes.dtype_table() == SERVE


# ----------------------------------------------------------------- llama2 plan on stored checkpoints
ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=264, hidden_dim=512, max_seq_len=32)


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def _plan(*argv: str) -> tuple[int, int, int]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plan, _ = make_plan(parser.parse_args(list(argv)))
    return plan.weight_bytes, plan.linear_bytes + plan.output_bytes, plan.embedding_bytes


@pytest.mark.parametrize("spec", ["nf4", "int4,groupsize=64,include_output=true", "q4_k"])
def test_plan_of_a_stored_quantized_checkpoint_is_its_tensor_bytes(tmp_path: Path, spec: str) -> None:
    config = parse_quant_spec(spec)
    assert config is not None
    model = quantize_model(_model(), config)
    out = save_checkpoint(model, ARGS, tmp_path / "q", metadata=quantization_metadata(config))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        on_disk = 0
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            sl = f.get_slice(name)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            on_disk += int(torch.Size(shape).numel()) * {"F32": 4, "U8": 1, "I8": 1, "BF16": 2}[dtype]
    weights, _, _ = _plan("--model", str(out))  # float parts stay float32, as stored
    assert weights == on_disk
    float_weights, _, _ = _plan("--model", str(out), "--dtype", "fp32")
    assert float_weights == on_disk
    with pytest.raises(ConfigError, match="already quantized"):
        _plan("--model", str(out), "--quantize", "int8")


def test_plan_of_a_float_checkpoint_takes_the_common_spec_syntax(tmp_path: Path) -> None:
    out = save_checkpoint(_model(), ARGS, tmp_path / "f")
    d, kv, f, v = 256, 128, 512, 264
    linears = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (d, f), (f, d)]  # (out, in) of wq..w3
    int4_64 = sum(n * k // 2 + (k // 64) * n * 4 for n, k in linears)
    weights, quantized, _ = _plan("--model", str(out), "--quantize", "int4,groupsize=64", "--dtype", "bf16")
    assert quantized == int4_64 + v * d * 2  # block linears in int4, head in bfloat16
    assert weights == int4_64 + (2 * v * d + 3 * d) * 2
    flags = _plan("--model", str(out), "--quantize", "int4", "--groupsize", "64", "--dtype", "bf16")
    assert flags[0] == weights


def _gguf_vocab(path: Path, n: int) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    w.add_token_list([*pieces, *(f"t{i}" for i in range(n - len(pieces)))])
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_plan_of_a_gguf_file_counts_each_tensors_type(tmp_path: Path, qtype: str) -> None:
    tok = _gguf_vocab(tmp_path / "vocab.gguf", ARGS.vocab_size)
    path = export_gguf(_model(), tmp_path / "m.gguf", qtype, args=ARGS, tokenizer_path=tok, progress=False)
    reader = gguf.GGUFReader(path)
    linear_names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up")
    held = sum(
        int(t.n_bytes)
        for t in reader.tensors
        if t.name == "output.weight" or t.name.split(".")[-2] in linear_names
    )
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0  # the exporter's head for 4-bit files
    assert types["token_embd.weight"] != gguf.GGMLQuantizationType.F32
    _, quantized, embedding = _plan("--model", str(path))
    assert quantized == held  # block tensors stay in their blocks
    assert embedding == ARGS.vocab_size * ARGS.dim * 4  # a block-quantized embedding loads as float32
