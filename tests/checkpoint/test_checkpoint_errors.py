"""Broken checkpoints raise `CheckpointError` naming the file and the tensor; unknown or missing paths
are refused; format detection reads contents, never names."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama2.checkpoint import (
    LoadedModel,
    detect_format,
    export_llama2c,
    export_meta,
    load_model,
    save_checkpoint,
)
from llama2.errors import CheckpointError

EMB = "tok_embeddings.weight"
WQ1 = "layers.1.attention.wq.weight"


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------- detection
def test_detection_ignores_file_names(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    args, model = gqa_loaded.args, gqa_loaded.model
    # A llama2.c file named like a safetensors file, and a safetensors file named like a .bin.
    odd = export_llama2c(model, args, tmp_path / "l2c" / "weights.safetensors", version=0)
    assert detect_format(odd) == "llama2c"
    v1 = export_llama2c(model, args, tmp_path / "l2c1" / "model.pth", version=1)
    assert detect_format(v1) == "llama2c"
    assert detect_format(v1.parent) == "llama2c"
    ours = save_checkpoint(model, args, tmp_path / "ours")
    (ours / "model.safetensors").rename(ours / "weights.bin")
    assert detect_format(ours) == "llama2"
    assert load_model(ours / "weights.bin", progress=False).format == "llama2"
    meta = export_meta(model, args, tmp_path / "meta", n_shards=2)
    for i, p in enumerate(sorted(meta.glob("*.pth"))):
        p.rename(meta / f"part{i}.ckpt")
    assert detect_format(meta) == "meta"
    assert detect_format(meta / "params.json") == "meta"


def test_missing_path() -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_model("/nonexistent/llama-2-7b", progress=False)


def test_unknown_format(tmp_path: Path) -> None:
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unknown checkpoint format"):
        detect_format(junk)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(tmp_path, progress=False)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    with pytest.raises(CheckpointError, match="no weight files"):
        load_model(tmp_path, progress=False)


def test_gguf_without_tensors_refused_as_model(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_model(f, progress=False)


# ------------------------------------------------------------------------------- truncation
def test_truncated_safetensors_names_file_and_tensor(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = save_checkpoint(gqa_loaded.model, gqa_loaded.args, tmp_path)
    weights = out / "model.safetensors"
    _truncate(weights, 0.6)
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    msg = str(err.value)
    assert str(weights) in msg and "truncated" in msg and "tensor '" in msg


def test_truncated_hf_safetensors(gqa_hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(gqa_hf_dir, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    _truncate(weights, 0.9)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '"):
        load_model(tmp_path / "hf", progress=False)


def test_truncated_pth(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = export_meta(gqa_loaded.model, gqa_loaded.args, tmp_path, n_shards=2)
    shard = out / "consolidated.01.pth"
    _truncate(shard, 0.7)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: truncated or corrupt"):
        load_model(out, progress=False)


@pytest.mark.parametrize("version", [0, 1])
def test_truncated_llama2c(version: int, gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    path = export_llama2c(gqa_loaded.model, gqa_loaded.args, tmp_path / "m.bin", version=version)
    _truncate(path, 0.5)
    with pytest.raises(CheckpointError, match=r"m\.bin: truncated llama2\.c file: tensor 'layers\.\d\."):
        load_model(path, progress=False)


def test_llama2c_trailing_bytes(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    path = export_llama2c(gqa_loaded.model, gqa_loaded.args, tmp_path / "m.bin", version=1)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match="bytes after the last tensor"):
        load_model(path, progress=False)


def test_llama2c_version2_refused(tmp_path: Path) -> None:
    f = tmp_path / "q80.bin"
    f.write_bytes(struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 248)
    with pytest.raises(CheckpointError, match="version 2 is not supported"):
        load_model(f, progress=False)


# ------------------------------------------------------------------------- tensors and shapes
def _ours_with(tmp_path: Path, loaded: LoadedModel, edit: dict[str, torch.Tensor | None]) -> Path:
    out = save_checkpoint(loaded.model, loaded.args, tmp_path)
    sd = load_file(out / "model.safetensors")
    for name, t in edit.items():
        if t is None:
            del sd[name]
        else:
            sd[name] = t
    save_file(sd, out / "model.safetensors", metadata={"format": "llama2"})
    return out


def test_missing_tensor(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = _ours_with(tmp_path, gqa_loaded, {WQ1: None})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor '{WQ1}'"):
        load_model(out, progress=False)


def test_unexpected_tensor(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = _ours_with(tmp_path, gqa_loaded, {"layers.2.attention.wq.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'layers\.2\.attention"):
        load_model(out, progress=False)


def test_shape_mismatch(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = _ours_with(tmp_path, gqa_loaded, {EMB: torch.zeros(95, 64)})
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensor '{EMB}' has shape \[95, 64\]; expected \[96, 64\]",
    ):
        load_model(out, progress=False)


def test_hf_missing_and_unknown_tensor(gqa_hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(gqa_hf_dir, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    sd = load_file(weights)
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.0\.feed_forward\.w3\.weight'"):
        load_model(tmp_path / "hf", progress=False)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(80, 64)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(16)
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.q_norm"
    ):
        load_model(tmp_path / "hf", progress=False)


def test_meta_shard_missing_tensor(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = export_meta(gqa_loaded.model, gqa_loaded.args, tmp_path, n_shards=2)
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, out / "consolidated.01.pth")
    with pytest.raises(
        CheckpointError, match=r"consolidated\.01\.pth: missing tensor 'layers\.1\.feed_forward\.w2"
    ):
        load_model(out, progress=False)


def test_meta_params_shape_mismatch(gqa_loaded: LoadedModel, tmp_path: Path) -> None:
    out = export_meta(gqa_loaded.model, gqa_loaded.args, tmp_path, n_shards=1)
    params = json.loads((out / "params.json").read_text())
    params["n_kv_heads"] = 4  # weights hold 2 KV heads
    (out / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        CheckpointError, match=r"consolidated\.00\.pth: tensor 'layers\.0\.attention\.wk\.weight' has shape"
    ):
        load_model(out, progress=False)
