"""llama.cpp's `llama-bench` on a random-weight GGUF of a preset shape: build, write, quantize, run, parse.

The peer of `llama2 bench`. Steps (each cached under `<repo>/.cache/`):

1. **Binaries.** `llama-bench` and `llama-quantize` from the llama.cpp vendored in the
   `llama-cpp-python` source distribution on PyPI. If
   `.cache/llamacpp/llama_cpp_python-<ver>/vendor/llama.cpp/build/bin/` has them they are used;
   otherwise `--build` runs, once (about 11 minutes on 2 cores)::

       pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cache/llamacpp
       tar xzf .cache/llamacpp/llama_cpp_python-0.3.36.tar.gz -C .cache/llamacpp
       cmake -S <src>/vendor/llama.cpp -B <src>/vendor/llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
           -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \\
           -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
       cmake --build <build> --target llama-bench llama-quantize llama-perplexity -j 2

2. **GGUF.** An F32 GGUF of the preset shape with random N(0, 0.02) weights (norms 1) and the real
   32000-piece Llama vocabulary (from `../shared/fixtures/llama2-tokenizer/ggml-vocab-llama-spm.gguf`),
   streamed tensor by tensor with `gguf.GGUFWriter` (TinyLlama-1.1B: 4.4 GB).
3. **Quantize** with `llama-quantize in.gguf out.gguf F16|Q8_0|Q4_0` (llama.cpp's default mix: for
   Q4_0 the output head becomes Q6_K, as in every Q4_0 file llama.cpp users download).
4. **Run** `llama-bench -m file -p 512 -n 128 -t 2 -r 3 -o json` and parse its JSON.

Run: `python benchmarks/llamacpp.py --shape 110m --types f32,q4_0 [--build] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_DIR = CACHE / "llamacpp"
SRC_DIR = LLAMACPP_DIR / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor" / "llama.cpp"
BUILD_DIR = SRC_DIR / "build"
BIN_DIR = BUILD_DIR / "bin"
GGUF_DIR = CACHE / "gguf-bench"
VOCAB_GGUF = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer" / "ggml-vocab-llama-spm.gguf"
TYPES = ("f32", "f16", "q8_0", "q4_0")
_QUANTIZE_NAMES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}
INIT_STD = 0.02


@dataclass
class LlamaBenchRow:
    """One `llama-bench` test (a pp or a tg run) from its JSON output.

    Attributes:
        model_filename: the GGUF file.
        model_type: llama.cpp's description, e.g. "llama 1B Q4_0".
        model_size: bytes of the tensors in the file.
        n_params: parameter count.
        n_threads: threads used.
        n_prompt: prompt tokens (pp test), 0 for a tg test.
        n_gen: generated tokens (tg test), 0 for a pp test.
        avg_ts: mean tokens/s over the repetitions.
        stddev_ts: its standard deviation.
        samples_ts: tokens/s of each repetition.
        raw: the whole JSON object.
    """

    model_filename: str
    model_type: str
    model_size: int
    n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    avg_ts: float
    stddev_ts: float
    samples_ts: list[float] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def test(self) -> str:
        """llama-bench's test name: `pp512`, `tg128` (or `pp512+tg128` for combined tests)."""
        if self.n_prompt and self.n_gen:
            return f"pp{self.n_prompt}+tg{self.n_gen}"
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"


def parse_llama_bench_json(text: str) -> list[LlamaBenchRow]:
    """Parse `llama-bench -o json` (a JSON array) or `-o jsonl` (one object a line) output.

    Raises:
        ValueError: the text is not llama-bench JSON (the message says what was missing).
    """
    text = text.strip()
    if not text:
        raise ValueError("llama-bench produced no output")
    objs: list[Any]
    if text.startswith("["):
        objs = json.loads(text)
    else:
        objs = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows: list[LlamaBenchRow] = []
    for obj in objs:
        if not isinstance(obj, dict):
            raise ValueError(f"llama-bench JSON entries must be objects, got {type(obj).__name__}")
        try:
            rows.append(
                LlamaBenchRow(
                    model_filename=str(obj["model_filename"]),
                    model_type=str(obj["model_type"]),
                    model_size=int(obj["model_size"]),
                    n_params=int(obj["model_n_params"]),
                    n_threads=int(obj["n_threads"]),
                    n_prompt=int(obj["n_prompt"]),
                    n_gen=int(obj["n_gen"]),
                    avg_ts=float(obj["avg_ts"]),
                    stddev_ts=float(obj["stddev_ts"]),
                    samples_ts=[float(x) for x in obj.get("samples_ts", [])],
                    raw=obj,
                )
            )
        except KeyError as err:
            raise ValueError(f"llama-bench JSON entry lacks field {err.args[0]!r}") from None
    return rows


# --------------------------------------------------------------------------------- binaries
def find_binary(name: str) -> Path | None:
    """`name` (llama-bench, llama-quantize, ...) from the cached build, $LLAMACPP_BIN, or PATH."""
    env = os.environ.get("LLAMACPP_BIN")
    for folder in ([Path(env)] if env else []) + [BIN_DIR]:
        cand = folder / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    return Path(found) if found else None


def build_llamacpp(jobs: int = 2, log: bool = True) -> None:
    """Download the llama-cpp-python sdist and build llama-bench/llama-quantize/llama-perplexity (~11 min)."""

    def sh(cmd: list[str]) -> None:
        if log:
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)

    LLAMACPP_DIR.mkdir(parents=True, exist_ok=True)
    tarball = LLAMACPP_DIR / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    if not tarball.is_file():
        pkg = f"llama-cpp-python=={LLAMACPP_VERSION}"
        sh(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                pkg,
                "-d",
                str(LLAMACPP_DIR),
            ]
        )
    if not (SRC_DIR / "CMakeLists.txt").is_file():
        sh(["tar", "xzf", str(tarball), "-C", str(LLAMACPP_DIR)])
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
    ]
    sh(["cmake", "-S", str(SRC_DIR), "-B", str(BUILD_DIR), *gen, *options])
    targets = ["llama-bench", "llama-quantize", "llama-perplexity"]
    sh(["cmake", "--build", str(BUILD_DIR), "--target", *targets, "-j", str(jobs)])


# --------------------------------------------------------------------------------- GGUF files
def _shape(name: str) -> Any:
    sys.path.insert(0, str(REPO / "src"))
    from llama2.config import PRESETS

    if name not in PRESETS:
        raise SystemExit(f"unknown shape {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def write_random_gguf(shape: str, path: Path, seed: int = 0, log: bool = True) -> Path:
    """Write an F32 llama GGUF of preset `shape` with random weights, streaming one tensor at a time."""
    import gguf

    from llama2.gguf_vocab import read_gguf_vocab

    args = _shape(shape)
    vocab = read_gguf_vocab(VOCAB_GGUF)
    if len(vocab.pieces) != args.vocab_size:
        raise SystemExit(f"vocabulary has {len(vocab.pieces)} pieces but {shape} needs {args.vocab_size}")
    d, h, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (args.vocab_size, d))]
    for i in range(args.n_layers):
        b = f"blk.{i}"
        tensors += [
            (f"{b}.attn_norm.weight", (d,)),
            (f"{b}.attn_q.weight", (d, d)),
            (f"{b}.attn_k.weight", (kv, d)),
            (f"{b}.attn_v.weight", (kv, d)),
            (f"{b}.attn_output.weight", (d, d)),
            (f"{b}.ffn_norm.weight", (d,)),
            (f"{b}.ffn_gate.weight", (h, d)),
            (f"{b}.ffn_up.weight", (h, d)),
            (f"{b}.ffn_down.weight", (d, h)),
        ]
    tensors += [("output_norm.weight", (d,)), ("output.weight", (args.vocab_size, d))]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random {shape}")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(d)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(h)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    for name, shp in tensors:
        w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for k, (name, shp) in enumerate(tensors):
        if name.endswith("norm.weight"):
            arr = np.ones(shp, dtype=np.float32)
        else:
            arr = rng.standard_normal(shp, dtype=np.float32)
            arr *= INIT_STD
        w.write_tensor_data(arr)
        if log and sys.stderr.isatty():
            print(f"\r  writing {path.name}: tensor {k + 1}/{len(tensors)}", end="", file=sys.stderr)
    w.close()
    tmp.replace(path)
    if log:
        print(f"\r  wrote {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return path


def gguf_file(shape: str, qtype: str, *, log: bool = True) -> Path:
    """The cached GGUF of `shape` in `qtype` (f32, f16, q8_0, q4_0, q4_k), writing/quantizing if needed."""
    f32 = GGUF_DIR / f"{shape}-f32.gguf"
    if not f32.is_file():
        _check_disk(shape, f32.parent)
        write_random_gguf(shape, f32, log=log)
    if qtype == "f32":
        return f32
    if qtype not in _QUANTIZE_NAMES:
        raise SystemExit(
            f"unknown llama.cpp type {qtype!r}; expected f32 or one of {', '.join(_QUANTIZE_NAMES)}"
        )
    out = GGUF_DIR / f"{shape}-{qtype}.gguf"
    if out.is_file():
        return out
    exe = find_binary("llama-quantize")
    if exe is None:
        raise SystemExit("llama-quantize not found; build it with `python benchmarks/llamacpp.py --build`")
    tmp = out.with_suffix(".part")
    cmd = [str(exe), str(f32), str(tmp), _QUANTIZE_NAMES[qtype], str(os.cpu_count() or 2)]
    if log:
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not log else None)
    tmp.replace(out)
    return out


def _check_disk(shape: str, folder: Path) -> None:
    need = _shape(shape).num_params() * 4 * 2  # the f32 file plus room for its quantized siblings
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(
            f"{folder} has {free / 1e9:.1f} GB free; the {shape} GGUF files need ~{need / 1e9:.1f} GB"
        )


def gguf_bytes_per_token(path: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes a decode step reads: all but token_embd, plus one row of it)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    total = 0
    per_token = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight":
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # gguf shapes are (ne0, ne1): ne1 = vocab
            per_token += n // max(rows, 1)
        else:
            per_token += n
    return total, per_token


# --------------------------------------------------------------------------------- running
def run_llama_bench(
    model: Path, *, pp: int = 512, tg: int = 128, threads: int = 2, reps: int = 3
) -> tuple[list[LlamaBenchRow], int]:
    """Run `llama-bench -m model -p pp -n tg -t threads -r reps -o json`.

    Returns:
        (the parsed rows, the peak resident memory of the llama-bench process in bytes).
    """
    exe = find_binary("llama-bench")
    if exe is None:
        raise SystemExit("llama-bench not found; build it with `python benchmarks/llamacpp.py --build`")
    cmd = [str(exe), "-m", str(model), "-p", str(pp), "-n", str(tg), "-t", str(threads)]
    cmd += ["-r", str(reps), "-o", "json"]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {stderr[-2000:]}")
    return parse_llama_bench_json(stdout), usage.ru_maxrss * 1024


@dataclass
class LlamaCppResult:
    """pp and tg of one GGUF type of one shape."""

    shape: str
    qtype: str
    file_bytes: int
    bytes_per_token: int
    pp: LlamaBenchRow | None
    tg: LlamaBenchRow | None
    peak_rss_bytes: int = 0

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        for k in ("pp", "tg"):
            if row[k] is not None:
                row[k].pop("raw", None)
        return row


def bench_llamacpp(
    shape: str, qtype: str, *, pp: int = 512, tg: int = 128, threads: int = 2, reps: int = 3
) -> LlamaCppResult:
    """Make (or reuse) the GGUF of `shape` in `qtype` and llama-bench it."""
    path = gguf_file(shape, qtype)
    total, per_token = gguf_bytes_per_token(path)
    rows, peak = run_llama_bench(path, pp=pp, tg=tg, threads=threads, reps=reps)
    pp_row = next((r for r in rows if r.n_prompt and not r.n_gen), None)
    tg_row = next((r for r in rows if r.n_gen and not r.n_prompt), None)
    return LlamaCppResult(shape, qtype, total, per_token, pp_row, tg_row, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--build", action="store_true", help="build llama.cpp if the binaries are missing")
    parser.add_argument("--shape", default="110m", help="preset shape: 110m or tinyllama-1.1b")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated: f32,f16,q8_0,q4_0")
    parser.add_argument("-p", type=int, default=512, help="prompt tokens")
    parser.add_argument("-n", type=int, default=128, help="generated tokens")
    parser.add_argument("-t", type=int, default=2, help="threads")
    parser.add_argument("-r", type=int, default=3, help="repetitions")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args()
    if find_binary("llama-bench") is None:
        if not a.build:
            raise SystemExit("llama-bench not found; pass --build to build llama.cpp (~11 min on 2 cores)")
        build_llamacpp()
    results = [
        bench_llamacpp(a.shape, q.strip(), pp=a.p, tg=a.n, threads=a.t, reps=a.r)
        for q in a.types.split(",")
        if q.strip()
    ]
    print("| shape | type | file MB | peak RSS MiB | pp t/s | tg t/s |\n|---|---|---|---|---|---|")
    for r in results:
        pp = f"{r.pp.avg_ts:.2f} ± {r.pp.stddev_ts:.2f}" if r.pp else "-"
        tg = f"{r.tg.avg_ts:.2f} ± {r.tg.stddev_ts:.2f}" if r.tg else "-"
        rss = r.peak_rss_bytes / 2**20
        print(f"| {r.shape} | {r.qtype} | {r.file_bytes / 1e6:.0f} | {rss:.0f} | {pp} | {tg} |")
    if a.json:
        a.json.write_text(json.dumps([r.to_row() for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
