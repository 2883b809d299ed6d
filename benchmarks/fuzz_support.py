"""Shared code of the fuzz / fault harness (`fuzz_checkpoints.py`, `pickle_payloads.py`,
`fuzz_requests.py`, `serve_faults.py`): running one CLI case in a fresh, bounded subprocess, and
writing tiny valid checkpoints of every format *without* the llama2 package (torch, safetensors,
sentencepiece and hand-written GGUF bytes only), so the same cases serve a "before" and an "after"
tree and do not depend on the code under test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHAT_TOKENIZER = REPO / "src" / "llama2" / "assets" / "models" / "chat" / "tokenizer.model"

# Tiny model shape shared by every format (vocabulary = the embedded chat tokenizer's 4096 pieces).
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB, MAX_SEQ = 64, 2, 4, 2, 192, 4096, 64
MULTIPLE_OF = 32  # Meta's rule: 32 * ceil(int(2 * 4 * 64 / 3) / 32) = 192 = HIDDEN
HEAD_DIM = DIM // N_HEADS


# ============================================================================ running cases
@dataclass
class Case:
    """One CLI invocation against a prepared input.

    argv: arguments after `python -m llama2`.
    expect: "error" (a clean one-line error is right), "ok" (exit 0 is right) or "any".
    markers: files whose appearance means a payload ran.
    """

    name: str
    category: str
    argv: list[str]
    expect: str = "error"
    markers: list[Path] = field(default_factory=list)
    cwd: Path | None = None
    timeout: float | None = None
    setup: Callable[[], Any] | None = None  # called right before the run; returns a closer or None
    note: str = ""


@dataclass
class Result:
    name: str
    category: str
    expect: str
    exit_code: int | None
    wall_s: float
    peak_rss_mb: float
    hang: bool
    traceback: bool
    one_line_error: bool
    executed: bool
    outcome: str  # ok / clean-error / traceback / messy-error / hang / crash / unexpected-ok / EXECUTED
    hit_mem_cap: bool
    stderr_tail: str
    note: str = ""


def child_env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LLAMA2_NO_KERNELS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


MEM_LIMIT_MB = 4096  # address-space cap of each case's process (the machine is shared; nothing may OOM it)


def _limit_memory() -> None:
    import resource

    cap = MEM_LIMIT_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_bounded(
    cmd: Sequence[str], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> tuple[int | None, float, float, str, str, bool]:
    """Run `cmd` in its own process group under an address-space cap (`MEM_LIMIT_MB`); returns (exit
    code or None, wall s, peak RSS MB of that child (os.wait4's per-child rusage), stdout, stderr,
    hung). A hung child's group is killed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=_limit_memory,
        )  # fmt: skip
        hung = False
        status, rusage = 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() - start > timeout:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
        with_group_killed(proc.pid)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    rss_mb = (rusage.ru_maxrss / 1024.0) if rusage is not None else float("nan")
    return (None if hung else proc.returncode), wall, rss_mb, stdout, stderr, hung


def with_group_killed(pgid: int) -> None:
    """Kill what the case left behind in its own process group (e.g. a server's workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def classify(case: Case, code: int | None, stderr: str, hung: bool, executed: bool) -> tuple[str, bool, bool]:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    tb = "Traceback (most recent call last)" in stderr
    one_line = code == 1 and len(lines) == 1 and lines[0].startswith("llama2: error:")
    if executed:
        outcome = "EXECUTED"
    elif hung:
        outcome = "hang"
    elif code is not None and code < 0:
        outcome = "crash"
    elif tb:
        outcome = "traceback"
    elif code == 0:
        outcome = "unexpected-ok" if case.expect == "error" else "ok"
    elif one_line:
        outcome = "clean-error" if case.expect != "ok" else "unexpected-error"
    else:
        outcome = "messy-error" if case.expect != "ok" else "unexpected-error"
    return outcome, tb, one_line


def run_case(case: Case, src: Path | None, timeout: float) -> Result:
    for m in case.markers:
        m.unlink(missing_ok=True)
    closer = case.setup() if case.setup is not None else None
    try:
        cmd = [sys.executable, "-m", "llama2", *case.argv]
        code, wall, rss, _out, err, hung = run_bounded(cmd, child_env(src), case.timeout or timeout, case.cwd)
    finally:
        if callable(closer):
            closer()
    executed = any(m.exists() for m in case.markers)
    outcome, tb, one_line = classify(case, code, err, hung, executed)
    tail = " | ".join(ln for ln in err.strip().splitlines()[-3:])[-400:]
    mem = any(s in err for s in ("MemoryError", "std::bad_alloc", "DefaultCPUAllocator: can't allocate",
                                 "Cannot allocate memory"))  # fmt: skip
    return Result(case.name, case.category, case.expect, code, round(wall, 2), round(rss, 1), hung, tb,
                  one_line, executed, outcome, mem, tail, case.note)  # fmt: skip


def run_all(
    cases: list[Case], src: Path | None, timeout: float, jobs: int, quiet: bool = False
) -> list[Result]:
    results: list[Result] = []
    done = 0

    def one(c: Case) -> Result:
        return run_case(c, src, timeout)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for r in pool.map(one, cases):
            results.append(r)
            done += 1
            if not quiet:
                print(f"[{done:>3}/{len(cases)}] {r.outcome:<16} {r.wall_s:>6.2f}s {r.peak_rss_mb:>7.1f}MB  "
                      f"{r.category}/{r.name}", file=sys.stderr, flush=True)  # fmt: skip
    return results


def summarize(results: list[Result]) -> dict[str, Any]:
    def block(rs: list[Result]) -> dict[str, Any]:
        errs = [r for r in rs if r.expect != "ok" and not r.hang]
        return {
            "cases": len(rs),
            "tracebacks": sum(r.traceback for r in rs),
            "hangs": sum(r.hang for r in rs),
            "crashes": sum(r.outcome == "crash" for r in rs),
            "executed": sum(r.executed for r in rs),
            "hit_mem_cap": sum(r.hit_mem_cap for r in rs),
            "clean_errors": sum(r.outcome == "clean-error" for r in rs),
            "messy_errors": sum(r.outcome == "messy-error" for r in rs),
            "unexpected_ok": sum(r.outcome == "unexpected-ok" for r in rs),
            "controls_failed": sum(r.outcome == "unexpected-error" for r in rs)
            + sum(r.expect == "ok" and r.outcome != "ok" for r in rs if r.outcome != "unexpected-error"),
            "max_time_to_error_s": max((r.wall_s for r in errs if r.exit_code not in (0, None)), default=0.0),
            "max_wall_s": max((r.wall_s for r in rs), default=0.0),
            "peak_rss_mb": max((r.peak_rss_mb for r in rs if not math.isnan(r.peak_rss_mb)), default=0.0),
        }

    cats = sorted({r.category for r in results})
    return {"per_category": {c: block([r for r in results if r.category == c]) for c in cats},
            "total": block(results)}  # fmt: skip


COLS = ("cases", "tracebacks", "hangs", "crashes", "executed", "hit_mem_cap", "clean_errors", "messy_errors",
        "unexpected_ok", "controls_failed", "max_time_to_error_s", "peak_rss_mb")  # fmt: skip
SHORT = ("cases", "tb", "hang", "crash", "exec", "mem-cap", "clean", "messy", "unexp-ok", "ctl-bad",
         "max-err-s", "rss-MB")  # fmt: skip


def table(summary: dict[str, Any]) -> str:
    head = f"{'category':<22}" + "".join(f"{s:>10}" for s in SHORT)
    rows = [head, "-" * len(head)]
    for name, b in [*summary["per_category"].items(), ("TOTAL", summary["total"])]:
        cells = "".join(f"{b[c]:>10.1f}" if isinstance(b[c], float) else f"{b[c]:>10}" for c in COLS)
        rows.append(f"{name:<22}" + cells)
    return "\n".join(rows)


def report(
    results: list[Result], json_path: Path | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    summary = summarize(results)
    print(table(summary))
    bad = [r for r in results if r.outcome not in ("ok", "clean-error")]
    if bad:
        print(f"\n{len(bad)} cases not ending in a clean one-line error (or, for controls, success):")
        for r in bad:
            print(f"  {r.outcome:<16} {r.category}/{r.name}: {r.stderr_tail[-160:]}")
    data = {"summary": summary, "results": [asdict(r) for r in results], **(extra or {})}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=1, default=str))
        print(f"\nwrote {json_path}")
    return data


def common_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None,
                   help="tree the children import (PYTHONPATH), e.g. /tmp/llama2-before/src")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="where cases are built (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    p.add_argument("--jobs", type=int, default=2, help="cases run in parallel")
    p.add_argument("--timeout", type=float, default=25.0, help="seconds per case before it counts as a hang")
    p.add_argument("--only", default=None, help="run only cases whose category/name contains this")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument("--mem-limit-mb", type=int, default=MEM_LIMIT_MB, help="address-space cap per case")
    return p


def select(cases: list[Case], only: str | None) -> list[Case]:
    return [c for c in cases if only is None or only in f"{c.category}/{c.name}"]


# ============================================================================ tiny weights
def meta_tensors(seed: int = 0, n_layers: int = N_LAYERS) -> dict[str, Any]:
    """Random float32 weights under Meta's names (the shapes a Llama 2 of the tiny shape has)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> Any:
        return torch.randn(*shape, generator=g) * 0.05

    kv = N_KV_HEADS * HEAD_DIM
    sd: dict[str, Any] = {"tok_embeddings.weight": rnd(VOCAB, DIM)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rnd(DIM, DIM)
        sd[p + "attention.wk.weight"] = rnd(kv, DIM)
        sd[p + "attention.wv.weight"] = rnd(kv, DIM)
        sd[p + "attention.wo.weight"] = rnd(DIM, DIM)
        sd[p + "feed_forward.w1.weight"] = rnd(HIDDEN, DIM)
        sd[p + "feed_forward.w2.weight"] = rnd(DIM, HIDDEN)
        sd[p + "feed_forward.w3.weight"] = rnd(HIDDEN, DIM)
        sd[p + "attention_norm.weight"] = torch.ones(DIM)
        sd[p + "ffn_norm.weight"] = torch.ones(DIM)
    sd["norm.weight"] = torch.ones(DIM)
    sd["output.weight"] = rnd(VOCAB, DIM)
    return sd


META_PARAMS: dict[str, Any] = {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
                               "multiple_of": MULTIPLE_OF, "norm_eps": 1e-5, "vocab_size": VOCAB,
                               "max_seq_len": MAX_SEQ}  # fmt: skip

HF_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
    "intermediate_size": HIDDEN, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": MAX_SEQ,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip

_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}  # fmt: skip
_GGUF_LAYER = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
               "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
               "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
               "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
               "ffn_norm.weight": "ffn_norm.weight"}  # fmt: skip


def hf_name(meta: str) -> str:
    if meta.startswith("layers."):
        _, i, rest = meta.split(".", 2)
        return f"model.layers.{i}.{_HF_LAYER[rest]}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[meta]  # fmt: skip


def gguf_name(meta: str) -> str:
    if meta.startswith("layers."):
        _, i, rest = meta.split(".", 2)
        return f"blk.{i}.{_GGUF_LAYER[rest]}"
    return {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}[meta]  # fmt: skip


def copy_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(CHAT_TOKENIZER.read_bytes())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, allow_nan=True))


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def write_meta(folder: Path, params: dict[str, Any] | None = None, sd: dict[str, Any] | None = None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "params.json", META_PARAMS if params is None else params)
    torch.save(meta_tensors() if sd is None else sd, folder / "consolidated.00.pth")
    copy_tokenizer(folder)
    return folder


def write_ours(folder: Path, params: dict[str, Any] | None = None, sd: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "params.json", {"format": "llama2", **META_PARAMS} if params is None else params)
    save_safetensors(folder / "model.safetensors", meta_tensors() if sd is None else sd, {"format": "llama2"})
    copy_tokenizer(folder)
    return folder


def write_hf(folder: Path, config: dict[str, Any] | None = None, bin_file: bool = False) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", HF_CONFIG if config is None else config)
    sd = {hf_name(k): v for k, v in meta_tensors().items()}
    if bin_file:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        save_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    copy_tokenizer(folder)
    return folder


ATTN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight")
FFN = ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")


def llama2c_bytes(header: Sequence[int] | None = None, version: int = 1, shared: int = 0,
                  magic: int = 0x616B3432) -> bytes:  # fmt: skip
    """A karpathy/llama2.c file (v1 header + float32 weights, or v0's 7 int32 + weights)."""
    import torch

    sd = meta_tensors()
    ints = [DIM, HIDDEN, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB, MAX_SEQ] if header is None else list(header)
    if version == 0 and not shared and ints[5] > 0:
        ints[5] = -ints[5]  # llama2.c v0 marks an unshared classifier with a negative vocab_size
    parts: list[bytes] = []
    if version == 0:
        parts.append(struct.pack("<7i", *ints))
    else:
        head = struct.pack("<Ii", magic, version) + struct.pack("<7i", *ints) + struct.pack("<B", shared)
        parts.append(head + b"\0" * (256 - len(head)))

    def f32(t: Any) -> bytes:
        return t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

    layers = [f"layers.{i}." for i in range(N_LAYERS)]
    if version == 0:
        parts.append(f32(sd["tok_embeddings.weight"]))
        for suffix in ("attention_norm.weight", *ATTN, "ffn_norm.weight", *FFN):
            parts += [f32(sd[p + suffix]) for p in layers]
        parts.append(f32(sd["norm.weight"]))
        parts.append(b"\0" * (4 * MAX_SEQ * HEAD_DIM))  # freq_cis_real + freq_cis_imag (MAX_SEQ x HD/2 each)
    else:
        parts += [f32(sd[p + "attention_norm.weight"]) for p in layers]
        parts += [f32(sd[p + "ffn_norm.weight"]) for p in layers]
        parts += [f32(sd["norm.weight"]), f32(sd["tok_embeddings.weight"])]
        for suffix in (*ATTN, *FFN):
            parts += [f32(sd[p + suffix]) for p in layers]
    if not shared:
        parts.append(f32(sd["output.weight"]))
    return b"".join(parts)


# ============================================================================ GGUF by hand
# GGUF value types (gguf spec): the writer below emits raw bytes so a case can lie about anything.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip


def gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return gguf_str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


def tokenizer_kvs() -> list[tuple[str, int, Any]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(CHAT_TOKENIZER))
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        t = 1
        if sp.is_unknown(i):
            t = 2
        elif sp.is_control(i):
            t = 3
        elif sp.is_byte(i):
            t = 6
        elif sp.is_unused(i):
            t = 5
        types.append(t)
    return [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, [sp.id_to_piece(i) for i in range(n)])),
        ("tokenizer.ggml.scores", ARR, (F32, [float(sp.get_score(i)) for i in range(n)])),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
    ]


_TOKENIZER_KVS: list[tuple[str, int, Any]] = []


def gguf_model_kvs() -> list[tuple[str, int, Any]]:
    if not _TOKENIZER_KVS:
        _TOKENIZER_KVS.extend(tokenizer_kvs())
    return [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "fuzz"),
        ("llama.context_length", U32, MAX_SEQ),
        ("llama.embedding_length", U32, DIM),
        ("llama.block_count", U32, N_LAYERS),
        ("llama.feed_forward_length", U32, HIDDEN),
        ("llama.rope.dimension_count", U32, HEAD_DIM),
        ("llama.attention.head_count", U32, N_HEADS),
        ("llama.attention.head_count_kv", U32, N_KV_HEADS),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("general.file_type", U32, 0),
        *_TOKENIZER_KVS,
    ]


@dataclass
class GTensor:
    name: str
    dims: list[int]  # GGUF order: innermost first (a torch (rows, cols) tensor is [cols, rows])
    gtype: int
    data: bytes
    offset: int | None = None  # None: next aligned offset


def gguf_tensors() -> list[GTensor]:
    import torch

    out = []
    for name, t in meta_tensors().items():
        data = t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        out.append(GTensor(gguf_name(name), list(reversed(t.shape)), 0, data))
    return out


def gguf_bytes(kvs: list[tuple[str, int, Any]] | None = None, tensors: list[GTensor] | None = None, *,
               version: int = 3, alignment: int = 32, n_tensors: int | None = None, n_kv: int | None = None,
               magic: bytes = b"GGUF", raw_kv: bytes | None = None) -> bytes:  # fmt: skip
    kvs = gguf_model_kvs() if kvs is None else kvs
    tensors = gguf_tensors() if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) + (raw_kv is not None) if n_kv is None else n_kv)  # fmt: skip
    body = b"".join(gguf_str(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in kvs)
    if raw_kv is not None:
        body += raw_kv
    infos, offsets, pos = b"", [], 0
    align = alignment if alignment > 0 else 32
    for t in tensors:
        off = pos if t.offset is None else t.offset
        offsets.append(off)
        if t.offset is None:  # an explicit (lying) offset does not grow the data section
            pos = off + len(t.data)
            pos += (-pos) % align
        dims = b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims)
        infos += gguf_str(t.name) + struct.pack("<I", len(t.dims)) + dims + struct.pack("<IQ", t.gtype, off)
    meta = head + body + infos
    meta += b"\0" * ((-len(meta)) % align)
    data = bytearray(pos)
    for t, off in zip(tensors, offsets, strict=True):
        if off + len(t.data) <= len(data):
            data[off:off + len(t.data)] = t.data
    return meta + bytes(data)


# ============================================================================ CLI server
@dataclass
class CliServer:
    proc: subprocess.Popen[str]
    url: str
    log: list[str]

    def stop(self, timeout: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM, wait; returns (exit code or None when it had to be killed, seconds to exit)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with_group_killed(self.proc.pid)
                self.proc.wait(10)
                return None, time.monotonic() - start
        with_group_killed(self.proc.pid)
        return self.proc.returncode, time.monotonic() - start


def start_cli_server(src: Path | None, args: Sequence[str], wait_s: float = 240.0) -> CliServer:
    """`python -m llama2 serve --port 0 ARGS` (loopback), started and answering /health."""
    import threading

    import httpx

    cmd = [sys.executable, "-m", "llama2", "serve", "--port", "0", "--host", "127.0.0.1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(src), start_new_session=True)  # fmt: skip
    log: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            if "listening on http://" in line and not found:
                found.append(line.split("listening on ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(wait_s) or not found:
        with_group_killed(proc.pid)
        raise RuntimeError("server did not start:\n" + "".join(log[-30:]))
    server = CliServer(proc, found[0], log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code in (200, 401):
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("server did not answer /health:\n" + "".join(log[-30:]))


def openai_shaped(status: int, body: bytes) -> bool:
    """A 4xx/5xx body in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    if status < 400:
        return True
    try:
        err = json.loads(body)["error"]
    except Exception:
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def pct(values: Sequence[float], q: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    return vals[min(len(vals) - 1, max(0, round(q / 100 * (len(vals) - 1))))]
