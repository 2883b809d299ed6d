"""Pretraining end to end on a tiny corpus: loss goes down, the saved model loads, and a run killed
with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llama2.checkpoint.load import load_model
from llama2.errors import ConfigError
from llama2.train.loop import LoopConfig, config_from_dict, config_to_dict
from llama2.train.pretrain import PretrainConfig, run_pretrain
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer

_TEXT = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have "
    "thou thee thy hath doth Romeo Juliet king queen lord lady love night day sweet fair"
)
WORDS = _TEXT.split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    rng = random.Random(2)
    data = root / "texts"
    data.mkdir()
    for i in range(10):
        # a repetitive "language": short lines built from a few patterns, easy to learn
        speakers = ["ROMEO", "JULIET", "KING"]
        lines = [
            f"{rng.choice(speakers)}: {' '.join(rng.choice(WORDS[:12]) for _ in range(4))} love."
            for _ in range(60)
        ]
        (data / f"play{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer(
        TokenizerTrainConfig(data=[str(data)], out=root / "tokenizer.model", vocab_size=300)
    )
    return {"root": root, "data": data, "tokenizer": tok}


def _cfg(setup: dict[str, Path], out: Path, **kw: Any) -> PretrainConfig:
    base: dict[str, Any] = {
        "data": [str(setup["data"])],
        "val_fraction": 0.2,
        "tokenizer": setup["tokenizer"],
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "multiple_of": 16,
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 40,
        "warmup_steps": 4,
        "lr": 1e-2,
        "eval_every": 20,
        "eval_batches": 4,
        "ckpt_every": 20,
        "log_every": 5,
        "device": "cpu",
        "dtype": "float32",
        "progress": False,
        "out_dir": out,
    }
    base.update(kw)
    loop = {k: base.pop(k) for k in [f.name for f in dataclasses.fields(LoopConfig)] if k in base}
    return PretrainConfig(**base, loop=LoopConfig(**loop))


def test_loss_goes_down_and_model_is_saved(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(setup, tmp_path / "run")
    res = run_pretrain(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in recs if r["split"] == "train"]
    val_losses = [r["loss"] for r in recs if r["split"] == "val"]
    assert train_losses[0] > 5.0  # about ln(300) at the start
    assert train_losses[-1] < train_losses[0] - 2.0
    assert len(val_losses) == 2 and val_losses[-1] < 4.0 and res.train.val_loss == val_losses[-1]
    assert res.train.tokens_seen == 40 * 4 * 32
    # the resolved config is saved and reproduces the run's config
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config_from_dict(PretrainConfig, saved) == cfg
    # the final model is in our format and loads with load_model
    loaded = load_model(res.model_dir, progress=False)
    assert loaded.format == "llama2" and loaded.args == res.args and loaded.tokenizer_path is not None
    x = torch.randint(0, 300, (1, 16))
    assert loaded.model(x).shape == (1, 16, 300)
    # the same data is reused on a second run (no re-tokenization)
    before = (tmp_path / "run" / "data" / "train.bin").stat().st_mtime_ns
    run_pretrain(_cfg(setup, tmp_path / "run", max_steps=2, eval_every=0, ckpt_every=0, overwrite=True))
    assert (tmp_path / "run" / "data" / "train.bin").stat().st_mtime_ns == before


_DRIVER = """
import json, sys, time
import torch
torch.set_num_threads(1)
import llama2.train.pretrain as pt
from llama2.train.loop import config_from_dict
real = pt.lm_loss
def slow_loss(model, batch):
    time.sleep(0.1)  # slow the run down so the test can kill it between checkpoints
    return real(model, batch)
pt.lm_loss = slow_loss
cfg = config_from_dict(pt.PretrainConfig, json.loads(open(sys.argv[1]).read()))
pt.run_pretrain(cfg)
"""


def test_sigkill_then_resume_is_bit_identical(setup: dict[str, Path], tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common: dict[str, Any] = {"max_steps": 24, "ckpt_every": 3, "eval_every": 6, "keep_checkpoints": 2}
        cfg = _cfg(setup, tmp_path / "killed", **common)
        cfg_file = tmp_path / "cfg.json"
        cfg_file.write_text(json.dumps(config_to_dict(cfg)))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(cfg_file)], env=env)
        latest = tmp_path / "killed" / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if latest.is_file() and latest.read_text().strip() >= "step_0000009.pt":
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be killed"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
        killed_at = int(latest.read_text().strip()[5:12])
        assert 9 <= killed_at < 24
        assert not (tmp_path / "killed" / "model").exists()

        resumed = run_pretrain(_cfg(setup, tmp_path / "killed", resume=True, **common))
        straight = run_pretrain(_cfg(setup, tmp_path / "straight", **common))
        assert resumed.train.step == straight.train.step == 24
        a = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
        b = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        # the metrics log was rewritten from the checkpoint on, without duplicated steps
        steps = [
            json.loads(line)["step"]
            for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 24
    finally:
        torch.set_num_threads(threads)


def test_bad_config(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no training data"):
        run_pretrain(_cfg(setup, tmp_path / "x", data=[]))
    with pytest.raises(ConfigError, match="save_dtype"):
        run_pretrain(_cfg(setup, tmp_path / "y", save_dtype="int8"))
    with pytest.raises(ConfigError, match="preset"):
        run_pretrain(_cfg(setup, tmp_path / "z", preset="3b"))
