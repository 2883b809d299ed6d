"""Malformed checkpoint headers and configs give one-line errors naming the file, at once and without
allocating from the bad numbers: params.json, config.json, safetensors headers, index.json, llama2.c
headers, GGUF metadata and tensor tables. The files are written byte by byte here from the formats'
specifications, independently of the package's readers and writers."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llama2.checkpoint import read_checkpoint
from llama2.checkpoint.formats import read_safetensors_header
from llama2.errors import CheckpointError, Llama2Error, TokenizerError
from llama2.gguf_vocab import read_gguf_vocab
from llama2.limits import BOUNDS, Range

DIM, LAYERS, HEADS, KV, VOCAB, HIDDEN, CTX = 64, 2, 4, 2, 96, 96, 32
PARAMS = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV, "vocab_size": VOCAB,
          "hidden_dim": HIDDEN, "norm_eps": 1e-5, "max_seq_len": CTX, "format": "llama2"}  # fmt: skip
HF_CONFIG = {"model_type": "llama", "hidden_size": DIM, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
             "intermediate_size": HIDDEN, "rms_norm_eps": 1e-5, "max_position_embeddings": CTX}  # fmt: skip


def _fails_fast(call: Callable[[], Any], error: type[Exception] = CheckpointError) -> str:
    """Run `call`, expect `error`, and check it came within a second, as one line, with little memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error) as err:
            call()
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    msg = str(err.value)
    assert elapsed < 1.0, f"took {elapsed:.2f} s: {msg}"
    assert peak < 64 * 2**20, f"peaked at {peak / 2**20:.0f} MiB: {msg}"
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# ------------------------------------------------------------------------------------ safetensors
def _st_bytes(header: dict[str, Any] | str, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: uint64 header length, the JSON header, the data (spec: huggingface/safetensors)."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _valid_st() -> tuple[dict[str, Any], bytes]:
    """Two F32 tensors: a (2, 3) and a (4,), 24 + 16 bytes."""
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
        "__metadata__": {"format": "pt"},
    }
    return header, bytes(40)


def _edit(header: dict[str, Any], name: str, **changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(header))
    out[name].update(changes)
    return out


def _st_cases() -> list[tuple[str, bytes, str]]:
    h, data = _valid_st()
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(70_000)}
    dup = json.dumps(h)[:-1] + ', "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    return [
        ("unknown dtype", _st_bytes(_edit(h, "a", dtype="F33"), data), "unknown dtype 'F33'"),
        ("dtype not a string", _st_bytes(_edit(h, "a", dtype=5), data), "unknown dtype"),
        ("negative dim", _st_bytes(_edit(h, "a", shape=[-2, 3]), data), "non-negative integers"),
        ("string dim", _st_bytes(_edit(h, "a", shape=["2", 3]), data), "non-negative integers"),
        ("bool dim", _st_bytes(_edit(h, "a", shape=[True, 3]), data), "non-negative integers"),
        ("shape not a list", _st_bytes(_edit(h, "a", shape=6), data), "non-negative integers"),
        ("nine dims", _st_bytes(_edit(h, "a", shape=[1] * 9), data), "at most 8"),
        ("no offsets", _st_bytes({**h, "a": {"dtype": "F32", "shape": [2, 3]}}, data), "data_offsets"),
        ("one offset", _st_bytes(_edit(h, "a", data_offsets=[0]), data), "data_offsets"),
        ("string offsets", _st_bytes(_edit(h, "a", data_offsets=["0", "24"]), data), "data_offsets"),
        ("end before begin", _st_bytes(_edit(h, "a", data_offsets=[24, 0]), data), "end before"),
        ("size lies", _st_bytes(_edit(h, "a", shape=[2, 2]), data), "needs 16"),
        ("dtype lies", _st_bytes(_edit(h, "a", dtype="F16"), data), "needs 12"),
        ("overlap", _st_bytes(_edit(h, "b", data_offsets=[20, 36]), data), "overlaps"),
        ("gap", _st_bytes(_edit(h, "b", data_offsets=[28, 44]), bytes(44)), "gap"),
        ("past the end", _st_bytes(h, bytes(30)), "truncated file: tensor 'b'"),
        ("trailing bytes", _st_bytes(h, bytes(48)), "8 bytes after the last tensor"),
        ("metadata not strings", _st_bytes({**h, "__metadata__": {"n": 1}}, data), "__metadata__"),
        ("entry not an object", _st_bytes({**h, "a": [1, 2]}, data), "must be an object"),
        ("duplicate name", _st_bytes(dup, data), "appears twice"),
        ("not an object", _st_bytes("[1, 2, 3]", data), "not a JSON object"),
        ("not JSON", _st_bytes("{nope", data), "corrupt safetensors header"),
        ("deep nesting", _st_bytes("{" + '"a":[' * 100_000, data), "corrupt safetensors header"),
        ("nested value", _st_bytes(_edit(h, "a", shape=[[[[1]]]]), data), "nested too deeply"),
        ("header beyond file", _st_bytes(h, data, length=10_000), "header needs 10008 bytes"),
        ("17 MiB header", _st_bytes(h, data, length=17 * 2**20), "larger than the 16777216 bytes"),
        ("70k entries", _st_bytes(many), "more than 65536 entries"),
    ]


ST_CASES = _st_cases()


def test_valid_safetensors_header_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_st_bytes(*_valid_st()))
    header, start = read_safetensors_header(path)
    assert sorted(header) == ["__metadata__", "a", "b"] and start == len(path.read_bytes()) - 40


@pytest.mark.parametrize(("case", "raw", "expected"), ST_CASES, ids=[c[0] for c in ST_CASES])
def test_malformed_safetensors_header(case: str, raw: bytes, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    msg = _fails_fast(lambda: read_safetensors_header(path))
    assert str(path) in msg and expected in msg, msg


def test_entry_count_is_bounded_while_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys spelled with a JSON escape slip past the fast first look; the parser's hook still stops.
    monkeypatch.setitem(BOUNDS, "tensors_per_file", Range(0, 100))
    entry = '{"dtype": "U8", "shape": [0], "data_\\u006ffsets": [0, 0]}'
    entries = ", ".join(f'"t{i}": {entry}' for i in range(200))
    path = tmp_path / "model.safetensors"
    path.write_bytes(_st_bytes("{" + entries + "}"))
    assert "more than 100 entries" in _fails_fast(lambda: read_safetensors_header(path))


def _ours(tmp_path: Path, weights: bytes, params: dict[str, Any] | str = PARAMS) -> Path:
    root = tmp_path / "ours"
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    (root / "model.safetensors").write_bytes(weights)
    return root


def _embedding_st(name: str = "tok_embeddings.weight") -> bytes:
    n = VOCAB * DIM * 4
    return _st_bytes({name: {"dtype": "F32", "shape": [VOCAB, DIM], "data_offsets": [0, n]}}, bytes(n))


@pytest.mark.parametrize("case", ["not JSON", "17 MiB header", "70k entries", "overlap", "header beyond file"])  # noqa: E501
def test_corrupt_model_safetensors_is_named_when_loading(case: str, tmp_path: Path) -> None:
    raw = next(r for c, r, _ in ST_CASES if c == case)
    root = _ours(tmp_path, raw)
    assert read_checkpoint(_ours(tmp_path / "ok", _embedding_st())).args.dim == DIM  # the control loads
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert "model.safetensors" in msg, msg


def test_unrecognisable_weights_are_named(tmp_path: Path) -> None:
    root = _ours(tmp_path, struct.pack("<Q", 2**62) + b"{}" + bytes(64))
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert "model.safetensors" in msg and "header length" in msg, msg


# ------------------------------------------------------------------------------------ params / config
PARAMS_EDITS: list[tuple[str, Any]] = [
    ("n_layers", 10**7), ("n_layers", 100_000), ("n_kv_heads", 0), ("dim", -64), ("dim", 2**30),
    ("dim", "4096"), ("dim", None), ("dim", [64]), ("dim", True), ("norm_eps", -1.0), ("rope_theta", 0),
    ("hidden_dim", -1), ("vocab_size", 2**21), ("max_seq_len", 2**30), ("rope_scaling", {"type": "linear"}),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), PARAMS_EDITS)
def test_bad_params_json_names_file_and_field(key: str, value: Any, tmp_path: Path) -> None:
    root = _ours(tmp_path, _embedding_st(), {**PARAMS, key: value})
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert str(root / "params.json") in msg and key in msg, msg


@pytest.mark.parametrize(
    "text", ['{"dim": 1e400, "n_layers": 2}', "[" * 100_000, '{"dim": ' + "7" * 5000 + "}"]
)
def test_unparseable_params_json(text: str, tmp_path: Path) -> None:
    root = _ours(tmp_path, _embedding_st(), text)
    msg = _fails_fast(lambda: read_checkpoint(root), Llama2Error)
    assert "params.json" in msg, msg


def _hf(tmp_path: Path, config: dict[str, Any], index: Any = None) -> Path:
    root = tmp_path / "hf"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors").write_bytes(_embedding_st("model.embed_tokens.weight"))
    if index is not None:
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


HF_EDITS: list[tuple[str, Any]] = [
    ("num_hidden_layers", 10**7), ("num_key_value_heads", 0), ("hidden_size", "64"), ("hidden_size", None),
    ("intermediate_size", -96), ("rms_norm_eps", 0), ("rope_theta", -1), ("vocab_size", [96]),
    ("max_position_embeddings", True), ("rope_scaling", {"rope_type": "linear", "factor": 0}),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), HF_EDITS)
def test_bad_config_json_names_file_and_key(key: str, value: Any, tmp_path: Path) -> None:
    assert read_checkpoint(_hf(tmp_path / "ok", HF_CONFIG)).args.kv_heads == KV  # the control loads
    root = _hf(tmp_path, {**HF_CONFIG, key: value})
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert str(root / "config.json") in msg and key in msg, msg


# ------------------------------------------------------------------------------------ index.json
def _index(name: Any) -> dict[str, Any]:
    return {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/etc/passwd", "not a plain name"),
        ("../outside.safetensors", "not a plain name"),
        ("sub/../../outside.safetensors", "not a plain name"),
        ("C:\\weights.safetensors", "not a plain name"),
        ("missing.safetensors", "does not exist"),
        (5, "must be a non-empty string"),
        ("", "must be a non-empty string"),
        (["model.safetensors"], "must be a non-empty string"),
        ("link.safetensors", "outside the checkpoint folder"),
    ],
)
def test_index_names_only_files_inside_the_folder(name: Any, expected: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_embedding_st("model.embed_tokens.weight"))  # a valid file: only its place is wrong
    root = _hf(tmp_path, HF_CONFIG, _index(name))
    (root / "link.safetensors").symlink_to(outside)
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert "model.safetensors.index.json" in msg and expected in msg, msg


def test_index_with_plain_names_and_inner_links_loads(tmp_path: Path) -> None:
    root = _hf(tmp_path, HF_CONFIG, _index("inner.safetensors"))
    (root / "inner.safetensors").symlink_to(root / "model.safetensors")
    contents = read_checkpoint(root)
    assert [f.name for f in contents.files] == ["inner.safetensors"]


# ------------------------------------------------------------------------------------ llama2.c
def _l2c_v1(ints: tuple[int, ...], n_floats: int, shared: bool = False) -> bytes:
    header = struct.pack("<Ii7iB", 0x616B3432, 1, *ints, int(shared))
    return header + bytes(256 - len(header)) + bytes(4 * n_floats)


def _l2c_floats(dim: int, hidden: int, layers: int, heads: int, kv: int, vocab: int) -> int:
    """Float count of a v1 file with an untied head, from llama2.c's export.py layout (by hand)."""
    kv_dim = dim // heads * kv
    per_layer = 2 * dim + dim * dim * 2 + 2 * kv_dim * dim + 3 * hidden * dim
    return layers * per_layer + dim + 2 * vocab * dim


SHAPE = (DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB, CTX)


def _shape(**changes: int) -> tuple[int, ...]:
    names = ("dim", "hidden", "layers", "heads", "kv", "vocab", "ctx")
    return tuple(changes.get(n, v) for n, v in zip(names, SHAPE, strict=True))


L2C_CASES = [
    (_shape(layers=2**20), "n_layers 1048576 is outside [1, 1024]"),
    (_shape(layers=0), "n_layers 0"),
    (_shape(dim=0), "dim 0"),
    (_shape(dim=-64), "dim -64"),
    (_shape(heads=0), "n_heads 0"),
    (_shape(kv=0), "n_kv_heads 0"),
    (_shape(kv=3), "not a multiple of n_kv_heads 3"),
    (_shape(heads=3), "n_heads 3"),
    (_shape(hidden=-1), "hidden_dim -1"),
    (_shape(vocab=-VOCAB), "vocab_size is negative"),
    (_shape(vocab=2**30), "vocab_size 1073741824"),
    (_shape(ctx=2**30), "max_seq_len 1073741824"),
    (_shape(dim=2**16, heads=2**10, kv=2**10, layers=1024, hidden=2**20), "truncated llama2.c file: tensor"),
]


def test_valid_llama2c_header_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(_l2c_v1(SHAPE, _l2c_floats(DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB)))
    assert read_checkpoint(path).args.n_layers == LAYERS


@pytest.mark.parametrize(("ints", "expected"), L2C_CASES)
def test_malformed_llama2c_header(ints: tuple[int, ...], expected: str, tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(_l2c_v1(ints, 2**18))  # a 1 MiB file
    msg = _fails_fast(lambda: read_checkpoint(path))
    assert str(path) in msg and expected in msg, msg


def test_llama2c_size_must_match_the_shape(tmp_path: Path) -> None:
    n = _l2c_floats(DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB)
    path = tmp_path / "m.bin"
    path.write_bytes(_l2c_v1(SHAPE, n - 1))
    assert "truncated llama2.c file: tensor 'output.weight'" in _fails_fast(lambda: read_checkpoint(path))
    path.write_bytes(_l2c_v1(SHAPE, n + 1))
    assert "4 bytes after the last tensor" in _fails_fast(lambda: read_checkpoint(path))


def test_llama2c_v0_with_an_absurd_shape_is_not_taken_for_llama2c(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("<7i", *_shape(layers=2**20)) + bytes(2**20))
    assert "unknown checkpoint format" in _fails_fast(lambda: read_checkpoint(path))


# ------------------------------------------------------------------------------------ GGUF
U32, I32, F32, BOOL, STR, ARR, U64, F64 = 4, 5, 6, 7, 8, 9, 10, 12
_SCALAR = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", F64: "<d"}


def _gstr(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gval(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return _gstr(value)
    if vtype == ARR:
        sub, items = value
        return struct.pack("<IQ", sub, len(items)) + b"".join(_gval(sub, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


def _gguf(
    kv: dict[str, tuple[int, Any]],
    tensors: list[tuple[str, list[int], int, int]],
    data: bytes,
    *,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    raw_kv: bytes = b"",
    alignment: int = 32,
) -> bytes:
    """A GGUF v3 file from the spec: header, key-values, tensor infos (name, ne, type, offset), padding,
    data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kv) + (1 if raw_kv else 0) if n_kv is None else n_kv)  # fmt: skip
    for key, (vtype, value) in kv.items():
        out += _gstr(key) + struct.pack("<I", vtype) + _gval(vtype, value)
    out += raw_kv
    for name, ne, ggml_type, offset in tensors:
        out += _gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ggml_type, offset)
    out += bytes(-len(out) % alignment)
    return out + data


GGUF_KV: dict[str, tuple[int, Any]] = {
    "general.architecture": (STR, "llama"),
    "llama.context_length": (U32, CTX),
    "llama.embedding_length": (U32, DIM),
    "llama.block_count": (U32, LAYERS),
    "llama.feed_forward_length": (U32, HIDDEN),
    "llama.attention.head_count": (U32, HEADS),
    "llama.attention.head_count_kv": (U32, KV),
    "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
    "llama.rope.freq_base": (F32, 10000.0),
    "llama.vocab_size": (U32, VOCAB),
}
EMB_BYTES = VOCAB * DIM * 4  # token_embd.weight, F32 (type 0), ne = [DIM, VOCAB]
GGUF_TENSORS = [("token_embd.weight", [DIM, VOCAB], 0, 0), ("output_norm.weight", [DIM], 0, EMB_BYTES)]
GGUF_DATA = bytes(EMB_BYTES + DIM * 4)


def test_valid_gguf_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA))
    args = read_checkpoint(path).args
    assert (args.dim, args.n_layers, args.kv_heads, args.vocab_size, args.max_seq_len) == (
        DIM, LAYERS, KV, VOCAB, CTX
    )  # fmt: skip


GGUF_META_CASES: list[tuple[str, tuple[int, Any], str]] = [
    ("llama.block_count", (STR, "2"), "block_count must be an integer"),
    ("llama.block_count", (F32, 2.0), "block_count must be an integer"),
    ("llama.block_count", (BOOL, True), "block_count must be an integer"),
    ("llama.block_count", (ARR, (U32, [2])), "block_count must be an integer"),
    ("llama.block_count", (U32, 10**7), "block_count must be an integer in [1, 1024]"),
    ("llama.block_count", (U64, 2**63), "block_count must be an integer in [1, 1024]"),
    ("llama.embedding_length", (U32, 0), "embedding_length"),
    ("llama.embedding_length", (I32, -64), "embedding_length"),
    ("llama.embedding_length", (U64, 2**30), "embedding_length"),
    ("llama.attention.head_count", (U32, 0), "head_count"),
    ("llama.attention.head_count_kv", (U32, 0), "head_count_kv"),
    ("llama.attention.head_count_kv", (U32, 3), "n_kv_heads (3)"),
    ("llama.feed_forward_length", (I32, -1), "feed_forward_length"),
    ("llama.context_length", (U64, 2**40), "context_length"),
    ("llama.context_length", (STR, "4096"), "context_length"),
    ("llama.attention.layer_norm_rms_epsilon", (F32, -1.0), "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (F32, float("nan")), "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (F64, 1e-60), "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (STR, "1e-5"), "layer_norm_rms_epsilon"),
    ("llama.rope.freq_base", (F32, 0.0), "freq_base"),
    ("llama.rope.freq_base", (F32, float("inf")), "freq_base"),
    ("llama.rope.freq_base", (F64, 1e300), "freq_base"),
    ("llama.rope.scaling.type", (U32, 1), "rope.scaling.type must be a string"),
    ("llama.rope.scale_linear", (F32, float("nan")), "scale_linear"),
    ("llama.rope.dimension_count", (STR, "16"), "dimension_count"),
    ("llama.vocab_size", (STR, "96"), "vocab_size"),
    ("general.alignment", (BOOL, True), "general.alignment"),
    ("general.alignment", (U32, 0), "general.alignment"),
    ("general.alignment", (U32, 48), "general.alignment"),
    ("general.alignment", (U32, 2**20), "general.alignment"),
]


@pytest.mark.parametrize(("key", "value", "expected"), GGUF_META_CASES)
def test_malformed_gguf_metadata(key: str, value: tuple[int, Any], expected: str, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf({**GGUF_KV, key: value}, GGUF_TENSORS, GGUF_DATA))
    msg = _fails_fast(lambda: read_checkpoint(path))
    assert str(path) in msg and expected in msg, msg


def _tensors(**changes: Any) -> list[tuple[str, list[int], int, int]]:
    """GGUF_TENSORS with the second entry's fields replaced (name, ne, type, offset)."""
    name, ne, t, off = GGUF_TENSORS[1]
    get = changes.get
    second = (get("name", name), get("ne", ne), get("type", t), get("offset", off))
    return [GGUF_TENSORS[0], second]


NEST = struct.pack("<IQ", ARR, 1)  # an array of one array
GGUF_TABLE_CASES: list[tuple[str, bytes, str]] = [
    ("unknown type", _gguf(GGUF_KV, _tensors(type=99), GGUF_DATA), "unknown ggml type 99"),
    ("zero dims", _gguf(GGUF_KV, _tensors(ne=[]), GGUF_DATA), "has 0 dimensions"),
    ("five dims", _gguf(GGUF_KV, _tensors(ne=[DIM, 1, 1, 1, 1]), GGUF_DATA), "has 5 dimensions"),
    ("zero-length dim", _gguf(GGUF_KV, _tensors(ne=[0]), GGUF_DATA), "each must be in"),
    ("huge dim", _gguf(GGUF_KV, _tensors(ne=[2**62]), GGUF_DATA), "each must be in"),
    ("misaligned", _gguf(GGUF_KV, _tensors(offset=EMB_BYTES + 16), GGUF_DATA + bytes(16)), "misaligned"),
    ("overlapping", _gguf(GGUF_KV, _tensors(offset=0), GGUF_DATA), "overlapping"),
    ("lying type", _gguf(GGUF_KV, [("token_embd.weight", [DIM, VOCAB], 1, 0), GGUF_TENSORS[1]], GGUF_DATA),
     "expected 12288"),
    ("beyond the file", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA[:-8]), "truncated GGUF file"),
    ("row not whole blocks", _gguf(GGUF_KV, _tensors(ne=[33], type=8), GGUF_DATA), "block size 32"),
    ("duplicate tensor", _gguf(GGUF_KV, _tensors(name="token_embd.weight"), GGUF_DATA), "appears twice"),
    ("duplicate key", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA,
                            raw_kv=_gstr("llama.block_count") + struct.pack("<II", U32, 2)), "appears twice"),
    ("2^40 tensors", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA, n_tensors=2**40), "1099511627776 tensors"),
    ("2^40 keys", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA, n_kv=2**40), "claims 1099511627776 keys"),
    ("2^60 strings", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA,
                           raw_kv=_gstr("x") + struct.pack("<IIQ", ARR, STR, 2**60)), "strings but only"),
    ("2^60 arrays", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA,
                          raw_kv=_gstr("x") + struct.pack("<IIQ", ARR, ARR, 2**60)), "arrays but only"),
    ("2^60 floats", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA,
                          raw_kv=_gstr("x") + struct.pack("<IIQ", ARR, F32, 2**60)), "truncated or corrupt"),
    ("100k nested arrays", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA,
                                 raw_kv=_gstr("x") + struct.pack("<I", ARR) + NEST * 100_000),
     "nests arrays deeper than 64"),
    ("bad value type", _gguf(GGUF_KV, GGUF_TENSORS, GGUF_DATA, raw_kv=_gstr("x") + struct.pack("<I", 77)),
     "unknown value type 77"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "raw", "expected"), GGUF_TABLE_CASES, ids=[c[0] for c in GGUF_TABLE_CASES])
def test_malformed_gguf_header(case: str, raw: bytes, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    msg = _fails_fast(lambda: read_checkpoint(path))
    assert str(path) in msg and expected in msg, msg


def test_gguf_vocabulary_arrays_of_the_wrong_type(tmp_path: Path) -> None:
    base = {"tokenizer.ggml.model": (STR, "llama"), "tokenizer.ggml.tokens": (ARR, (STR, ["<unk>", "a"]))}
    cases = [
        ({"tokenizer.ggml.tokens": (ARR, (U32, [1, 2]))}, "array of strings"),
        ({"tokenizer.ggml.scores": (ARR, (STR, ["0", "0"]))}, "array of floats"),
        ({"tokenizer.ggml.token_type": (ARR, (F32, [2.0, 1.0]))}, "array of integers"),
        ({"tokenizer.ggml.scores": (ARR, (F32, [0.0, 0.0])), "tokenizer.ggml.unknown_token_id": (STR, "0")},
         "unknown token id"),
    ]  # fmt: skip
    for extra, expected in cases:
        path = tmp_path / "v.gguf"
        path.write_bytes(_gguf({**base, **extra}, [], b""))
        msg = _fails_fast(lambda p=path: read_gguf_vocab(p), TokenizerError)
        assert expected in msg, msg


# ------------------------------------------------------------------------------------ the CLI
def _cli_cases(tmp_path: Path) -> list[Path]:
    out = []
    bad_params = _ours(tmp_path / "a", _embedding_st(), {**PARAMS, "n_kv_heads": 0})
    out.append(bad_params)
    gguf = tmp_path / "c.gguf"
    gguf.write_bytes(_gguf({**GGUF_KV, "llama.block_count": (STR, "2")}, GGUF_TENSORS, GGUF_DATA))
    out.append(gguf)
    l2c = tmp_path / "d.bin"
    l2c.write_bytes(_l2c_v1(_shape(layers=2**20), 2**18))
    out.append(l2c)
    return out


def test_cli_prints_one_line_errors(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMA2_NO_KERNELS": "1"}
    for model in _cli_cases(tmp_path):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "llama2", "generate", "--model", str(model), "--prompt", "Hi",
             "--max-new-tokens", "1"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        lines = proc.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("llama2: error:")]
        assert proc.returncode == 1, proc.stderr
        assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress lines may precede it
        assert all(line.startswith("llama2: ") for line in lines), proc.stderr  # no traceback
        assert model.name in errors[0], proc.stderr
        # Loose: importing torch dominates (3 s idle, 15 s on a busy 2-core runner); the in-process
        # tests above hold the checks themselves to a second.
        assert elapsed < 60.0, f"{model}: {elapsed:.1f} s"



# ------------------------------------------------------------------ enum-like fields (issue 9)
def _l2c_v1_raw(flag: int, version: int = 1, shared_floats: bool = False) -> bytes:
    """A v1 file with any flag byte (export.py writes 0 or 1) and version field."""
    n = _l2c_floats(DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB) - (VOCAB * DIM if shared_floats else 0)
    header = struct.pack("<Ii7iB", 0x616B3432, version, *SHAPE, flag)
    return header + bytes(256 - len(header)) + bytes(4 * n)


@pytest.mark.parametrize("flag", [2, 7, 128, 255])
def test_llama2c_shared_classifier_flag_must_be_0_or_1(flag: int, tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    for shared in (False, True):  # whichever size the flag would imply, the flag itself is refused
        path.write_bytes(_l2c_v1_raw(flag, shared_floats=shared))
        msg = _fails_fast(lambda: read_checkpoint(path))
        assert str(path) in msg and f"shared-classifier flag {flag}" in msg and "expected 0" in msg, msg


def test_llama2c_shared_classifier_flags_0_and_1_load(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(_l2c_v1_raw(0))
    assert "output.weight" in {s.name for s in read_checkpoint(path).tensors}
    path.write_bytes(_l2c_v1_raw(1, shared_floats=True))  # no output.weight in the file
    assert read_checkpoint(path).args.vocab_size == VOCAB


@pytest.mark.parametrize("version", [0, 2, 3, -1, 2**31 - 1])
def test_llama2c_v1_version_field(version: int, tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(_l2c_v1_raw(0, version=version))
    msg = _fails_fast(lambda: read_checkpoint(path))
    assert f"version {version} is not supported" in msg, msg


@pytest.mark.parametrize("value", ["llama3", "Llama2", "", None, 2, ["llama2"]])
def test_params_json_format_other_than_llama2(value: Any, tmp_path: Path) -> None:
    root = _ours(tmp_path, _embedding_st(), {**PARAMS, "format": value})
    msg = _fails_fast(lambda: read_checkpoint(root))
    assert "params.json" in msg and repr(value)[:20] in msg and "expected 'llama2'" in msg, msg
    msg = _fails_fast(lambda: read_checkpoint(root / "model.safetensors"))  # the file named directly
    assert "params.json" in msg and "expected 'llama2'" in msg, msg


def test_params_json_with_format_llama2_or_none_loads(tmp_path: Path) -> None:
    assert read_checkpoint(_ours(tmp_path / "a", _embedding_st())).args.dim == DIM  # "format": "llama2"
    meta_style = {k: v for k, v in PARAMS.items() if k != "format"}  # Meta's params.json has no "format"
    assert read_checkpoint(_ours(tmp_path / "b", _embedding_st(), meta_style)).args.dim == DIM
