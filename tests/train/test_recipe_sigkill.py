"""SIGKILL-and-resume of the recipe's training commands, end to end through the CLI (slow tests).

Each test builds tiny inputs in `tmp_path` (a random 1-layer trunk with the embedded chat tokenizer,
tiny random reward models, hand-written preference pairs), then runs the real command
(`python -m llama2 train reward|ppo|dpo|rejection|gatt`, float32 on CPU, one thread, a checkpoint every
step) three times in subprocesses:

1. uninterrupted, to the end;
2. killed with SIGKILL (no handler, no cleanup) as soon as the first step checkpoint exists
   (`<run>/checkpoints/latest` appears), then
3. rerun with `--resume` in the killed run's folder.

Oracle: the uninterrupted run. Every tensor the two runs leave behind (each safetensors file of the
run folder outside `checkpoints/`, and the `model`, `models` and `optimizer` tensors of each final
training checkpoint) must be bit-identical (`torch.equal`), with the same names. The tests also check
that the kill really interrupted training (exit by SIGKILL, its latest checkpoint before the last
step) and that training moved the weights, so a command that ignored the kill point or never trained
would fail. Marked `slow` (excluded from CI): run with
`.venv/bin/python -m pytest -m slow tests/train/test_recipe_sigkill.py -q`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llama2.checkpoint.reward_io import save_reward_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.preferences import PreferencePair, write_pairs
from llama2.model import Transformer
from llama2.model.reward import RewardModel

pytestmark = pytest.mark.slow

TOKENIZER = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/tokenizer.model"
ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128)
TIMEOUT_S = 60.0  # per subprocess
# Flags every run shares: tiny, exact (float32 on CPU, one thread), a checkpoint after every step.
COMMON = [
    "--loop.device", "cpu", "--loop.dtype", "float32", "--loop.threads", "1", "--loop.ckpt-every", "1",
    "--no-loop.progress",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


# ------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random trunk and two random reward models (helpfulness, safety), saved as folders."""
    root = tmp_path_factory.mktemp("sigkill_models")
    torch.manual_seed(0)
    out = {"trunk": save_checkpoint(Transformer(ARGS), ARGS, root / "trunk", tokenizer_path=TOKENIZER)}
    for seed, objective in ((1, "helpfulness"), (2, "safety")):
        torch.manual_seed(seed)
        rm = RewardModel(Transformer(ARGS))
        torch.nn.init.normal_(rm.head.weight, std=1.0)
        out[objective] = save_reward_model(rm, root / objective, TOKENIZER, {"objective": objective})
    return out


RATINGS = ("significantly_better", "better", "slightly_better")


def _pairs(path: Path, n: int, kind: str = "helpfulness") -> Path:
    pairs = [
        PreferencePair(
            [{"role": "user", "content": f"Pick a colour for item {i}, please."}],
            f"Blue {i}.",
            "Red, I think, or maybe green." if i % 2 else "No.",
            RATINGS[i % len(RATINGS)],
            "chosen_safe_rejected_unsafe" if kind == "safety" and i % 2 else "both_safe",
            kind,
            "colour",
        )
        for i in range(n)
    ]
    return write_pairs(pairs, path)


# ------------------------------------------------------------------------------------------- runs
def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llama2", "train", *args, *COMMON]


def _run(args: list[str], log: Path) -> None:
    """Run a command to the end; fail with its log when it does not exit 0."""
    with log.open("w") as f:
        proc = subprocess.run(_cmd(args), stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(args[:1])} exited {proc.returncode}:\n{log.read_text()[-3000:]}"


def _run_killed(args: list[str], latest: Path, log: Path) -> None:
    """Start a command and SIGKILL it as soon as `latest` (its first step checkpoint) exists."""
    with log.open("w") as f:
        proc = subprocess.Popen(_cmd(args), stdout=f, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not latest.exists():
                if proc.poll() is not None:
                    pytest.fail(
                        f"exited ({proc.returncode}) before {latest} existed:\n{log.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"no {latest} within {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}): the run ended too soon"


def _latest_step(ckdir: Path) -> int:
    name = (ckdir / "latest").read_text().strip()  # step_NNNNNNN.pt
    return int(name.removeprefix("step_").removesuffix(".pt"))


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", out)


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every saved weight of a finished run: safetensors outside checkpoints/, and the model, models
    and optimizer tensors of each training checkpoint `latest` names (one per trainer run folder)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(run.rglob("*.safetensors")):
        rel = f.relative_to(run)
        if "checkpoints" not in rel.parts:
            out.update({f"{rel}:{k}": v for k, v in load_file(str(f)).items()})
    for latest in sorted(run.rglob("checkpoints/latest")):
        ckpt = torch.load(latest.parent / latest.read_text().strip(), map_location="cpu", weights_only=True)
        rel = latest.parent.relative_to(run)
        for key in ("model", "models", "optimizer"):
            _flatten(ckpt.get(key, {}), f"{rel}:{key}", out)
    return out


def _kill_resume_compare(
    args: list[str], tmp_path: Path, ckdir: str, max_steps: int
) -> dict[str, torch.Tensor]:
    """Run `args` straight and killed + resumed (`ckdir`: the checkpoint folder to watch, relative to
    the run folder); assert both leave bit-identical tensors; return the straight run's tensors."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _run([*args, "--loop.out-dir", str(straight)], tmp_path / "straight.log")
    _run_killed([*args, "--loop.out-dir", str(cut)], cut / ckdir / "latest", tmp_path / "killed.log")
    killed_at = _latest_step(cut / ckdir)
    assert 1 <= killed_at < max_steps, f"killed at step {killed_at}, expected before step {max_steps}"
    _run([*args, "--loop.out-dir", str(cut), "--resume"], tmp_path / "resumed.log")
    assert f"resumed from {cut / ckdir}" in (tmp_path / "resumed.log").read_text()
    assert _latest_step(cut / ckdir) == _latest_step(straight / ckdir) == max_steps
    a, b = _final_tensors(straight), _final_tensors(cut)
    assert a and sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after SIGKILL + resume, e.g. {differ[:5]}"
    return a


def _changed(start: Path, tensors: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """Whether any tensor of `start`'s model.safetensors differs from the run's `prefix:<name>`."""
    init = load_file(str(start / "model.safetensors"))
    return any(not torch.equal(init[k], tensors[f"{prefix}:{k}"]) for k in init)


# ------------------------------------------------------------------------------------------- tests
def test_reward_sigkill_resume_is_bit_identical(models: dict[str, Path], tmp_path: Path) -> None:
    data = _pairs(tmp_path / "pairs.jsonl", 24, kind="safety")
    val = _pairs(tmp_path / "val.jsonl", 6, kind="safety")
    args = [
        "reward", "--model", str(models["trunk"]), "--data", str(data), "--val-data", str(val),
        "--objective", "safety", "--loop.max-steps", "6", "--loop.warmup-steps", "1",
        "--loop.batch-size", "4", "--loop.lr", "2e-3", "--loop.eval-every", "0", "--loop.log-every", "1",
    ]  # fmt: skip
    tensors = _kill_resume_compare(args, tmp_path, "checkpoints", 6)
    assert "model/reward_head/head.safetensors:weight" in tensors  # the head is compared too
    assert _changed(models["trunk"], tensors, "model/model.safetensors")


def test_dpo_sigkill_resume_is_bit_identical(models: dict[str, Path], tmp_path: Path) -> None:
    data = _pairs(tmp_path / "pairs.jsonl", 10)
    args = [
        "dpo", "--model", str(models["trunk"]), "--data", str(data), "--loop.max-steps", "6",
        "--loop.warmup-steps", "0", "--loop.batch-size", "3", "--loop.lr", "1e-3", "--loop.eval-every", "0",
        "--loop.log-every", "1",
    ]  # fmt: skip
    tensors = _kill_resume_compare(args, tmp_path, "checkpoints", 6)
    assert _changed(models["trunk"], tensors, "model/model.safetensors")


def test_ppo_sigkill_resume_is_bit_identical(models: dict[str, Path], tmp_path: Path) -> None:
    # rollouts of 6 prompts in mini-batches of 2: steps 1-3 use the first rollout, so the kill after
    # step 1 lands mid-buffer and the resume must restore the rollout buffer exactly.
    args = [
        "ppo", "--model", str(models["trunk"]), "--reward-helpful", str(models["helpfulness"]),
        "--reward-safety", str(models["safety"]), "--n-prompts-per-task", "2", "--safety-fraction", "0.25",
        "--rollout-batch", "6", "--mini-batch", "2", "--max-new-tokens", "6", "--max-slots", "8",
        "--heldout-n-per-task", "1", "--patience", "0", "--loop.max-steps", "6", "--loop.eval-every", "2",
        "--loop.lr", "1e-3", "--loop.warmup-steps", "0", "--loop.min-lr-ratio", "1.0", "--loop.seed", "3",
        "--loop.log-every", "1",
    ]  # fmt: skip
    tensors = _kill_resume_compare(args, tmp_path, "checkpoints", 6)
    assert any(k.startswith("checkpoints:models/value/") for k in tensors)  # the value model too
    assert _changed(models["trunk"], tensors, "last/model.safetensors")


def test_rejection_sigkill_resume_is_bit_identical(models: dict[str, Path], tmp_path: Path) -> None:
    # killed during iteration 0's SFT: the resume reuses its samples, continues the SFT from its
    # checkpoint, then runs iteration 1 (sampling the resumed model, so any drift would show there too).
    args = [
        "rejection", "--model", str(models["trunk"]), "--reward-helpful", str(models["helpfulness"]),
        "--reward-safety", str(models["safety"]), "--n-per-task", "1", "--n-harmful", "1",
        "--n-benign", "1", "--k", "3", "--max-new-tokens", "4", "--iterations", "2",
        "--val-fraction", "0", "--loop.max-steps", "4", "--loop.batch-size", "4", "--loop.lr", "1e-3",
        "--loop.warmup-steps", "0", "--loop.eval-every", "0", "--loop.log-every", "1",
    ]  # fmt: skip
    tensors = _kill_resume_compare(args, tmp_path, "iter_0/sft/checkpoints", 4)
    assert any(k.startswith("iter_1/sft/checkpoints:model/") for k in tensors)
    assert _changed(models["trunk"], tensors, "model/model.safetensors")
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for name in ("iter_0/samples.jsonl", "iter_1/samples.jsonl", "iter_1/best.jsonl"):
        assert (straight / name).read_text() == (cut / name).read_text(), name


def test_gatt_sigkill_resume_is_bit_identical(models: dict[str, Path], tmp_path: Path) -> None:
    # killed during the SFT on the sampled dialogs: the resume reuses gatt_train.jsonl (the samples are
    # not drawn again) and continues the SFT from its checkpoint.
    args = [
        "gatt", "--model", str(models["trunk"]), "--n-dialogs", "4", "--max-turns", "2",
        "--max-new-tokens", "4", "--max-slots", "8", "--val-fraction", "0", "--loop.max-steps", "4",
        "--loop.batch-size", "2", "--loop.lr", "1e-3", "--loop.warmup-steps", "0", "--loop.eval-every", "0",
        "--loop.log-every", "1",
    ]  # fmt: skip
    tensors = _kill_resume_compare(args, tmp_path, "sft/checkpoints", 4)
    assert _changed(models["trunk"], tensors, "model/model.safetensors")
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert (straight / "gatt_train.jsonl").read_text() == (cut / "gatt_train.jsonl").read_text()
