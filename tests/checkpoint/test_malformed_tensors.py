"""Malformed tensors are refused with one line naming the file and the tensor: tensor kinds the model
cannot hold (sparse, meta, torch-quantized, complex, overlapping) in `.pth`/`.bin` files, Meta shards
that disagree, NaN/inf norm weights in every format, damaged files; and a config claiming a huge
model is refused by the memory check before anything is built or read."""

from __future__ import annotations

import json
import resource
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llama2.checkpoint import export_hf, export_llama2c, export_meta, load_model, save_checkpoint
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, OutOfMemoryError, UnsafeCheckpointError
from llama2.model import Transformer

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
EMB = "tok_embeddings.weight"


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ARGS)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # distinct values, so a disagreement between shards is visible
    return m


def _one_line(err: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ------------------------------------------------------------------ tensor kinds in torch pickles
def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized dtypes
        return torch.quantize_per_tensor(torch.zeros(64, 32), 0.1, 0, torch.qint8)


BAD_TENSORS: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    "sparse-coo": (lambda: torch.zeros(64, 32).to_sparse(), "sparse_coo tensor"),
    "sparse-csr": (lambda: torch.eye(64, 32).to_sparse_csr(), "sparse_csr tensor"),
    "meta": (lambda: torch.empty(64, 32, device="meta"), "meta tensor"),
    "quantized": (_quantized, "torch-quantized tensor"),
    "complex": (lambda: torch.zeros(64, 32, dtype=torch.complex64), "complex dtype"),
    "overlapping": (lambda: torch.zeros(32).expand(64, 32), "share storage"),
}


def _meta_dir(root: Path, shard: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    root.mkdir()
    (root / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 64}))
    torch.save(shard, root / "consolidated.00.pth")
    return root, root / "consolidated.00.pth"


def _hf_dir(root: Path, sd: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    root.mkdir()
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "vocab_size": 64}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    torch.save(sd, root / "pytorch_model.bin")
    return root, root / "pytorch_model.bin"


@pytest.mark.parametrize("kind", BAD_TENSORS)
@pytest.mark.parametrize("layout", ["meta-pth", "hf-bin", "meta-pth-legacy"])
def test_unsupported_tensor_kind(kind: str, layout: str, tmp_path: Path) -> None:
    make, what = BAD_TENSORS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = make()
        if layout == "hf-bin":
            folder, file = _hf_dir(tmp_path / "hf", {"model.embed_tokens.weight": bad})
            name = "model.embed_tokens.weight"
        else:
            folder, file = _meta_dir(tmp_path / "meta", {EMB: bad})
            name = EMB
            if layout == "meta-pth-legacy":
                if kind in ("sparse-csr", "meta"):
                    pytest.skip("torch's legacy format cannot write this tensor kind")
                torch.save({EMB: bad}, file, _use_new_zipfile_serialization=False)
        with pytest.raises(CheckpointError) as err:
            load_model(folder, progress=False)
    assert not isinstance(err.value, UnsafeCheckpointError)  # data of the wrong kind, not code
    _one_line(err, f"{file}: tensor {name!r}", what)


def test_transposed_tensor_loads_contiguous(model: Transformer, tmp_path: Path) -> None:
    """A dense but transposed tensor is fine: it is loaded (and made contiguous) with its values."""
    out = export_meta(model, ARGS, tmp_path / "m")
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    wq = shard["layers.0.attention.wq.weight"]
    shard["layers.0.attention.wq.weight"] = wq.t().contiguous().t()  # same values, column-major
    torch.save(shard, out / "consolidated.00.pth")
    loaded = load_model(out, progress=False, dtype=torch.float32)
    got = loaded.model.layers[0].attention.wq.weight
    assert got.is_contiguous() and torch.equal(got, wq)


def test_integer_weight_refused(model: Transformer, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m")
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] = torch.ones(32, dtype=torch.int64)
    torch.save(shard, out / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, "consolidated.00.pth: tensor 'layers.1.ffn_norm.weight' has dtype torch.int64")


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (torch.zeros(64), "expected a matrix"),  # a split tensor given as a vector
        (torch.zeros(()), "expected a matrix"),
        (torch.zeros(64, 16, 1), "expected a matrix"),
    ],
)
def test_meta_split_tensor_of_wrong_rank(
    model: Transformer, replace: torch.Tensor, expected: str, tmp_path: Path
) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    for i in range(2):
        shard = torch.load(out / f"consolidated.0{i}.pth", weights_only=True)
        shard[EMB] = replace
        torch.save(shard, out / f"consolidated.0{i}.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, f"tensor {EMB!r}", expected)


# --------------------------------------------------------------------------------- Meta shards
def test_meta_shards_load_when_replicas_agree(model: Transformer, tmp_path: Path) -> None:
    """Control for the two tests below."""
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    loaded = load_model(out, progress=False, dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name


@pytest.mark.parametrize(
    "name", ["norm.weight", "layers.2.attention_norm.weight", "layers.3.ffn_norm.weight"]
)
def test_meta_replicated_tensor_disagrees(model: Transformer, name: str, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    shard[name] = shard[name].clone()
    shard[name][5] += 1e-3
    torch.save(shard, out / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, "consolidated.01.pth", f"tensor {name!r} differs", "consolidated.00.pth")


def test_meta_shard_dtypes_disagree(model: Transformer, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"].half()
    torch.save(shard, out / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, "consolidated.01.pth: tensor 'layers.0.attention.wq.weight' has dtype torch.float16")


# ---------------------------------------------------------------------------------- NaN norms
def _export(fmt: str, m: Transformer, root: Path) -> Path:
    if fmt == "meta":
        return export_meta(m, ARGS, root, n_shards=2)
    if fmt == "hf":
        return export_hf(m, ARGS, root)
    if fmt == "llama2":
        return save_checkpoint(m, ARGS, root)
    return export_llama2c(m, ARGS, root / "model.bin", version=1)


@pytest.mark.parametrize("fmt", ["meta", "hf", "llama2", "llama2c"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("layers.3.attention_norm.weight", float("nan")), ("norm.weight", float("inf")),
     ("layers.0.ffn_norm.weight", -float("inf"))],
)  # fmt: skip
def test_non_finite_norm_refused(
    model: Transformer, fmt: str, name: str, value: float, tmp_path: Path
) -> None:
    bad = Transformer(ARGS)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.get_parameter(name)[7] = value
    path = _export(fmt, bad, tmp_path / fmt)
    with pytest.raises(CheckpointError) as err:
        load_model(path, progress=False)
    _one_line(err, f"{name} contains NaN/inf")


# ------------------------------------------------------------------------------- damaged files
def _rewrite_zip(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            new = edit(name, data)
            if new is not None:
                zf.writestr(name, new)


def _corrupt_crc(path: Path) -> None:
    """Flip a byte inside data.pkl's stored bytes without updating the zip's CRC."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "not-a-zip": lambda p: p.write_bytes(b"this is not a pytorch file at all\n" * 20),
    "zip-header-then-junk": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00\x07" * 200),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "bad-crc": _corrupt_crc,
    "storage-missing": lambda p: _rewrite_zip(p, lambda n, d: None if "/data/" in n else d),
    "storage-short": lambda p: _rewrite_zip(p, lambda n, d: d[:64] if "/data/" in n else d),
    "pickle-garbage": lambda p: _rewrite_zip(p, lambda n, d: b"\x80\x02\xff" if n.endswith(".pkl") else d),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_pth(model: Transformer, damage: str, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    shard = out / "consolidated.01.pth"
    DAMAGE[damage](shard)
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    assert not isinstance(err.value, UnsafeCheckpointError)
    _one_line(err, "consolidated.01.pth")


@pytest.mark.parametrize("fmt", ["llama2", "hf"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(model: Transformer, fmt: str, keep: float, tmp_path: Path) -> None:
    path = _export(fmt, model, tmp_path / fmt)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    with pytest.raises(CheckpointError) as err:
        load_model(path, progress=False)
    _one_line(err, str(weights))


# ------------------------------------------------------------------------------ memory check
HUGE = {"dim": 65536, "n_layers": 1024, "n_heads": 512, "vocab_size": 32000, "multiple_of": 256,
        "norm_eps": 1e-5, "max_seq_len": 16, "format": "llama2"}  # fmt: skip


@pytest.mark.parametrize(
    ("quantize", "n_layers", "multiple_of", "seconds"),
    [
        (None, 1024, 256, 1.0),  # refused from the shape alone, before the model is built
        ("int8", 1024, 256, 1.0),
        ("q4_k", 1024, 256, 1.0),
        ("q4_k", 64, 16, 15.0),  # w2's rows do not fit q4_k's blocks: the exact check, on `meta`
    ],
)
def test_huge_config_refused_by_memory_check(
    quantize: str | None, n_layers: int, multiple_of: int, seconds: float, tmp_path: Path
) -> None:
    """Weights of ~100 TB (1024 x 12 x 65536^2 x 2 bytes) or ~6 TB: refused quickly, before any tensor
    is read (the file holds one small tensor, so reading or checking names would fail differently)."""
    params = {**HUGE, "n_layers": n_layers, "multiple_of": multiple_of}
    (tmp_path / "params.json").write_text(json.dumps(params))
    save_file({EMB: torch.zeros(4, 4)}, tmp_path / "model.safetensors", metadata={"format": "llama2"})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(OutOfMemoryError) as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tmp_path, progress=False, dtype=torch.bfloat16, quantize=quantize)
    elapsed = time.perf_counter() - start
    _one_line(err)
    built = any("cannot be quantized" in str(w.message) for w in caught)  # the plan on the meta model
    assert built == (multiple_of == 16)
    assert elapsed < seconds
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 512 * 1024  # KiB: nothing near the model's size was allocated


# ------------------------------------------------------------------- stored quantized buffers
@pytest.mark.parametrize(
    ("spec", "buffer", "dtype", "expected"),
    [
        ("int8", "weight", torch.int16, "expected torch.int8"),
        ("int8", "weight", torch.uint8, "expected torch.int8"),
        ("int8", "scales", torch.int32, "expected a floating-point dtype"),
        ("nf4", "weight", torch.int8, "expected torch.uint8"),
    ],
)
def test_quantized_buffer_of_wrong_dtype(
    spec: str, buffer: str, dtype: torch.dtype, expected: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from llama2.quant import parse_quant_spec, quantization_metadata, quantize_model

    config = parse_quant_spec(spec)
    args = ARGS.replace(dim=64)
    out = save_checkpoint(quantize_model(Transformer(args), config), args, tmp_path / "q",
                          metadata=quantization_metadata(config))  # fmt: skip
    load_model(out, progress=False)  # control: loads as saved
    weights = out / "model.safetensors"
    sd = load_file(weights)
    name = f"layers.1.attention.wv.{buffer}"
    sd[name] = sd[name].to(dtype)
    save_file(sd, weights, metadata=quantization_metadata(config))
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, f"{weights}: tensor {name!r} has dtype {dtype}", expected)


# ------------------------------------------------------------------ Meta shard names (issue 9)
def _rename_shards(out: Path, names: dict[str, str]) -> None:
    for old, new in names.items():
        (out / old).rename(out / new)


@pytest.mark.parametrize(
    ("n_shards", "renames", "expected"),
    [
        (2, {"consolidated.01.pth": "consolidated.02.pth"}, "consolidated.01.pth is missing"),  # 00, 02
        (2, {"consolidated.00.pth": "x"}, "consolidated.00.pth is missing"),  # 01 only
        (2, {"consolidated.01.pth": "consolidated.07.pth"}, "consolidated.01.pth is missing"),
        (2, {"consolidated.01.pth": "consolidated.1.pth"}, "consolidated.1.pth: not a Meta shard name"),
        (2, {"consolidated.01.pth": "consolidated.001.pth"}, "consolidated.001.pth: not a Meta shard name"),
        (2, {"consolidated.01.pth": "other.pth"}, "other.pth: a PyTorch file beside Meta shards"),
    ],
)
def test_meta_shard_names_must_be_ranks_0_to_n_minus_1(
    model: Transformer, n_shards: int, renames: dict[str, str], expected: str, tmp_path: Path
) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=n_shards)
    for old, new in renames.items():
        if new == "x":
            (out / old).unlink()
    _rename_shards(out, {k: v for k, v in renames.items() if v != "x"})
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, expected)


def test_meta_shard_named_directly_loads_the_whole_folder(model: Transformer, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    loaded = load_model(out / "consolidated.01.pth", progress=False)
    sd = loaded.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(sd[name], p), name  # both shards merged, not one shard's slices


def test_single_pth_of_any_name_is_one_meta_shard(model: Transformer, tmp_path: Path) -> None:
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=1)
    _rename_shards(out, {"consolidated.00.pth": "model.pth"})
    assert torch.equal(load_model(out, progress=False).model.norm.weight, model.norm.weight)


# ------------------------------------------------------------- torch's warnings during a load (issue 9)
def test_sparse_csr_pth_gives_the_error_without_torch_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, file = _meta_dir(tmp_path / "meta", {EMB: torch.eye(64, 32).to_sparse_csr()})
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns about CSR once per process: make it warn every time
    try:
        with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as err:
            warnings.simplefilter("always")
            load_model(folder, progress=False)
    finally:
        torch.set_warn_always(warn_always)
    _one_line(err, f"{file}: tensor {EMB!r}", "sparse_csr tensor")
    assert [str(w.message) for w in caught] == []


def test_own_warnings_still_shown_when_loading_a_pth(model: Transformer, tmp_path: Path) -> None:
    """q4_k needs 256-value rows: with dim 32 no layer can hold it, and the loader says so."""
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=1)
    with pytest.warns(UserWarning, match=r"layers cannot be quantized with q4_k"):
        load_model(out, quantize="q4_k", progress=False)


def test_unnumbered_shards_load_in_sorted_order_and_a_missing_one_fails(
    model: Transformer, tmp_path: Path
) -> None:
    """Without Meta's shard names the rank order is the sorted order (Meta's `sorted(glob(...))`); a
    lost shard then shows as merged tensors of the wrong shape, never as a silently smaller model."""
    out = export_meta(model, ARGS, tmp_path / "m", n_shards=2)
    _rename_shards(out, {"consolidated.00.pth": "a.pth", "consolidated.01.pth": "b.pth"})
    sd = load_model(out, progress=False).model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(sd[name], p), name
    (out / "b.pth").unlink()  # one of two shards lost: rank 0's slices alone are half the shape
    with pytest.raises(CheckpointError) as err:
        load_model(out, progress=False)
    _one_line(err, "shape")
