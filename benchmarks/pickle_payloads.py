"""Pickle-payload campaign (issue 9): code-execution pickles hidden in every place the CLI unpickles.

Each payload, when unpickled, creates a marker file (nothing else); a case "executed" when its marker
exists after the run. Payloads:
  reduce-os-system   `__reduce__` -> os.system("touch MARKER")
  reduce-open        `__reduce__` -> builtins.open(MARKER, "w")
  stack-global-memo  STACK_GLOBAL whose module/name come from the memo (BINGET), while the last two
                     strings pushed spell `torch.FloatStorage` (fools a scanner that tracks pushes)
  torch-callable     a `torch.*` callable: torch.serialization.save({}, MARKER)
  decoy-first-pickle a torch zip whose first `*data.pkl` member is a harmless decoy; the real
                     `archive/data.pkl` carries reduce-os-system
Containers: a Meta `consolidated.00.pth` (torch zip and legacy raw pickle), HF `pytorch_model.bin`,
a training checkpoint `step_*.pt` resumed with `llama2 train pretrain --config CFG --resume`, a
training run whose `checkpoints/latest` points outside its folder, and `generate --model step_*.pt`.

    .venv/bin/python benchmarks/pickle_payloads.py --src /tmp/llama2-before/src \
        --json /tmp/fuzz-before/pickles.json
    .venv/bin/python benchmarks/pickle_payloads.py --src src --json /tmp/fuzz-after/pickles.json

Exits 1 when any payload ran (the goal: executed = 0), or a case hung or printed a traceback.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_support as fs
from fuzz_support import Case


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class _TorchSave:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        return (torch.serialization.save, ({}, str(self.marker)))


def _short_unicode(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def stack_global_memo(marker: Path) -> bytes:
    """os.system via memo: module/name memoized, then `torch`/`FloatStorage` pushed and popped."""
    ops = b"\x80\x04"  # PROTO 4
    ops += _short_unicode("os") + b"\x94" + _short_unicode("system") + b"\x94"  # MEMOIZE 0, 1
    ops += b"00"  # POP POP
    ops += _short_unicode("torch") + _short_unicode("FloatStorage") + b"00"
    ops += b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL -> os.system
    ops += _short_unicode(f"touch {marker}") + b"\x85R."  # TUPLE1 REDUCE STOP
    return ops


PAYLOADS = ("reduce-os-system", "reduce-open", "stack-global-memo", "torch-callable", "decoy-first-pickle")


def payload_pickle(kind: str, marker: Path) -> bytes:
    """A pickle whose unpickling creates `marker` (inside a dict, as a weights file would be)."""
    import torch

    if kind == "stack-global-memo":
        return stack_global_memo(marker)
    obj = {"reduce-open": _Open, "torch-callable": _TorchSave}.get(kind, _System)(marker)
    return pickle.dumps({"tok_embeddings.weight": torch.zeros(2), "evil": obj}, protocol=2)


def torch_zip(kind: str, marker: Path) -> bytes:
    """A real `torch.save` archive whose `archive/data.pkl` is replaced by the payload."""
    import torch

    buf = io.BytesIO()
    torch.save({"tok_embeddings.weight": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        if kind == "decoy-first-pickle":
            zf.writestr("archive/decoy/data.pkl", pickle.dumps({"tok_embeddings.weight": None}, protocol=2))
        for name in src.namelist():
            data = payload_pickle(kind, marker) if name.endswith("data.pkl") else src.read(name)
            zf.writestr(name, data)
    return out.getvalue()


TRAIN_TOML = """data = ["{data}"]
tokenizer = "{tok}"
dim = 32
n_layers = 1
n_heads = 2
seq_len = 16
batch_size = 2
max_steps = 2
warmup_steps = 0
val_fraction = 0.2
eval_every = 0
ckpt_every = 0
device = "cpu"
dtype = "float32"
progress = false
out_dir = "{out}"
"""


def build_cases(root: Path) -> list[Case]:
    cases: list[Case] = []
    text = root / "train-text"
    text.mkdir(exist_ok=True)
    for i in range(10):
        (text / f"doc{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog\n" * 60)
    n = 0
    for kind in PAYLOADS:
        for container in ("meta-zip", "meta-legacy", "hf-bin", "train-resume", "train-latest-outside",
                          "generate-on-train-ckpt"):  # fmt: skip
            if container == "meta-legacy" and kind == "decoy-first-pickle":
                continue  # the decoy needs a zip
            n += 1
            f = root / f"{n:02d}-{kind}-{container}"
            shutil.rmtree(f, ignore_errors=True)
            f.mkdir(parents=True)
            marker = root / "markers" / f"{n:02d}-{kind}-{container}"
            marker.parent.mkdir(exist_ok=True)
            blob = stack_or_zip(kind, container, marker)
            if container.startswith("meta"):
                fs.write_json(f / "params.json", fs.META_PARAMS)
                fs.copy_tokenizer(f)
                (f / "consolidated.00.pth").write_bytes(blob)
                argv = ["generate", "--model", str(f), "--max-new-tokens", "1", "--prompt", "x", "--quiet"]
            elif container == "hf-bin":
                fs.write_json(f / "config.json", fs.HF_CONFIG)
                fs.copy_tokenizer(f)
                (f / "pytorch_model.bin").write_bytes(blob)
                argv = ["generate", "--model", str(f), "--max-new-tokens", "1", "--prompt", "x", "--quiet"]
            else:
                run = f / "run"
                ck = run / "checkpoints"
                ck.mkdir(parents=True)
                evil = ck / "step_0000001.pt"
                if container == "train-latest-outside":
                    outside = f / "elsewhere" / "step_0000009.pt"
                    outside.parent.mkdir()
                    outside.write_bytes(blob)
                    (ck / "latest").write_text("../../elsewhere/step_0000009.pt\n")
                else:
                    evil.write_bytes(blob)
                    (ck / "latest").write_text(evil.name + "\n")
                cfg = f / "train.toml"
                cfg.write_text(TRAIN_TOML.format(data=text, tok=fs.CHAT_TOKENIZER, out=run))
                if container == "generate-on-train-ckpt":
                    argv = ["generate", "--model", str(evil), "--tokenizer", str(fs.CHAT_TOKENIZER),
                            "--max-new-tokens", "1", "--prompt", "x", "--quiet"]  # fmt: skip
                else:
                    argv = ["train", "pretrain", "--config", str(cfg), "--resume"]
            cases.append(Case(kind, container, argv, "error", markers=[marker], cwd=f))
    return cases


def stack_or_zip(kind: str, container: str, marker: Path) -> bytes:
    if container == "meta-legacy":
        return payload_pickle(kind, marker)  # a raw (pre-zip) torch pickle file
    return torch_zip(kind, marker)


def main() -> int:
    p = fs.common_parser(__doc__)
    ns = p.parse_args()
    fs.MEM_LIMIT_MB = ns.mem_limit_mb
    root = ns.workdir or Path(tempfile.mkdtemp(prefix="fuzz-pickles-"))
    root.mkdir(parents=True, exist_ok=True)
    cases = fs.select(build_cases(root), ns.only)
    if ns.list:
        for c in cases:
            print(f"{c.category}/{c.name}")
        print(f"{len(cases)} cases")
        return 0
    src = ns.src.resolve() if ns.src is not None else None
    results = fs.run_all(cases, src, ns.timeout, ns.jobs, ns.quiet)
    data = fs.report(results, ns.json, {"src": str(src)})
    t = data["summary"]["total"]
    print(f"\npayloads executed: {t['executed']} of {t['cases']} (goal: 0)")
    return 1 if t["executed"] or t["hangs"] or t["tracebacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
