"""Meta's own reference code loads what `export_meta` writes and generates what we generate.

Opt-in and slow: Meta's `llama` (Llama 2) and `codellama` repositories are not on PyPI and are not
vendored here. Point the environment at checkouts of them to run it:

    LLAMA2_META_REFERENCE=/path/to/facebookresearch/llama \\
    LLAMA2_CODELLAMA_REFERENCE=/path/to/facebookresearch/codellama \\
    LLAMA2_META_REFERENCE_PYTHONPATH=/path/with/fairscale \\
    pytest -m slow tests/checkpoint/test_meta_reference.py

Each repository's `llama/` package is copied to a temporary folder with text-only device substitutions
(NCCL -> gloo, CUDA tensors -> CPU float32), then run under `torchrun` with 1 and 2 model-parallel
ranks on a tiny random model exported at 1 and 2 shards with the real Llama 2 tokenizer. Greedy and
seeded sampled (temperature 0.8, top-p 0.9) tokens must equal `llama2.Llama.generate`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2 import Llama
from llama2.checkpoint import export_meta
from llama2.config import ModelArgs
from llama2.model import Transformer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
TOKENIZER = (FIXTURES / "tokenizer.model").resolve()
PROMPTS = ["The capital of France is", "Hello", "def fib(n):"]
MAX_GEN = 16

# Text-only substitutions that move Meta's code from CUDA/NCCL to CPU/gloo (numerics unchanged: float32).
SUBSTITUTIONS = {
    "generation.py": [
        ('init_process_group("nccl")', 'init_process_group("gloo")'),
        ("torch.cuda.set_device(local_rank)", "pass"),
        ("torch.set_default_tensor_type(torch.cuda.HalfTensor)", "torch.set_default_dtype(torch.float32)"),
        ("torch.set_default_tensor_type(torch.HalfTensor)", "torch.set_default_dtype(torch.float32)"),
        ('device="cuda"', 'device="cpu"'),
    ],
    "model.py": [(").cuda()", ")")],
}

RUNNER = """
import json, os, sys
sys.path.insert(0, {ref!r})
from llama import Llama
mode = sys.argv[2]
g = Llama.build(sys.argv[1], {tok!r}, max_seq_len=64, max_batch_size=4)
prompts = {prompts!r}
temp = 0.0 if mode == "greedy" else 0.8
out, _ = g.generate([g.tokenizer.encode(p, bos=True, eos=False) for p in prompts], max_gen_len={n},
                    temperature=temp, top_p=0.9)
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps(out))
"""


def _reference(env_var: str, tmp_path: Path) -> Path:
    root = os.environ.get(env_var)
    if not root:
        pytest.skip(f"set {env_var} to a checkout of Meta's repository to run this check")
    src = Path(root) / "llama"
    if not (src / "generation.py").is_file():
        pytest.fail(f"{env_var}={root}: no llama/generation.py there")
    dst = tmp_path / "ref"
    shutil.copytree(src, dst / "llama")
    for name, pairs in SUBSTITUTIONS.items():
        f = dst / "llama" / name
        text = f.read_text()
        for old, new in pairs:
            text = text.replace(old, new)
        f.write_text(text)
    return dst


def _model(rope_theta: float, ffn_dim_multiplier: float | None) -> tuple[Transformer, ModelArgs]:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=64,
        rope_theta=rope_theta, ffn_dim_multiplier=ffn_dim_multiplier,
    )  # fmt: skip
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model, args


def _ours(ckpt: Path, mode: str) -> list[list[int]]:
    g = Llama.build(ckpt, tokenizer_path=TOKENIZER, max_seq_len=64, max_batch_size=4, seed=1, dtype="float32")
    temp = 0.0 if mode == "greedy" else 0.8
    ids = [g.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    out, _ = g.generate(ids, max_gen_len=MAX_GEN, temperature=temp, top_p=0.9)
    return out


def _meta(ref: Path, ckpt: Path, shards: int, mode: str, tmp_path: Path) -> list[list[int]]:
    runner = tmp_path / "run_meta.py"
    runner.write_text(RUNNER.format(ref=str(ref), tok=str(TOKENIZER), prompts=PROMPTS, n=MAX_GEN))
    env = dict(os.environ)
    extra = os.environ.get("LLAMA2_META_REFERENCE_PYTHONPATH")
    if extra:
        env["PYTHONPATH"] = extra + os.pathsep + env.get("PYTHONPATH", "")
    with socket.socket() as sock:  # a free rendezvous port: other torchrun jobs may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(shards),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(runner)]  # fmt: skip
    proc = subprocess.run([*cmd, str(ckpt), mode], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result: list[list[int]] = json.loads(lines[0][len("RESULT ") :])
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env_var", "rope_theta", "ffn_dim_multiplier"),
    [("LLAMA2_META_REFERENCE", 10000.0, None), ("LLAMA2_CODELLAMA_REFERENCE", 1e6, 1.3)],
    ids=["llama", "codellama"],
)
def test_meta_reference_loads_export_and_generates_the_same(
    env_var: str, rope_theta: float, ffn_dim_multiplier: float | None, tmp_path: Path
) -> None:
    ref = _reference(env_var, tmp_path)
    model, args = _model(rope_theta, ffn_dim_multiplier)
    for shards in (1, 2):
        ckpt = export_meta(model, args, tmp_path / f"ckpt{shards}", n_shards=shards, tokenizer_path=TOKENIZER)
        for mode in ("greedy", "sample"):
            ours = _ours(ckpt, mode)
            assert _meta(ref, ckpt, shards, mode, tmp_path) == ours, (shards, mode)
            assert len(ours[0]) == MAX_GEN
