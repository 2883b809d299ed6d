"""The same weights written in Meta's layout (model-parallel shards), llama2.c's v0/v1 `.bin`, our
own format and an HF export all load to transformers' logits."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from ckpt_support import hf_logits, tokens
from transformers import LlamaForCausalLM

from llama2.checkpoint import (
    LoadedModel,
    detect_format,
    export_hf,
    export_llama2c,
    export_meta,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from llama2.checkpoint.formats import LLAMA2C_MAGIC
from llama2.errors import ConfigError

ATOL = 1e-4


def _max_diff(loaded: LoadedModel, hf: LlamaForCausalLM, toks: torch.Tensor) -> float:
    with torch.no_grad():
        return (loaded.model(toks) - hf_logits(hf, toks)).abs().max().item()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards(
    n_shards: int, gqa_hf: LlamaForCausalLM, gqa_loaded: LoadedModel, tmp_path: Path
) -> None:
    export_meta(gqa_loaded.model, gqa_loaded.args, tmp_path, n_shards=n_shards)
    shard_files = sorted(tmp_path.glob("consolidated.*.pth"))
    assert [p.name for p in shard_files] == [f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    # Meta's split dims: wq on dim 0, wo on dim 1, norms replicated.
    shard0 = torch.load(shard_files[0], weights_only=True)
    args = gqa_loaded.args
    assert shard0["layers.0.attention.wq.weight"].shape == (args.dim // n_shards, args.dim)
    assert shard0["layers.0.attention.wo.weight"].shape == (args.dim, args.dim // n_shards)
    assert shard0["tok_embeddings.weight"].shape == (args.vocab_size, args.dim // n_shards)
    assert shard0["norm.weight"].shape == (args.dim,)
    loaded = load_model(tmp_path, progress=False)
    assert loaded.format == "meta"
    assert _max_diff(loaded, gqa_hf, tokens(2, 11)) < ATOL


def test_meta_real_layout_vocab_minus_one_and_rope_freqs(
    gqa_hf: LlamaForCausalLM, gqa_loaded: LoadedModel, tmp_path: Path
) -> None:
    """Meta's own files: `vocab_size: -1` in params.json, a stray `rope.freqs` tensor, shards written
    by hand (not by our exporter) and the tokenizer one folder up."""
    args = gqa_loaded.args
    sd = gqa_loaded.model.state_dict()
    split = {"tok_embeddings": 1, "wo": 1, "w2": 1}
    folder = tmp_path / "llama-2-tiny"
    folder.mkdir()
    for i in range(2):
        shard: dict[str, torch.Tensor] = {"rope.freqs": torch.zeros(args.head_dim // 2)}
        for name, t in sd.items():
            key = name.split(".")[-2]
            if "norm" in name:
                shard[name] = t.clone()
            else:
                shard[name] = torch.chunk(t, 2, dim=split.get(key, 0))[i].clone()
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 16,
        "hidden_dim": 80,
        "norm_eps": 1e-5,
        "vocab_size": -1,
        "max_seq_len": 16,
    }
    (folder / "params.json").write_text(json.dumps(params))
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    loaded = load_model(folder, progress=False)
    assert loaded.args.vocab_size == args.vocab_size
    assert loaded.tokenizer_path == tmp_path / "tokenizer.model"
    assert _max_diff(loaded, gqa_hf, tokens(2, 10)) < ATOL


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c(version: int, gqa_hf: LlamaForCausalLM, gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    path = export_llama2c(gqa_loaded.model, gqa_loaded.args, tmp_path / "model.bin", version=version)
    raw = path.read_bytes()
    if version == 1:
        assert struct.unpack("<Ii", raw[:8]) == (LLAMA2C_MAGIC, 1)
        assert raw[36] == 0  # untied classifier
    else:
        # v0: 7 int32 header, a negative vocab size flags the unshared classifier.
        assert struct.unpack("<7i", raw[:28]) == (64, 80, 2, 4, 2, -96, 16)
    loaded = load_model(path, progress=False)
    assert loaded.format == "llama2c"
    assert loaded.args.norm_eps == 1e-5 and loaded.args.rope_theta == 10000.0
    assert _max_diff(loaded, gqa_hf, tokens(2, 12)) < ATOL


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_shared_classifier(version: int, gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    sd = {k: v.clone() for k, v in gqa_loaded.model.state_dict().items()}
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    path = export_llama2c(sd, gqa_loaded.args, tmp_path / "tied.bin", version=version)
    if version == 0:
        assert struct.unpack("<7i", path.read_bytes()[:28])[5] == 96  # positive: shared
    loaded = load_model(path, progress=False)
    out = loaded.model.output.weight
    assert torch.equal(out, sd["tok_embeddings.weight"])
    assert out.data_ptr() != loaded.model.tok_embeddings.weight.data_ptr()  # untied copy


def test_llama2c_v0_file_layout_written_independently(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    """A v0 file assembled here in karpathy/llama2.c export.py's legacy order (not by our exporter),
    including its freq_cis tables, loads to the same weights."""
    args = gqa_loaded.args
    sd = gqa_loaded.model.state_dict()
    layers = range(args.n_layers)
    order = ["tok_embeddings.weight"]
    for part in [
        "attention_norm",
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "ffn_norm",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]:
        order += [f"layers.{i}.{part}.weight" for i in layers]
    blobs = [sd[n].float().numpy().tobytes() for n in [*order, "norm.weight"]]
    blobs += [torch.full((args.max_seq_len, args.head_dim // 2), 7.0).numpy().tobytes()] * 2
    blobs.append(sd["output.weight"].float().numpy().tobytes())
    header = struct.pack("7i", 64, 80, 2, 4, 2, -96, 16)
    path = tmp_path / "stories.bin"
    path.write_bytes(header + b"".join(blobs))
    loaded = read_checkpoint(path).state_dict()
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name


def test_llama2c_rejects_unrepresentable_settings(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rope_theta"):
        export_llama2c(gqa_loaded.model, gqa_loaded.args.replace(rope_theta=1e6), tmp_path / "x.bin")


def test_our_format_with_metadata_and_tokenizer(
    gqa_hf: LlamaForCausalLM, gqa_loaded: LoadedModel, tmp_path: Path, llama2_tokenizer_dir: Path
) -> None:
    out = save_checkpoint(
        gqa_loaded.model,
        gqa_loaded.args,
        tmp_path / "ours",
        tokenizer_path=llama2_tokenizer_dir / "tokenizer.model",
        metadata={"notes": "trained here"},
    )
    params = json.loads((out / "params.json").read_text())
    assert params["format"] == "llama2"
    assert not list(out.glob("*.tmp"))  # temp files renamed away
    assert detect_format(out) == "llama2"
    loaded = load_model(out, progress=False)
    assert loaded.format == "llama2"
    assert loaded.args == gqa_loaded.args
    assert loaded.metadata["notes"] == "trained here"
    assert loaded.quantization is None  # "quantization" is the reserved key of quantized files
    assert loaded.tokenizer_path == out / "tokenizer.model"
    assert (out / "tokenizer.model").read_bytes() == (llama2_tokenizer_dir / "tokenizer.model").read_bytes()
    assert _max_diff(loaded, gqa_hf, tokens(3, 8)) < ATOL
    # The single weights file may be passed directly.
    assert load_model(out / "model.safetensors", progress=False).format == "llama2"


def test_export_hf_loads_in_transformers(
    gqa_hf: LlamaForCausalLM, gqa_loaded: LoadedModel, tmp_path: Path
) -> None:
    export_hf(gqa_loaded.model, gqa_loaded.args, tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    toks = tokens(2, 10)
    assert (hf_logits(reloaded, toks) - hf_logits(gqa_hf, toks)).abs().max().item() < ATOL
    for name, t in gqa_hf.state_dict().items():  # the forward q/k permutation restores HF's rows
        assert torch.equal(reloaded.state_dict()[name], t), name


def test_export_hf_with_rope_scaling(tmp_path: Path) -> None:
    from ckpt_support import hf_model, save_hf

    hf = hf_model("linear", seed=21)
    loaded = load_model(save_hf(hf, tmp_path / "src"), progress=False)
    export_hf(loaded.model, loaded.args, tmp_path / "dst")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    toks = tokens(2, 12)
    assert (hf_logits(reloaded, toks) - hf_logits(hf, toks)).abs().max().item() < ATOL


def test_dtype_handling(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    half = {k: v.half() for k, v in gqa_loaded.model.state_dict().items()}
    save_checkpoint(half, gqa_loaded.args, tmp_path)
    default = load_model(tmp_path, progress=False)
    assert default.model.output.weight.dtype == torch.bfloat16  # fp16 -> bf16 on CPU
    kept = load_model(tmp_path, dtype=torch.float16, progress=False)
    assert kept.model.output.weight.dtype == torch.float16
    as_f32 = load_model(tmp_path, dtype=torch.float32, progress=False)
    assert torch.equal(as_f32.model.output.weight, half["output.weight"].float())
    bf = {k: v.bfloat16() for k, v in gqa_loaded.model.state_dict().items()}
    save_checkpoint(bf, gqa_loaded.args, tmp_path / "bf")
    assert load_model(tmp_path / "bf", progress=False).model.norm.weight.dtype == torch.bfloat16


def test_max_seq_len_override(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    save_checkpoint(gqa_loaded.model, gqa_loaded.args, tmp_path)
    loaded = load_model(tmp_path, max_seq_len=48, progress=False)
    assert loaded.args.max_seq_len == 48 and loaded.max_seq_len == 48


def test_progress_bar_on_stderr(
    gqa_loaded: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(gqa_loaded.model, gqa_loaded.args, tmp_path)
    load_model(tmp_path, progress=True)
    assert "tensor" in capsys.readouterr().err
    load_model(tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_llama2c_folder_with_tokenizer(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    export_llama2c(gqa_loaded.model, gqa_loaded.args, tmp_path / "stories15M.bin", version=1)
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    loaded = load_model(tmp_path, progress=False)
    assert loaded.format == "llama2c"
    assert loaded.tokenizer_path == tmp_path / "tokenizer.model"
