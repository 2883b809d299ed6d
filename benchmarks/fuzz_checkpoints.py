"""Malformed-checkpoint fuzz campaign (issue 9): >= 150 corrupted checkpoints of every format, each
loaded by `python -m llama2 generate --model CASE --max-new-tokens 1 --prompt x --quiet` in a fresh
subprocess (address space capped, `--timeout` seconds = a hang). Per case it records the exit code,
wall time, the child's peak RSS (os.wait4), whether stderr holds a Python traceback and whether it is
the one line `llama2: error: ...`. Every case starts from a small valid checkpoint written here
without the llama2 package (see fuzz_support.py); a valid control per format must succeed.

    # BEFORE (the committed tree), from the repository root:
    git worktree add /tmp/llama2-before HEAD
    .venv/bin/python benchmarks/fuzz_checkpoints.py --src /tmp/llama2-before/src \
        --json /tmp/fuzz-before/checkpoints.json
    # AFTER (the working tree):
    .venv/bin/python benchmarks/fuzz_checkpoints.py --src src --json /tmp/fuzz-after/checkpoints.json
    # a subset / the case list:
    .venv/bin/python benchmarks/fuzz_checkpoints.py --only gguf/ --list

Categories: meta-params, meta-weights, ours, hf-config, hf-safetensors, hf-index, llama2c, gguf, cli.
Exits 1 when any case hangs, crashes, prints a traceback or is not a one-line error (controls: not ok).
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_support as fs
from fuzz_support import ARR, F32, I32, STR, U32, U64, Case, GTensor


class Raw(str):
    """A JSON value written verbatim (NaN, 1e400, a 400-digit integer)."""


def dump(data: Any) -> str:
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(data))
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r)
    return text


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--max-new-tokens", "1", "--prompt", "x", "--quiet", *extra]


DEEP_JSON = "[" * 100_000 + "]" * 100_000
WHOLE_FILE = {  # replacements of a whole JSON config file
    "json-list": "[1, 2]", "json-string": '"params"', "json-null": "null", "deeply-nested": DEEP_JSON,
    "deep-object": '{"a": ' * 50_000 + "1" + "}" * 50_000, "invalid-json": '{"dim": 64,', "empty": "",
    "non-utf8": '{"dim": 64, "x": "\xff\xfe"}', "nan-everywhere": '{"dim": NaN, "n_layers": NaN}',
}  # fmt: skip

META_MUTATIONS: list[tuple[str, Any]] = [
    ("n_layers", 100_000), ("n_layers", 10**7), ("n_layers", 0), ("n_layers", -1), ("n_layers", "2"),
    ("n_layers", None), ("n_layers", [2]), ("n_layers", 2.5), ("n_layers", Raw("1e400")), ("n_layers", 2**64),
    ("dim", 2**30), ("dim", Raw("1e400")), ("dim", Raw("1" + "0" * 400)), ("dim", 0), ("dim", -64),
    ("dim", "64"), ("dim", 63), ("n_heads", 0), ("n_heads", -4), ("n_heads", 3), ("n_heads", 10**9),
    ("n_kv_heads", 0), ("n_kv_heads", -2), ("n_kv_heads", 3), ("n_kv_heads", 8), ("vocab_size", 0),
    ("vocab_size", -5), ("vocab_size", 10**9), ("vocab_size", 2**63), ("multiple_of", 0),
    ("hidden_dim", -192), ("hidden_dim", 10**9), ("norm_eps", -1), ("norm_eps", 0), ("norm_eps", Raw("NaN")),
    ("rope_theta", 0), ("rope_theta", Raw("NaN")), ("rope_theta", -1), ("rope_theta", Raw("Infinity")),
    ("max_seq_len", 0), ("max_seq_len", 10**12), ("ffn_dim_multiplier", -1), ("ffn_dim_multiplier", 0),
    ("rope_scaling", {"type": "linear", "factor": 0}), ("rope_scaling", {"type": "bogus", "factor": 2}),
    ("rope_scaling", "x"), ("rope_scaling", {"type": "linear", "factor": Raw("NaN")}),
]  # fmt: skip

HF_MUTATIONS: list[tuple[str, Any]] = [
    ("num_hidden_layers", 100_000), ("num_hidden_layers", 10**7), ("num_hidden_layers", "2"),
    ("num_hidden_layers", None), ("num_hidden_layers", -1), ("num_hidden_layers", [2]),
    ("hidden_size", 2**30), ("hidden_size", 0), ("hidden_size", -64), ("hidden_size", Raw("1e400")),
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("num_key_value_heads", 3),
    ("intermediate_size", -1), ("rms_norm_eps", -1), ("rms_norm_eps", Raw("NaN")), ("rope_theta", 0),
    ("rope_theta", Raw("NaN")), ("vocab_size", 0), ("vocab_size", -1), ("max_position_embeddings", -1),
    ("max_position_embeddings", Raw("1e400")), ("model_type", "gpt2"),
    ("rope_scaling", {"type": "linear", "factor": -1}), ("head_dim", 7),
]  # fmt: skip

OURS_MUTATIONS: list[tuple[str, Any]] = [
    ("n_layers", 10**7), ("dim", 2**30), ("n_kv_heads", 0), ("norm_eps", -1), ("rope_theta", Raw("NaN")),
    ("n_layers", "2"), ("format", "llama3"), ("format", None),
]  # fmt: skip


# Mutations a loader may reasonably accept (no verdict either way; still must not hang or trace back).
ACCEPTABLE = {("norm_eps", 0), ("format", None)}


def label(key: str, value: Any) -> str:
    v = str(value) if not isinstance(value, str) or isinstance(value, Raw) else repr(value)
    return f"{key}={v}"[:40]


def _expect(key: str, value: Any) -> str:
    ok = any(key == k and type(value) is type(v) and value == v for k, v in ACCEPTABLE)
    return "any" if ok else "error"


# ============================================================================ builders
class Builder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: list[Case] = []
        self._n = 0

    def folder(self, category: str, name: str) -> Path:
        self._n += 1
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:50]
        p = self.root / category / f"{self._n:03d}-{safe}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def add(self, category: str, name: str, argv: list[str], expect: str = "error", **kw: Any) -> None:
        self.cases.append(Case(name, category, argv, expect, **kw))


def build_meta(b: Builder) -> None:
    import torch

    b.add("meta-params", "CONTROL valid", gen(fs.write_meta(b.folder("meta-params", "control"))), "ok")
    for key, value in META_MUTATIONS:
        f = b.folder("meta-params", label(key, value))
        fs.write_meta(f)
        (f / "params.json").write_text(dump({**fs.META_PARAMS, key: value}))
        b.add("meta-params", label(key, value), gen(f), _expect(key, value))
    for name, text in WHOLE_FILE.items():
        f = b.folder("meta-params", name)
        fs.write_meta(f)
        (f / "params.json").write_bytes(text.encode("utf-8", "surrogateescape") if name != "non-utf8"
                                        else b'{"dim": 64, "x": "\xff\xfe"}')  # fmt: skip
        b.add("meta-params", f"params.json {name}", gen(f))
    f = b.folder("meta-params", "missing")
    fs.write_meta(f)
    (f / "params.json").unlink()
    b.add("meta-params", "params.json missing", gen(f))

    def weights(name: str, change: Callable[[dict[str, Any]], Any], expect: str = "error") -> None:
        f = b.folder("meta-weights", name)
        sd = fs.meta_tensors()
        out = change(sd)
        fs.write_meta(f, sd=sd if out is None else out)
        b.add("meta-weights", name, gen(f), expect)

    def raw_file(name: str, data: Callable[[bytes], bytes]) -> None:
        f = b.folder("meta-weights", name)
        fs.write_meta(f)
        pth = f / "consolidated.00.pth"
        pth.write_bytes(data(pth.read_bytes()))
        b.add("meta-weights", name, gen(f))

    def setitem(sd: dict[str, Any], k: str, v: Any) -> None:
        sd[k] = v

    wq = "layers.0.attention.wq.weight"
    weights("sparse tensor", lambda sd: setitem(sd, wq, sd[wq].to_sparse()))
    weights("sparse csr tensor", lambda sd: setitem(sd, wq, sd[wq].to_sparse_csr()))
    weights("meta-device tensor", lambda sd: setitem(sd, wq, torch.empty(fs.DIM, fs.DIM, device="meta")))
    weights("NaN weights", lambda sd: sd[wq].fill_(float("nan")))
    weights("Inf embeddings", lambda sd: sd["tok_embeddings.weight"].fill_(float("inf")))
    weights("wrong shape", lambda sd: setitem(sd, wq, torch.zeros(fs.DIM - 1, fs.DIM)))
    weights("missing tensor", lambda sd: sd.pop("norm.weight"))
    weights("extra tensor", lambda sd: setitem(sd, "bogus.weight", torch.zeros(3)), "any")
    weights("int64 tensor", lambda sd: setitem(sd, wq, torch.zeros(fs.DIM, fs.DIM, dtype=torch.int64)))
    weights("complex tensor", lambda sd: setitem(sd, wq, torch.zeros(fs.DIM, fs.DIM, dtype=torch.complex64)))
    weights("bool tensor", lambda sd: setitem(sd, "norm.weight", torch.ones(fs.DIM, dtype=torch.bool)))
    weights("int value", lambda sd: setitem(sd, "norm.weight", 5))
    weights("nested dict value", lambda sd: setitem(sd, "norm.weight", {"w": torch.ones(fs.DIM)}))
    weights("top-level list", lambda sd: list(sd.values()))
    weights("empty dict", lambda sd: {})
    weights("zero-size embeddings", lambda sd: setitem(sd, "tok_embeddings.weight", torch.zeros(0, fs.DIM)))
    weights("non-str key", lambda sd: setitem(sd, 7, torch.zeros(1)))  # type: ignore[arg-type]
    raw_file("empty file", lambda d: b"")
    raw_file("truncated half", lambda d: d[: len(d) // 2])
    raw_file("random bytes", lambda d: bytes((i * 7919) % 251 for i in range(4096)))
    raw_file("zip without data.pkl", lambda d: _zip({"archive/readme.txt": b"hi"}))
    raw_file("zip data.pkl garbage",
             lambda d: _zip({"archive/data.pkl": b"\x80\x02garbage", "archive/version": b"3\n"}))  # fmt: skip
    raw_file("flipped bytes in data", lambda d: d[:-2000] + bytes(b ^ 0xFF for b in d[-2000:]))

    # two model-parallel shards whose replicated tensors (norms) disagree / a missing shard
    for name, mutate in (("shards norms disagree", "norm"), ("shards 00 and 02 (01 missing)", "gap"),
                         ("shards different shapes", "shape")):  # fmt: skip
        f = b.folder("meta-weights", name)
        fs.write_meta(f)
        sd = fs.meta_tensors()
        halves: list[dict[str, Any]] = [{}, {}]
        for k, t in sd.items():
            if t.dim() == 1:
                halves[0][k], halves[1][k] = t.clone(), t.clone()
            else:
                d = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
                a, c = torch.chunk(t, 2, dim=d)
                halves[0][k], halves[1][k] = a.contiguous().clone(), c.contiguous().clone()
        if mutate == "norm":
            halves[1]["norm.weight"] = halves[1]["norm.weight"] * 3.0
        if mutate == "shape":
            halves[1][wq] = torch.zeros(7, fs.DIM)
        torch.save(halves[0], f / "consolidated.00.pth")
        torch.save(halves[1], f / ("consolidated.02.pth" if mutate == "gap" else "consolidated.01.pth"))
        b.add("meta-weights", name, gen(f))


def _zip(members: dict[str, bytes]) -> bytes:
    with tempfile.TemporaryFile() as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for n, d in members.items():
                zf.writestr(n, d)
        tmp.seek(0)
        return tmp.read()


def build_ours(b: Builder) -> None:
    import torch

    b.add("ours", "CONTROL valid", gen(fs.write_ours(b.folder("ours", "control"))), "ok")
    for key, value in OURS_MUTATIONS:
        f = b.folder("ours", label(key, value))
        fs.write_ours(f)
        (f / "params.json").write_text(dump({"format": "llama2", **fs.META_PARAMS, key: value}))
        b.add("ours", label(key, value), gen(f), _expect(key, value))
    f = b.folder("ours", "nan")
    sd = fs.meta_tensors()
    sd["layers.1.feed_forward.w2.weight"].fill_(float("nan"))
    fs.write_ours(f, sd=sd)
    b.add("ours", "NaN weights", gen(f))
    f = b.folder("ours", "bf16 wrong shape")
    sd = fs.meta_tensors()
    sd["output.weight"] = torch.zeros(fs.VOCAB + 1, fs.DIM, dtype=torch.bfloat16)
    fs.write_ours(f, sd=sd)
    b.add("ours", "output one row too many", gen(f))


# ----------------------------------------------------------------------------- safetensors
def st_bytes(header: Any, data: bytes, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def split_st(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def build_hf(b: Builder) -> None:
    b.add("hf-config", "CONTROL valid", gen(fs.write_hf(b.folder("hf-config", "control"))), "ok")
    b.add("hf-config", "CONTROL pytorch_model.bin",
          gen(fs.write_hf(b.folder("hf-config", "control-bin"), bin_file=True)), "ok")  # fmt: skip
    for key, value in HF_MUTATIONS:
        f = b.folder("hf-config", label(key, value))
        fs.write_hf(f)
        (f / "config.json").write_text(dump({**fs.HF_CONFIG, key: value}))
        b.add("hf-config", label(key, value), gen(f))
    for name in ("json-list", "deeply-nested", "invalid-json", "empty"):
        f = b.folder("hf-config", name)
        fs.write_hf(f)
        (f / "config.json").write_text(WHOLE_FILE[name])
        b.add("hf-config", f"config.json {name}", gen(f))

    base = b.folder("hf-safetensors", "base")
    fs.write_hf(base)
    valid = (base / "model.safetensors").read_bytes()
    header, data = split_st(valid)
    first = next(k for k in header if k != "__metadata__")
    tensor_names = [k for k in header if k != "__metadata__"]

    def st_case(name: str, raw: bytes | Callable[[], bytes]) -> None:
        f = b.folder("hf-safetensors", name)
        fs.write_hf(f)
        (f / "model.safetensors").write_bytes(raw() if callable(raw) else raw)
        b.add("hf-safetensors", name, gen(f))

    def with_entry(change: Callable[[dict[str, Any]], None]) -> bytes:
        h = json.loads(json.dumps(header))
        change(h)
        return st_bytes(h, data)

    def many_entries() -> bytes:
        h: dict[str, Any] = {f"junk.{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                             for i in range(400_000)}  # fmt: skip
        return st_bytes(h, b"\0" * 1_600_000)

    st_case("header 400k entries", many_entries)
    st_case("header length 2^63", st_bytes(header, data, 2**63))
    st_case("header length past EOF", st_bytes(header, data, len(valid) + 1))
    st_case("header length 0", st_bytes(b"", data))
    st_case("header not json", st_bytes(b"{garbage" + b" " * 8, data))
    st_case("header json list", st_bytes(b"[]", data))
    st_case("header deeply nested", st_bytes(("[" * 100_000 + "]" * 100_000).encode(), data))
    past = [0, len(data) + 4096]
    st_case("data_offsets past EOF", with_entry(lambda h: h[first].update(data_offsets=past)))
    second = tensor_names[1]
    st_case("overlapping offsets", with_entry(
        lambda h: h[second].update(data_offsets=h[first]["data_offsets"])
    ))
    st_case("dtype lies (F16 for F32 data)", with_entry(lambda h: h[first].update(dtype="F16")))
    st_case("negative shape", with_entry(lambda h: h[first].update(shape=[-1, fs.DIM])))
    st_case("shape overflow 2^40 x 2^40", with_entry(lambda h: h[first].update(shape=[2**40, 2**40])))
    st_case("unknown dtype F128", with_entry(lambda h: h[first].update(dtype="F128")))
    st_case("metadata not strings", with_entry(lambda h: h.update({"__metadata__": {"format": [1, 2]}})))
    st_case("entry not an object", with_entry(lambda h: h.update({first: 5})))
    st_case("truncated in data", valid[: len(valid) // 2])
    st_case("truncated in header", valid[:200])
    st_case("empty file", b"")
    st_case("7 bytes", b"\x10\0\0\0\0\0\0")
    st_case("corrupt header bytes", valid[:40] + bytes(b ^ 0x5A for b in valid[40:400]) + valid[400:])
    st_case("NaN weights", lambda: st_bytes(header, b"\x00\x00\xc0\x7f" * (len(data) // 4)))

    # index.json cases
    def index_case(name: str, weight_map: Any, extra: Callable[[Path], None] | None = None) -> None:
        f = b.folder("hf-index", name)
        fs.write_hf(f)
        shard = f / "model-00001-of-00001.safetensors"
        (f / "model.safetensors").rename(shard)
        wm = weight_map(shard) if callable(weight_map) else weight_map
        (f / "model.safetensors.index.json").write_text(dump({"metadata": {}, "weight_map": wm})
                                                       if not isinstance(wm, str) else wm)  # fmt: skip
        if extra is not None:
            extra(f)
        b.add("hf-index", name, gen(f))

    names = [fs.hf_name(k) for k in fs.meta_tensors()]
    outside = b.root / "hf-index" / "outside.safetensors"

    def place_outside(f: Path) -> None:
        outside.write_bytes((f / "model-00001-of-00001.safetensors").read_bytes())

    index_case("names a file outside the folder", {n: "../outside.safetensors" for n in names}, place_outside)
    index_case("names an absolute path", {n: str(outside) for n in names}, place_outside)
    index_case("names /etc/passwd", {n: "/etc/passwd" for n in names})
    index_case("names a missing shard", {n: "model-00002-of-00002.safetensors" for n in names})
    index_case("names config.json as shard", {n: "config.json" for n in names})
    index_case("weight_map is a list", ["x"])
    index_case("index not json", "{not json")
    index_case("weight_map values not strings", {n: 5 for n in names})


# ----------------------------------------------------------------------------- llama2.c
def build_llama2c(b: Builder) -> None:
    ok = [fs.DIM, fs.HIDDEN, fs.N_LAYERS, fs.N_HEADS, fs.N_KV_HEADS, fs.VOCAB, fs.MAX_SEQ]

    def case(name: str, raw: bytes, expect: str = "error") -> None:
        f = b.folder("llama2c", name)
        fs.copy_tokenizer(f)
        (f / "model.bin").write_bytes(raw)
        b.add("llama2c", name, gen(f / "model.bin", "--tokenizer", str(f / "tokenizer.model")), expect)

    def hdr(i: int, v: int, version: int = 1) -> bytes:
        h = list(ok)
        h[i] = v
        return fs.llama2c_bytes(h, version=version)

    case("CONTROL v1", fs.llama2c_bytes(), "ok")
    case("CONTROL v0", fs.llama2c_bytes(version=0), "ok")
    h = list(ok)
    h[2] = 2**20
    case("1 MB claiming 2^20 layers", fs.llama2c_bytes(h)[: 1 << 20])
    case("v0 1 MB claiming 2^20 layers", fs.llama2c_bytes(h, version=0)[: 1 << 20])
    for name, i, v in (("n_layers 100000", 2, 100_000), ("n_layers 10^7", 2, 10**7), ("dim 2^30", 0, 2**30),
                       ("dim -64", 0, -64), ("dim 0", 0, 0), ("n_heads 0", 3, 0), ("n_kv_heads 0", 4, 0),
                       ("n_kv_heads 3", 4, 3), ("n_heads 128 > dim", 3, 128), ("vocab 0", 5, 0),
                       ("vocab -1 (v1)", 5, -1), ("seq_len 0", 6, 0), ("seq_len 2^31-1", 6, 2**31 - 1),
                       ("hidden -1", 1, -1), ("hidden 2^31-1", 1, 2**31 - 1)):  # fmt: skip
        case(name, hdr(i, v))
    case("v0 dim 2^30", hdr(0, 2**30, version=0))
    case("version 2", fs.llama2c_bytes(version=2))
    case("version -1", fs.llama2c_bytes(version=-1))
    case("shared flag 7", fs.llama2c_bytes(shared=7))
    valid = fs.llama2c_bytes()
    case("truncated header", valid[:100])
    case("truncated half", valid[: len(valid) // 2])
    case("empty", b"")
    case("256 zero bytes", b"\0" * 256)
    case("trailing garbage", valid + b"\x01" * 1000)


# ----------------------------------------------------------------------------- GGUF
def build_gguf(b: Builder) -> None:
    def case(name: str, raw: bytes | Callable[[], bytes], expect: str = "error") -> None:
        f = b.folder("gguf", name)
        (f / "model.gguf").write_bytes(raw() if callable(raw) else raw)
        b.add("gguf", name, gen(f / "model.gguf"), expect)

    def kv(key: str, vtype: int | None, value: Any = None) -> Callable[[], bytes]:
        def make() -> bytes:
            kvs = [x for x in fs.gguf_model_kvs() if x[0] != key]
            if vtype is not None:
                kvs.append((key, vtype, value))
            return fs.gguf_bytes(kvs)

        return make

    def tens(change: Callable[[list[GTensor]], Any]) -> Callable[[], bytes]:
        def make() -> bytes:
            ts = fs.gguf_tensors()
            out = change(ts)
            return fs.gguf_bytes(tensors=ts if out is None else out)

        return make

    bc = "llama.block_count"
    case("CONTROL valid", fs.gguf_bytes, "ok")
    case("block_count 100000", kv(bc, U32, 100_000))
    case("block_count 10^7", kv(bc, U32, 10**7))
    case("block_count 2^63 (u64)", kv(bc, U64, 2**63))
    case("block_count -1 (i32)", kv(bc, I32, -1))
    case("block_count string", kv(bc, STR, "2"))
    case("block_count array", kv(bc, ARR, (U32, [2])))
    case("block_count missing", kv(bc, None))
    case("embedding_length 2^30", kv("llama.embedding_length", U32, 2**30))
    case("embedding_length 0", kv("llama.embedding_length", U32, 0))
    case("head_count 0", kv("llama.attention.head_count", U32, 0))
    case("head_count_kv 0", kv("llama.attention.head_count_kv", U32, 0))
    case("head_count_kv 3", kv("llama.attention.head_count_kv", U32, 3))
    case("context_length 0", kv("llama.context_length", U32, 0))
    case("freq_base NaN", kv("llama.rope.freq_base", F32, float("nan")))
    case("freq_base 0", kv("llama.rope.freq_base", F32, 0.0))
    case("rms eps -1", kv("llama.attention.layer_norm_rms_epsilon", F32, -1.0))
    case("architecture gpt2", kv("general.architecture", STR, "gpt2"))
    case("architecture missing", kv("general.architecture", None))
    case("tokens array of u32", kv("tokenizer.ggml.tokens", ARR, (U32, list(range(fs.VOCAB)))))
    case("tokens string", kv("tokenizer.ggml.tokens", STR, "abc"))
    case("alignment 0", kv("general.alignment", U32, 0))
    case("alignment 3", kv("general.alignment", U32, 3))

    def nested(depth: int) -> bytes:
        inner = struct.pack("<IQ", U32, 0)
        for _ in range(depth):
            inner = struct.pack("<IQ", ARR, 1) + inner
        return fs.gguf_str("fuzz.nested") + struct.pack("<I", ARR) + inner

    case("nested arrays depth 100000", lambda: fs.gguf_bytes(raw_kv=nested(100_000)))
    lying_array = fs.gguf_str("fuzz.big") + struct.pack("<IIQ", ARR, fs.U8, 2**60)
    case("array count 2^60 (lying)", lambda: fs.gguf_bytes(raw_kv=lying_array))
    case("string length 2^62 (lying)",
         lambda: fs.gguf_bytes(raw_kv=fs.gguf_str("fuzz.s") + struct.pack("<IQ", STR, 2**62)))  # fmt: skip
    case("unknown value type 99", lambda: fs.gguf_bytes(raw_kv=fs.gguf_str("fuzz.t") + struct.pack("<I", 99)))
    case("kv_count 2^40", lambda: fs.gguf_bytes(n_kv=2**40))
    case("tensor_count 2^40", lambda: fs.gguf_bytes(n_tensors=2**40))
    case("tensor misaligned", tens(lambda ts: setattr(ts[1], "offset", (fs.VOCAB * fs.DIM * 4) + 1)))
    case("tensors overlap", tens(lambda ts: setattr(ts[2], "offset", 0)))
    case("offset past EOF", tens(lambda ts: setattr(ts[-1], "offset", 2**40)))
    case("type lies (F16 for F32 data)", tens(lambda ts: setattr(ts[0], "gtype", 1)))
    case("type lies (Q4_0 for F32 data)", tens(lambda ts: setattr(ts[1], "gtype", 2)))
    case("unknown tensor type 999", tens(lambda ts: setattr(ts[0], "gtype", 999)))
    case("n_dims 100", tens(lambda ts: setattr(ts[0], "dims", [1] * 100)))
    case("dim 0", tens(lambda ts: setattr(ts[0], "dims", [fs.DIM, 0])))
    case("dims product overflow", tens(lambda ts: setattr(ts[0], "dims", [2**32, 2**32])))
    case("duplicate tensor name", tens(lambda ts: setattr(ts[1], "name", ts[0].name)))
    case("missing tensor", tens(lambda ts: [t for t in ts if t.name != "output_norm.weight"]))
    case("extra tensor", tens(lambda ts: ts.append(GTensor("blk.9.attn_q.weight", [fs.DIM, fs.DIM], 0,
                                                            b"\0" * (fs.DIM * fs.DIM * 4)))))  # fmt: skip
    case("NaN weights", tens(lambda ts: setattr(ts[3], "data", b"\x00\x00\xc0\x7f" * (len(ts[3].data) // 4))))
    case("version 1", lambda: fs.gguf_bytes(version=1))
    case("version 99", lambda: fs.gguf_bytes(version=99))
    case("wrong magic", lambda: fs.gguf_bytes(magic=b"GGUX"))
    case("no tensors (vocab only)", lambda: fs.gguf_bytes(tensors=[]))
    case("truncated half", lambda: (lambda d: d[: len(d) // 2])(fs.gguf_bytes()))
    case("truncated in header", lambda: fs.gguf_bytes()[:5000])
    case("empty", b"")



# ----------------------------------------------------------------------------- CLI
_HELD: list[socket.socket] = []


def build_cli(b: Builder) -> None:
    f = b.folder("cli", "train")
    data = f / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    blocker = f / "a-file"
    blocker.write_text("not a folder")
    train = ["train", "pretrain", "--data", str(data), "--tokenizer", str(fs.CHAT_TOKENIZER), "--dim", "32",
             "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "2", "--max-steps", "1",
             "--no-progress", "--device", "cpu"]  # fmt: skip
    b.add("cli", "--out-dir under a regular file", [*train, "--out-dir", str(blocker / "run")])
    b.add("cli", "--out-dir in /proc", [*train, "--out-dir", "/proc/llama2-fuzz/run"])
    b.add("cli", "generate --device mps", gen(Path("chat"), "--device", "mps"))
    b.add("cli", "generate --device cuda:7", gen(Path("chat"), "--device", "cuda:7"))
    b.add("cli", "generate --device bogus", gen(Path("chat"), "--device", "bogus"))
    b.add("cli", "generate --model missing", gen(f / "missing"))
    quantize = ["quantize", "--model", "chat", "--out", str(blocker / "q"), "--scheme", "int8", "--quiet"]
    b.add("cli", "quantize --out under a file", quantize)
    sock = socket.socket()  # held (listening) for the whole run: the port stays taken
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _HELD.append(sock)
    port = sock.getsockname()[1]
    b.add("cli", "serve port already in use",
          ["serve", "--model", "chat", "--port", str(port), "--log-level", "warning"])  # fmt: skip
    b.add("cli", "serve --device mps", ["serve", "--model", "chat", "--port", "0", "--device", "mps"])
    b.add("cli", "serve --api-key-file missing", ["serve", "--model", "chat", "--port", "0", "--api-key-file",
                                                  str(f / "no-keys")])  # fmt: skip


BUILDERS = {"meta": build_meta, "ours": build_ours, "hf": build_hf, "llama2c": build_llama2c,
            "gguf": build_gguf, "cli": build_cli}  # fmt: skip


CATEGORIES = ("meta-params", "meta-weights", "ours", "hf-config", "hf-safetensors", "hf-index", "llama2c",
              "gguf", "cli")  # fmt: skip


def build_all(root: Path) -> list[Case]:
    b = Builder(root)
    for build in BUILDERS.values():
        build(b)
    return b.cases


def main() -> int:
    p = fs.common_parser(__doc__)
    ns = p.parse_args()
    fs.MEM_LIMIT_MB = ns.mem_limit_mb
    root = ns.workdir or Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    for cat in CATEGORIES:  # stale cases of an earlier build (only our own sub-folders are removed)
        shutil.rmtree(root / cat, ignore_errors=True)
    print(f"building cases in {root}", file=sys.stderr)
    cases = fs.select(build_all(root), ns.only)
    if ns.list:
        for c in cases:
            print(f"{c.category}/{c.name}  [{c.expect}]")
        print(f"{len(cases)} cases")
        return 0
    src = ns.src.resolve() if ns.src is not None else None
    results = fs.run_all(cases, src, ns.timeout, ns.jobs, ns.quiet)
    info = {"src": str(src), "timeout_s": ns.timeout, "mem_limit_mb": ns.mem_limit_mb}
    t = fs.report(results, ns.json, info)["summary"]["total"]
    bad = sum(t[k] for k in ("tracebacks", "hangs", "crashes", "messy_errors", "controls_failed", "executed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
