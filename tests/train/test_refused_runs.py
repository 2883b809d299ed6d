"""A refused run changes nothing in its run folder, and run-folder files are written atomically.

Each stage (pretrain, code, SFT) is run once, every file in its out-dir is hashed, then a run that must
be refused is started — `--resume` with a changed model shape (or LoRA rank), or a fresh run into the
folder without `--overwrite` — and every file must still hash the same, with no file added or removed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.instruct_suite import generate_items, write_jsonl
from llama2.errors import CheckpointError, ConfigError
from llama2.model import Transformer
from llama2.train.code import CodePretrainConfig, run_code_pretrain
from llama2.train.loop import LoopConfig, train
from llama2.train.lora import LoRAConfig
from llama2.train.metrics import MetricsLogger
from llama2.train.pretrain import PretrainConfig, run_pretrain
from llama2.train.sft import SFTConfig, run_sft
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "love", "night", "day"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (hashlib, not our code)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing the loss curve dominates these tiny runs; the PNG has its own test below."""
    monkeypatch.setattr(MetricsLogger, "plot", lambda self: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refused")
    rng = random.Random(0)
    texts = root / "texts"
    texts.mkdir()
    for i in range(4):
        lines = [" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(60)]
        (texts / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer(
        TokenizerTrainConfig(data=[str(texts)], out=root / "tokenizer.model", vocab_size=280)
    )
    code = root / "code"
    code.mkdir()
    for i in range(12):
        body = "".join(
            f"def f{i}_{j}(x, y):\n    total = x + {j} * y\n    return total - {i}\n\n\n" for j in range(8)
        )
        (code / f"mod{i}.py").write_text(body, encoding="utf-8")
    return {"texts": texts, "tokenizer": tok, "code": code}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Stage config keywords with the `LoopConfig` fields moved into `loop`."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    top = {k: v for k, v in flat.items() if k not in names}
    return {**top, "loop": LoopConfig(**{k: v for k, v in flat.items() if k in names})}


def _pretrain_cfg(corpus: dict[str, Path], out: Path, **kw: Any) -> PretrainConfig:
    base: dict[str, Any] = {
        "data": [str(corpus["texts"])], "val_fraction": 0.25, "tokenizer": corpus["tokenizer"],
        "dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16, "seq_len": 16, "batch_size": 2,
        "max_steps": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1, "ckpt_every": 0,
        "log_every": 1, "device": "cpu", "dtype": "float32", "progress": False, "out_dir": out,
    }  # fmt: skip
    base.update(kw)
    return PretrainConfig(**_nest(base))


def _code_cfg(corpus: dict[str, Path], out: Path, **kw: Any) -> CodePretrainConfig:
    base: dict[str, Any] = {
        "source_dir": corpus["code"], "heldout_fraction": 0.25, "vocab_size": 300, "max_chars": 200,
        "dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16, "hidden_dim": 64, "seq_len": 32,
        "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
        "ckpt_every": 0, "log_every": 1, "device": "cpu", "dtype": "float32", "progress": False,
        "save_dtype": "float32", "out_dir": out,
    }  # fmt: skip
    base.update(kw)
    return CodePretrainConfig(**_nest(base))


def _assert_one_line(e: pytest.ExceptionInfo[Exception]) -> None:
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ pretraining
def test_pretrain_resume_with_changed_shape_changes_no_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pretrain(_pretrain_cfg(corpus, out))
    before = tree_hashes(out)
    expected = {"config.toml", "params.json", "summary.json", "metrics.jsonl", "checkpoints/latest"}
    assert expected <= set(before)
    assert json.loads((out / "params.json").read_text())["dim"] == 32
    with pytest.raises(CheckpointError, match="saved with dim=32, this run has dim=64") as info:
        run_pretrain(_pretrain_cfg(corpus, out, resume=True, dim=64, max_steps=4))
    _assert_one_line(info)
    assert tree_hashes(out) == before
    assert json.loads((out / "params.json").read_text())["dim"] == 32


def test_pretrain_fresh_run_into_a_run_folder_changes_no_file(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_pretrain(_pretrain_cfg(corpus, out))
    before = tree_hashes(out)
    with pytest.raises(ConfigError, match="already holds a training run") as info:
        run_pretrain(_pretrain_cfg(corpus, out, dim=64, seed=7))
    _assert_one_line(info)
    assert tree_hashes(out) == before


def test_pretrain_resume_that_fits_rewrites_config_and_params(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_pretrain(_pretrain_cfg(corpus, out))
    (out / "params.json").write_text("{}")
    (out / "config.toml").write_text("")
    run_pretrain(_pretrain_cfg(corpus, out, resume=True, max_steps=3))
    assert json.loads((out / "params.json").read_text())["dim"] == 32
    assert tomllib.loads((out / "config.toml").read_text())["loop"]["max_steps"] == 3
    assert json.loads((out / "summary.json").read_text())["step"] == 3


# ------------------------------------------------------------------------------------------- code
def test_code_resume_with_changed_shape_changes_no_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "code"
    run_code_pretrain(_code_cfg(corpus, out))
    before = tree_hashes(out)
    assert {"config.toml", "params.json", "files.json", "tokenizer.model", "summary.json"} <= set(before)
    with pytest.raises(CheckpointError, match="saved with dim=32, this run has dim=64") as info:
        run_code_pretrain(_code_cfg(corpus, out, resume=True, dim=64, heldout_fraction=0.5))
    _assert_one_line(info)
    assert tree_hashes(out) == before

    with pytest.raises(ConfigError, match="already holds a training run") as info2:
        run_code_pretrain(_code_cfg(corpus, out, heldout_fraction=0.5))
    _assert_one_line(info2)
    assert tree_hashes(out) == before


# -------------------------------------------------------------------------------------------- SFT
@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("refused-sft")
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=64)
    tok = FIXTURES / "tokenizer.model"
    base = save_checkpoint(Transformer(args), args, root / "base", tokenizer_path=tok)
    data = write_jsonl(generate_items("train", n_per_task=1, seed=0, system_prob=0.5), root / "train.jsonl")
    return base, data


def _sft_cfg(
    base: Path, data: Path, out: Path, *, resume: bool = False, lora_rank: int = 4, max_steps: int = 2
) -> SFTConfig:
    loop = LoopConfig(
        out_dir=out, batch_size=2, max_steps=max_steps, lr=1e-3, warmup_steps=0, eval_every=0,
        eval_batches=1, ckpt_every=0, progress=False, device="cpu",
    )  # fmt: skip
    return SFTConfig(
        model=base, data=data, seq_len=64, val_fraction=0.2, resume=resume, lora=LoRAConfig(rank=lora_rank),
        loop=loop,
    )  # fmt: skip


def test_sft_resume_with_changed_lora_rank_changes_no_file(
    sft_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    base, data = sft_setup
    out = tmp_path / "sft"
    run_sft(_sft_cfg(base, data, out))
    before = tree_hashes(out)
    assert {"config.toml", "summary.json", "adapter/adapter.safetensors"} <= set(before)
    with pytest.raises(CheckpointError, match=r"lora_A of shape \(4, 16\), this run's model has \(8, 16\)"):
        run_sft(_sft_cfg(base, data, out, resume=True, lora_rank=8, max_steps=4))
    assert tree_hashes(out) == before
    with pytest.raises(ConfigError, match="already holds a training run"):
        run_sft(_sft_cfg(base, data, out, lora_rank=8))
    assert tree_hashes(out) == before


# --------------------------------------------------------------------------- the loop and metrics
class _Batches:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randint(0, 64, (2, 17), generator=g)
        self.pos = 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        self.pos += 1
        return self.w[:, :-1], self.w[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pos = int(state["pos"])


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _loop_cfg(out: Path, **kw: Any) -> LoopConfig:
    base: dict[str, Any] = {
        "lr": 1e-3, "warmup_steps": 0, "max_steps": 2, "eval_every": 0, "ckpt_every": 0, "log_every": 1,
        "out_dir": out, "progress": False, "device": "cpu",
    }  # fmt: skip
    base.update(kw)
    return LoopConfig(**base)


def _tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    )


def test_overwrite_run_refused_for_its_settings_keeps_the_old_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_tiny(), _loss, _Batches(), None, _loop_cfg(out))
    before = tree_hashes(out)
    frozen = _tiny().requires_grad_(False)
    started: list[Path] = []
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(frozen, _loss, _Batches(), None, _loop_cfg(out, overwrite=True), on_start=started.append)
    assert tree_hashes(out) == before and started == []


def test_on_start_runs_once_after_the_checks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[tuple[Path, bool]] = []
    train(_tiny(), _loss, _Batches(), None, _loop_cfg(out),
          on_start=lambda d: seen.append((d, (d / "checkpoints").exists())))  # fmt: skip
    assert seen == [(out, False)]  # before the first checkpoint is written


def test_metrics_reset_and_truncate_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "split": "train", "loss": 1.0 / step})
    original = log.path.read_bytes()

    real_replace = os.replace

    def no_space(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        log.reset()
    with pytest.raises(CheckpointError, match="No space left on device"):
        log.truncate_after(1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert log.path.read_bytes() == original  # the old log is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left

    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    log.reset()
    assert log.path.read_bytes() == b""


def test_loss_png_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.undo()  # the real plot()
    from matplotlib.figure import Figure

    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "split": "train", "loss": 2.0})
    log.log({"step": 2, "split": "train", "loss": 1.0})
    png = log.plot()
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = png.read_bytes()

    def half_written(self: Figure, fname: Any, *a: Any, **kw: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", half_written)
    log.log({"step": 3, "split": "train", "loss": 0.5})
    with pytest.raises(OSError):
        log.plot()
    assert png.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
