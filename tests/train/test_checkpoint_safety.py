"""Training checkpoints never run code, never lose data, and every failure is one `Llama2Error` line.

Covers issue 9 items 1, 4 (parts) and 5 and issue 10's out-dir/shape cases: pickle payloads in
`step_*.pt`, a `latest` pointer leaving its folder, leftover temporary files, a full disk during a
save, incomplete or mismatched checkpoints, a fresh run into an existing run folder, an out-dir that
cannot be created, and devices this machine lacks.
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_support import ListBatches

from llama2 import cli
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError, Llama2Error, UnsafeCheckpointError
from llama2.model import Transformer
from llama2.runtime import resolve_device
from llama2.train import checkpointing
from llama2.train.loop import LoopConfig, latest_checkpoint, load_training_checkpoint, train
from llama2.train.metrics import MetricsLogger

TINY = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)


class Payload:
    """Unpickling this calls `open(marker, "w")`: the file appears iff the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (open, (str(self.marker), "w"))


class EvalPayload(Payload):
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss-curve PNG is irrelevant here and drawing it dominates these tiny runs."""
    monkeypatch.setattr(MetricsLogger, "plot", lambda self: None)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _data(n: int = 4, bsz: int = 2) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        w = torch.randint(0, 64, (bsz, 17), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _model(args: ModelArgs = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args)


def _cfg(out: Path, **kw: Any) -> LoopConfig:
    base: dict[str, Any] = {
        "lr": 3e-3, "warmup_steps": 1, "max_steps": 4, "eval_every": 0, "ckpt_every": 2, "log_every": 1,
        "out_dir": out, "progress": False, "device": "cpu", "keep_checkpoints": 5,
    }  # fmt: skip
    base.update(kw)
    return LoopConfig(**base)


def _run(out: Path, *, resume: bool = False, model: nn.Module | None = None, **kw: Any) -> nn.Module:
    m = model if model is not None else _model()
    train(m, lm_loss, ListBatches(_data()), None, _cfg(out, **kw), resume=resume)
    return m


def _ckdir(out: Path) -> Path:
    return out / "checkpoints"


# ------------------------------------------------------------------------- code in checkpoint files
@pytest.mark.parametrize("variant", ["payload-in-dict", "eval-payload", "legacy-torch-save", "raw-pickle"])
def test_pickle_payload_in_step_file_never_runs(tmp_path: Path, variant: str) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    marker = tmp_path / "pwned"
    evil = _ckdir(out) / "step_0000009.pt"
    good = load_training_checkpoint(_ckdir(out) / "step_0000002.pt")
    if variant == "payload-in-dict":  # a real checkpoint with one poisoned entry
        torch.save({**good, "step": 9, "extra": {"x": Payload(marker)}}, evil)
    elif variant == "eval-payload":
        torch.save(EvalPayload(marker), evil)
    elif variant == "legacy-torch-save":
        torch.save({**good, "extra": Payload(marker)}, evil, _use_new_zipfile_serialization=False)
    else:
        evil.write_bytes(pickle.dumps({"kind": "llama2-train-checkpoint", "x": Payload(marker)}))
    (_ckdir(out) / "latest").write_text("step_0000009.pt\n")

    with pytest.raises(CheckpointError) as info:
        _run(out, resume=True, max_steps=12)
    assert not marker.exists()
    assert "\n" not in str(info.value) and "step_0000009.pt" in str(info.value)
    if variant in ("payload-in-dict", "eval-payload"):
        assert isinstance(info.value, UnsafeCheckpointError)
        assert ("open" if variant == "payload-in-dict" else "eval") in str(info.value)
    with pytest.raises(CheckpointError):
        load_training_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_is_plain_data_read_with_weights_only(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    # an independent reader: torch's weights-only unpickler with nothing added to its allow-list
    state = torch.load(_ckdir(out) / "step_0000002.pt", weights_only=True)
    assert state["version"] == 2 and state["step"] == 2
    assert isinstance(state["rng"]["numpy"]["keys"], Tensor) and state["rng"]["numpy"]["keys"].shape == (624,)
    assert state["model_args"] == TINY.to_params_json()


def test_non_plain_extra_state_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\['stage'\]\['where'\] is a pathlib"):
        train(
            _model(), lm_loss, ListBatches(_data()), None, _cfg(tmp_path / "run", max_steps=2),
            extra_state=lambda: {"where": Path("x")},
        )  # fmt: skip
    assert not list(_ckdir(tmp_path / "run").glob("step_*"))


# ------------------------------------------------------------------------------ the latest pointer
@pytest.mark.parametrize(
    "kind", ["absolute", "dotdot", "subfolder", "symlink-out", "latest-symlink", "missing"]
)
def test_latest_must_name_a_file_in_its_folder(tmp_path: Path, kind: str) -> None:
    out, other = tmp_path / "run", tmp_path / "other"
    _run(out, max_steps=2)
    _run(other, max_steps=4)
    outside = _ckdir(other) / "step_0000004.pt"
    latest = _ckdir(out) / "latest"
    if kind == "absolute":
        latest.write_text(f"{outside}\n")
    elif kind == "dotdot":
        latest.write_text("../../other/checkpoints/step_0000004.pt\n")
    elif kind == "subfolder":
        (_ckdir(out) / "sub").mkdir()
        latest.write_text("sub/step_0000004.pt\n")
    elif kind == "symlink-out":
        (_ckdir(out) / "step_0000004.pt").symlink_to(outside)
        latest.write_text("step_0000004.pt\n")
    elif kind == "latest-symlink":
        latest.unlink()
        latest.symlink_to(_ckdir(other) / "latest")
    else:
        latest.write_text("step_0000008.pt\n")
    with pytest.raises(CheckpointError) as info:
        latest_checkpoint(out)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        _run(out, resume=True, max_steps=6)
    assert latest.is_symlink() or latest.read_text() != "step_0000006.pt\n"  # nothing was trained


# ---------------------------------------------------------------------- temp files and a full disk
def test_leftover_temp_files_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    ck = _ckdir(out)
    leftovers = [
        ck / ".step_0000004.pt.k3j2h1.tmp",  # atomic_write's name
        ck / ".step_0000004.pt.tmp4242",  # the older loop.py name
        ck / ".latest.a1b2c3.tmp",
        out / ".config.toml.x9y8.tmp",
        out / ".loss.png.tmp777.png",
    ]
    for p in leftovers:
        p.write_bytes(b"\0" * 4096)
    keep = [ck / "notes.txt", out / "config.toml.bak"]
    for p in keep:
        p.write_text("mine")
    _run(out, resume=True, max_steps=4)
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.read_text() == "mine" for p in keep)
    assert (ck / "latest").read_text() == "step_0000004.pt\n"


def _enospc_on_call(n_ok: int) -> Callable[..., None]:
    real = torch.save
    calls = [0]

    def fake_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        calls[0] += 1
        if calls[0] > n_ok:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *a, **kw)

    return fake_save


def test_full_disk_during_save_keeps_previous_checkpoint_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _enospc_on_call(1))  # step 2 is written, step 4 hits a full disk
    with pytest.raises(CheckpointError) as info:
        _run(out, max_steps=4, keep_checkpoints=1)
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "step_0000004.pt" in msg
    assert "step_0000002.pt is kept" in msg
    ck = _ckdir(out)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000002.pt"]  # no temp file left
    assert latest_checkpoint(out) == ck / "step_0000002.pt"
    assert load_training_checkpoint(ck / "step_0000002.pt")["step"] == 2

    resumed = _run(out, resume=True, max_steps=4)
    straight = _run(tmp_path / "straight", max_steps=4)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_full_disk_while_moving_latest_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real = checkpointing._write_text_synced

    def fake(text: str, tmp: Path) -> None:
        if text == "step_0000004.pt\n":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(text, tmp)

    monkeypatch.setattr(checkpointing, "_write_text_synced", fake)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _run(out, max_steps=4, keep_checkpoints=1)
    assert sorted(p.name for p in _ckdir(out).iterdir()) == ["latest", "step_0000002.pt"]
    assert (_ckdir(out) / "latest").read_text() == "step_0000002.pt\n"


def test_full_disk_while_logging_metrics_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: MetricsLogger, record: dict[str, Any]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsLogger, "log", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics\.jsonl: No space left on device"):
        _run(tmp_path / "run", max_steps=2)


# ------------------------------------------------------------------- incomplete or mismatched files
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s.pop("optimizer"), r"resume: checkpoint step_0000002\.pt lacks optimizer"),
        (lambda s: s.update(version=1), r"format version 1, this llama2 reads version 2"),
        (lambda s: s.update(kind="something-else"), r"not a llama2 training checkpoint"),
        (lambda s: s.update(step="2"), r"has step of type str; expected int"),
        (lambda s: s.update(data={}), r"step_0000002\.pt's data position does not fit this run"),
        (lambda s: s["rng"].pop("numpy"), r"malformed RNG state"),
    ],
)
def test_broken_checkpoint_is_one_line(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    path = _ckdir(out) / "step_0000002.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=expected) as info:
        _run(out, resume=True, max_steps=4)
    assert "\n" not in str(info.value)


def test_resume_with_changed_shape_names_the_difference(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    wider = _model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16))
    with pytest.raises(CheckpointError) as info:
        _run(out, resume=True, model=wider)
    assert str(info.value) == "resume: checkpoint step_0000002.pt was saved with dim=32, this run has dim=64"
    deeper = _model(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16))
    with pytest.raises(CheckpointError, match="saved with n_layers=1, this run has n_layers=2"):
        _run(out, resume=True, model=deeper)


def test_resume_with_changed_plain_module_or_trainable_set(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seq = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64))
    _run(out, max_steps=2, model=seq)
    other = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64))
    shapes = r"has 0\.weight of shape \(64, 8\), this run's model has \(64, 16\)"
    with pytest.raises(CheckpointError, match=shapes):
        _run(out, resume=True, model=other)
    frozen = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64))
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(CheckpointError, match=r"trains 3 parameter tensors .* this run trains 2"):
        _run(out, resume=True, model=frozen)


# -------------------------------------------------------------------------------- the run folder
def test_fresh_run_into_existing_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=8, keep_checkpoints=2)  # step_0000006.pt, step_0000008.pt
    before = {p.name: p.read_bytes() for p in _ckdir(out).iterdir()}
    with pytest.raises(ConfigError, match=r"already holds a training run .*--resume.*--overwrite") as info:
        _run(out, max_steps=4)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in _ckdir(out).iterdir()} == before  # untouched

    _run(out, max_steps=4, keep_checkpoints=1, overwrite=True)
    assert sorted(p.name for p in _ckdir(out).iterdir()) == ["latest", "step_0000004.pt"]
    assert latest_checkpoint(out) == _ckdir(out) / "step_0000004.pt"
    assert [r["step"] for r in MetricsLogger(out).read()] == [1, 2, 3, 4]
    # --resume now continues the new run (issue 10: it used to continue the old one)
    assert load_training_checkpoint(_ckdir(out) / "step_0000004.pt")["config"]["max_steps"] == 4


def test_pruning_never_touches_checkpoints_of_other_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(out, max_steps=2)
    foreign = _ckdir(out) / "step_0000009.pt"
    foreign.write_bytes((_ckdir(out) / "step_0000002.pt").read_bytes())
    (_ckdir(out) / "latest").write_text("step_0000002.pt\n")
    _run(out, resume=True, max_steps=6, keep_checkpoints=1)
    names = sorted(p.name for p in _ckdir(out).iterdir())
    assert names == ["latest", "step_0000006.pt", "step_0000009.pt"]
    assert (_ckdir(out) / "latest").read_text() == "step_0000006.pt\n"


def test_out_dir_that_cannot_be_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot create out_dir .*a-file/run: a file is in the way"):
        _run(blocker / "run")

    def denied(self: Path, *a: Any, **kw: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ConfigError, match=r"cannot create out_dir .*: Permission denied"):
        _run(tmp_path / "locked" / "run")


@pytest.mark.parametrize("name", ["mps", "nonsense", "meta", "cuda:{n}"])
def test_unavailable_device_is_one_line(tmp_path: Path, name: str) -> None:
    name = name.format(n=torch.cuda.device_count() + 7)
    with pytest.raises(ConfigError, match=f"device '{name}'") as info:
        _run(tmp_path / "run", device=name)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_train_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _cli(["train", "pretrain", "--out-dir", str(blocker / "run")], capsys)
    assert code == 1 and err.startswith("llama2: error: cannot create out_dir") and err.count("\n") == 1

    # a device this machine lacks fails before anything is created or read
    code, err = _cli(["train", "pretrain", "--device", "mps", "--out-dir", str(tmp_path / "new")], capsys)
    assert code == 1 and "device 'mps' is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()

    out = tmp_path / "run"
    _run(out, max_steps=2)
    code, err = _cli(["train", "pretrain", "--out-dir", str(out)], capsys)
    assert code == 1 and "already holds a training run" in err and err.count("\n") == 1
    assert sorted(p.name for p in _ckdir(out).iterdir()) == ["latest", "step_0000002.pt"]
    # the flag exists and gets past the check (then fails on the missing tokenizer, as a Llama2Error)
    argv = ["train", "pretrain", "--out-dir", str(out), "--overwrite", "--data", "nope.txt"]
    code, err = _cli(argv, capsys)
    assert code == 1 and "already holds" not in err and err.count("\n") == 1


def test_errors_are_llama2_errors() -> None:
    assert issubclass(CheckpointError, Llama2Error) and issubclass(ConfigError, Llama2Error)
