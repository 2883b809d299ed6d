"""Peak resident memory of loading a 7B-shaped checkpoint with quantize-at-load (issue 4: nf4 < 5 GiB).

Two phases:

1. `--write` (once): a random 7B-shaped checkpoint in Meta's format (`params.json` +
   `consolidated.00.pth`, bfloat16, ~13.5 GB) under `--dir`. `torch.save` wants every tensor in
   memory, so the archive is written with `torch.serialization.skip_data()` over tensors whose
   storages are maps of *sparse* scratch files (nothing read, nothing resident); then each storage
   record is filled in place with N(0, 0.02) bfloat16 values generated in chunks, and the zip CRC-32
   of every record (local header and central directory) is patched, so the file is a valid
   `torch.save` archive that `torch.load` and `zipfile` accept. Peak RAM is one chunk.
2. measure (default): in a *fresh subprocess*, `load_model(dir, quantize=SCHEME)` while a thread
   samples `/proc/self/status`; prints peak resident memory (VmHWM, and the anonymous / file-backed
   split at the sampled peak), load time, and the 5 GiB target met or missed.

Run:
    python benchmarks/load_memory.py --write            # once; ~13.5 GB of disk
    python benchmarks/load_memory.py [--quantize nf4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "llama2-7b-random"
TARGET_GIB = 5.0
CHUNK = 1 << 25  # values generated at a time (32 Mi values: 128 MiB float32 + 64 MiB bfloat16)
# Meta's params.json for Llama 2 7B (vocab_size -1: read from the embedding's shape).
META_PARAMS = {
    "dim": 4096,
    "multiple_of": 256,
    "n_heads": 32,
    "n_layers": 32,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}


def _meta_shapes() -> dict[str, tuple[int, ...]]:
    """Meta's tensor names and shapes for the 7B preset, in Meta's order (plus `rope.freqs`)."""
    from llama2.config import PRESETS
    from llama2.model import Transformer

    args = PRESETS["7b"].replace(vocab_size=32000)
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["rope.freqs"] = (args.head_dim // 2,)
    return shapes


def _central_directory(f: Any, zf: zipfile.ZipFile) -> dict[str, int]:
    """File offset of each central-directory entry, by name."""
    out: dict[str, int] = {}
    pos = zf.start_dir
    for _ in zf.infolist():
        f.seek(pos)
        head = f.read(46)
        if head[:4] != b"PK\x01\x02":
            raise RuntimeError(f"bad central directory entry at {pos}")
        nlen, elen, clen = struct.unpack("<HHH", head[28:34])
        name = f.read(nlen).decode()
        out[name] = pos
        pos += 46 + nlen + elen + clen
    return out


def write_checkpoint(
    out_dir: Path,
    shapes: dict[str, tuple[int, ...]] | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a random Meta-format checkpoint (default: the 7B shape; see the module docstring).

    Returns:
        Its path, size in bytes, tensor count and timings.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pth = out_dir / "consolidated.00.pth"
    shapes = shapes if shapes is not None else _meta_shapes()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        state: dict[str, torch.Tensor] = {}
        for i, (name, shape) in enumerate(shapes.items()):
            numel = 1
            for s in shape:
                numel *= s
            f = Path(scratch) / f"{i}.bin"
            fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
            os.ftruncate(fd, numel * 2)  # sparse: no disk blocks, nothing resident
            os.close(fd)
            storage = torch.UntypedStorage.from_file(str(f), False, numel * 2)
            state[name] = torch.empty(0, dtype=torch.bfloat16).set_(storage, 0, shape)
        with torch.serialization.skip_data():
            torch.save(state, pth)
        del state
    t_skeleton = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(seed)
    keys = list(shapes)
    with zipfile.ZipFile(pth) as zf, pth.open("r+b") as f:
        # torch.save stores one record `<archive>/data/<key>` per storage, keyed in pickle order
        records = {info.filename: info for info in zf.infolist()}
        pkl = next(n for n in records if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        central = _central_directory(f, zf)
        for idx, name in enumerate(keys):
            rec = records[f"{prefix}data/{idx}"]
            f.seek(rec.header_offset)
            local = f.read(30)
            nlen, elen = struct.unpack("<HH", local[26:30])
            data_at = rec.header_offset + 30 + nlen + elen
            numel = rec.file_size // 2
            f.seek(data_at)
            crc = 0
            is_norm = name.endswith("norm.weight")
            for a in range(0, numel, CHUNK):
                n = min(CHUNK, numel - a)
                if is_norm:
                    chunk = torch.ones(n, dtype=torch.bfloat16)
                elif name == "rope.freqs":
                    chunk = (
                        1.0 / 10000.0 ** (torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n))
                    ).bfloat16()
                else:
                    chunk = (torch.randn(n, generator=gen) * 0.02).bfloat16()
                data = chunk.view(torch.int16).numpy().tobytes()
                crc = zlib.crc32(data, crc)
                f.write(data)
            f.seek(rec.header_offset + 14)
            f.write(struct.pack("<I", crc))
            f.seek(central[rec.filename] + 16)
            f.write(struct.pack("<I", crc))
    t_total = time.perf_counter() - t0
    (out_dir / "params.json").write_text(json.dumps(params or META_PARAMS) + "\n", encoding="utf-8")
    return {
        "path": str(out_dir),
        "bytes": pth.stat().st_size,
        "tensors": len(keys),
        "skeleton_s": round(t_skeleton, 2),
        "write_s": round(t_total, 1),
    }


# ================================================================================= measuring
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    """Polls /proc/self/status and keeps the sample with the largest RSS (and the largest RssAnon)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak: dict[str, int] = _status()
        self.peak_anon = self.peak.get("RssAnon", 0)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            s = _status()
            if s.get("VmRSS", 0) > self.peak.get("VmRSS", 0):
                self.peak = s
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _child(ckpt: Path, quantize: str | None) -> dict[str, Any]:
    """Runs in the fresh subprocess: load, then report memory and time."""
    import inspect

    from llama2.checkpoint.load import load_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    before = _status()
    kwargs: dict[str, Any] = {"progress": False}
    if quantize is not None:
        if "quantize" not in inspect.signature(load_model).parameters:
            return {"error": "load_model has no quantize= parameter yet (quantize-at-load not landed)"}
        kwargs["quantize"] = quantize
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    loaded = load_model(ckpt, **kwargs)
    load_s = time.perf_counter() - t0
    sampler.stop()
    after = _status()
    model_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    return {
        "quantize": quantize,
        "load_s": round(load_s, 1),
        "vm_hwm": after["VmHWM"],
        "rss_before": before["VmRSS"],
        "rss_after": after["VmRSS"],
        "rss_anon_after": after.get("RssAnon", 0),
        "rss_file_after": after.get("RssFile", 0),
        "peak_sample": sampler.peak,
        "peak_anon": sampler.peak_anon,
        "model_bytes": model_bytes,
    }


def measure(ckpt: Path, quantize: str | None) -> dict[str, Any]:
    """Load `ckpt` in a fresh interpreter and return its memory/time report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--dir", str(ckpt)]
    if quantize is not None:
        cmd += ["--quantize", quantize]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="checkpoint folder (default: %(default)s)"
    )
    parser.add_argument("--write", action="store_true", help="write the random 7B checkpoint (once)")
    parser.add_argument("--quantize", default="nf4", help="scheme passed to load_model; 'none' for float")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    quantize = None if ns.quantize in ("none", "") else ns.quantize
    if ns.child:
        print(json.dumps(_child(ns.dir, quantize)))
        return 0
    results: dict[str, Any] = {"target_gib": TARGET_GIB}
    if ns.write:
        w = write_checkpoint(ns.dir)
        results["write"] = w
        print(f"wrote {w['path']}: {w['tensors']} tensors, {w['bytes'] / 1e9:.2f} GB in {w['write_s']} s")
        if ns.json is not None:
            ns.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return 0
    if not (ns.dir / "consolidated.00.pth").is_file():
        print(f"no checkpoint in {ns.dir}; run with --write first", file=sys.stderr)
        return 2
    r = measure(ns.dir, quantize)
    results["load"] = r
    if "error" in r:
        print(f"load failed: {r['error']}", file=sys.stderr)
    else:
        peak = int(r["vm_hwm"])
        met = peak < TARGET_GIB * 2**30
        results["met"] = met
        rows = [
            ("scheme", str(quantize)),
            ("load time", f"{r['load_s']} s"),
            ("peak resident (VmHWM)", _gib(peak)),
            ("  at peak: anonymous", _gib(int(r["peak_sample"].get("RssAnon", 0)))),
            ("  at peak: file-backed (mmap)", _gib(int(r["peak_sample"].get("RssFile", 0)))),
            ("peak anonymous (sampled)", _gib(int(r["peak_anon"]))),
            ("resident after load", _gib(int(r["rss_after"]))),
            ("model tensors", _gib(int(r["model_bytes"]))),
            (
                f"target < {TARGET_GIB:g} GiB",
                "met" if met else f"MISSED by {_gib(peak - int(TARGET_GIB * 2**30))}",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if ns.json is not None:
        ns.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if "error" in r else 0


if __name__ == "__main__":
    raise SystemExit(main())
