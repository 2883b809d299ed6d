"""Training checkpoints that hold only tensors and plain data, and the run folder that keeps them.

Layout of a run folder (`LoopConfig.out_dir`)::

    checkpoints/step_0000100.pt   one per save: a `torch.save` archive of tensors and plain data
    checkpoints/latest            one line naming the newest complete checkpoint (a file name only)
    metrics.jsonl, loss.png, config.toml, ...

Safety rules (each one answers a way a run lost data or ran code):
  - Checkpoints are read with `torch.load(weights_only=True)` after a scan of the pickle's globals
    (`llama2.checkpoint.pickles`), so a crafted `step_*.pt` is refused before anything in it runs.
    Everything saved is plain: numpy's RNG state is converted to a tensor, configs to dicts of
    str/int/float/bool/list; `check_plain` refuses anything else at save time.
  - `latest` may only name `step_NNNNNNN.pt` inside its own folder (no paths, no `..`, no symlink
    leaving the folder), and never a file that does not exist.
  - A save writes a temporary file, fsyncs and renames it; only then is `latest` moved, and only
    then are older checkpoints *of this run* pruned. A failed save (a full disk) removes its
    temporary file, raises `CheckpointError` and leaves the previous checkpoint and `latest` usable.
  - Temporary files left by a killed save are removed when a run starts.
  - A fresh run refuses a folder that already holds a run unless told to overwrite it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llama2.checkpoint.formats import FileKind, sniff
from llama2.checkpoint.pickles import scan_torch_file
from llama2.checkpoint.save import atomic_write
from llama2.errors import CheckpointError, ConfigError, UnsafeCheckpointError

CHECKPOINT_KIND = "llama2-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: plain data only (version 1 pickled numpy's RNG state as an ndarray)
LATEST = "latest"
METRICS = "metrics.jsonl"
REQUIRED_KEYS = (
    "kind", "version", "step", "tokens_seen", "model", "optimizer", "scheduler", "data", "rng", "config",
)  # fmt: skip
_STEP_RE = re.compile(r"step_(\d{7})\.pt")
# Temporary files of interrupted writes: `atomic_write`'s `.<name>.<random>.tmp` and the older
# `.<name>.tmp<pid>` (checkpoints, `latest`, config.toml) and `.loss.png.tmp<pid>.png`.
_CKDIR_TEMP_GLOBS = (".step_*.pt.*", f".{LATEST}.*")
_RUN_FILES = ("config.toml", "loss.png", METRICS, "params.json", "summary.json", "files.json")
_RUN_TEMP_GLOBS = tuple(f".{name}.*tmp*" for name in _RUN_FILES)
_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.Size)


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


# ------------------------------------------------------------------------------------- run folder
def prepare_run_dir(out_dir: Path | str, *, resume: bool, overwrite: bool) -> Path:
    """Create `out_dir` (one-line `ConfigError` when that is impossible) and, for a fresh run
    (`resume` false), refuse a folder that already holds a run's checkpoints or metrics unless
    `overwrite`. Returns the folder. Stages call it before any expensive work; `train` again."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, FileExistsError | NotADirectoryError) else e.strerror
        raise ConfigError(
            f"cannot create out_dir {out}: {reason or e}; expected a folder that can be created and written"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out} is not writable; expected a folder this user can write into")
    if not resume and not overwrite:
        found = previous_run_files(out)
        if found:
            names = ", ".join(str(p.relative_to(out)) for p in found[:3])
            names += ", ..." if len(found) > 3 else ""
            raise ConfigError(
                f"out_dir {out} already holds a training run ({names}); pass --resume to continue it, "
                "--overwrite to replace it with a new run, or choose another --out-dir"
            )
    return out


def previous_run_files(out_dir: Path) -> list[Path]:
    """The checkpoints, `latest` pointer and non-empty metrics log of a run already in `out_dir`."""
    ckdir = checkpoint_dir(out_dir)
    found: list[Path] = []
    if ckdir.is_dir():
        found = sorted(p for p in ckdir.iterdir() if _STEP_RE.fullmatch(p.name) or p.name == LATEST)
    metrics = Path(out_dir) / METRICS
    with contextlib.suppress(OSError):
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append(metrics)
    return found


def clear_previous_run(out_dir: Path) -> int:
    """Delete the checkpoints and `latest` of an earlier run in `out_dir` (`--overwrite`); the files
    themselves, never a symlink's target. Returns how many were removed."""
    removed = 0
    for p in previous_run_files(out_dir):
        if p.name == METRICS:
            continue  # truncated by the metrics logger of the new run
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CheckpointError(f"cannot remove {p} of the previous run: {e.strerror or e}") from None
    return removed


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Remove temporary files that interrupted saves left in `out_dir` and its checkpoints folder."""
    out = Path(out_dir)
    candidates = [p for g in _RUN_TEMP_GLOBS for p in out.glob(g)]
    ckdir = checkpoint_dir(out)
    if ckdir.is_dir():
        candidates += [p for g in _CKDIR_TEMP_GLOBS for p in ckdir.glob(g)]
    removed = []
    for p in sorted(set(candidates)):
        if p.is_symlink() or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `<out_dir>/checkpoints/latest` names (without a `latest`: the newest
    `step_*.pt`), or None when there is none.

    Raises:
        CheckpointError: `latest` is not a plain file name `step_NNNNNNN.pt`, names a missing file,
            or the checkpoint is a symlink to somewhere outside the checkpoints folder.
    """
    ckdir = checkpoint_dir(out_dir)
    pointer = ckdir / LATEST
    if pointer.is_symlink():
        raise CheckpointError(
            f"{pointer} is a symbolic link; expected a plain file naming a step_NNNNNNN.pt in {ckdir}"
        )
    if pointer.exists():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {pointer} ({e}); expected one line step_NNNNNNN.pt") from None
        if not _STEP_RE.fullmatch(name):
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise CheckpointError(
                f"{pointer} names {shown!r}; expected a plain file name step_NNNNNNN.pt inside {ckdir} "
                "(no absolute path, no folders, no '..')"
            )
        path = ckdir / name
        if not path.is_file():
            raise CheckpointError(
                f"{pointer} names {name}, which does not exist in {ckdir}; expected the newest checkpoint "
                "(pass --overwrite to start a new run instead)"
            )
    else:
        found = [p for p in ckdir.glob("step_*.pt") if _STEP_RE.fullmatch(p.name)] if ckdir.is_dir() else []
        if not found:
            return None
        path = max(found, key=lambda p: p.name)
    _check_inside(path, ckdir)
    return path


def _check_inside(path: Path, ckdir: Path) -> None:
    if path.is_symlink() and path.resolve().parent != ckdir.resolve():
        raise CheckpointError(
            f"{path} is a symbolic link to {path.resolve()}, outside {ckdir}; expected the checkpoint itself"
        )


# ----------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy and torch as plain data (tuples, ints, floats, tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (3, tuple of 625 ints, None)
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()` output; `CheckpointError` when it is malformed."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
        npst = state["numpy"]
        keys = np.asarray(npst["keys"].numpy(), dtype=np.uint32)
        pos, has_gauss, cached = int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])
        np.random.set_state((str(npst["name"]), keys, pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"malformed RNG state in the checkpoint ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------ writing
def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would not read back (or that could run code):
    only dicts/lists/tuples of tensors, str, int, float, bool, None, dtypes and sizes."""
    if type(obj) in (Tensor, nn.Parameter) or (isinstance(obj, _PLAIN_LEAVES) and type(obj) in _PLAIN_LEAVES):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"{where} has a {type(k).__name__} key {k!r}; expected str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; training checkpoints hold only "
        "tensors and plain data (str, int, float, bool, None, lists, tuples, dicts)"
    )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_synced(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_synced(text: str, tmp: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename); `CheckpointError` on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _write_text_synced(text, tmp))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def _describe_oserror(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "No space left on device"
    return e.strerror or str(e)


class CheckpointSaver:
    """Writes `step_NNNNNNN.pt` checkpoints of one run and keeps the newest `keep` of them.

    Pruning only touches checkpoints this run wrote (plus the one it resumed from), and only after
    the new checkpoint and `latest` are on disk.
    """

    def __init__(self, out_dir: Path, keep: int, resumed_from: Path | None = None) -> None:
        self.ckdir = checkpoint_dir(out_dir)
        self.keep = keep
        self.written: list[Path] = [resumed_from] if resumed_from is not None else []

    def _current_latest(self) -> str:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return (self.ckdir / LATEST).read_text(encoding="utf-8").strip()
        return ""

    def save(self, step: int, payload: Mapping[str, Any]) -> Path:
        """Write `payload` as the checkpoint of `step`, point `latest` at it, prune older ones.

        Raises:
            CheckpointError: the payload holds non-plain objects, or the disk refused the write (the
                previous checkpoint and `latest` are left as they were).
        """
        check_plain(dict(payload))
        path = self.ckdir / checkpoint_name(step)
        previous = self._current_latest()
        kept = f"; {previous} is kept as the latest checkpoint" if previous else ""
        try:
            self.ckdir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: _save_synced(payload, tmp))
        except OSError as e:
            remove_stale_temp_files(self.ckdir.parent)
            raise CheckpointError(f"cannot write checkpoint {path}: {_describe_oserror(e)}{kept}") from None
        try:
            atomic_write(self.ckdir / LATEST, lambda tmp: _write_text_synced(path.name + "\n", tmp))
        except OSError as e:
            if previous != path.name:
                path.unlink(missing_ok=True)  # unreferenced; free its space
            remove_stale_temp_files(self.ckdir.parent)
            raise CheckpointError(
                f"cannot update {self.ckdir / LATEST} to {path.name}: {_describe_oserror(e)}{kept}"
            ) from None
        _fsync_dir(self.ckdir)
        self.written = [p for p in self.written if p != path] + [path]
        for old in self.written[: -self.keep]:
            with contextlib.suppress(OSError):
                old.unlink(missing_ok=True)
        self.written = self.written[-self.keep :]
        return path


# ------------------------------------------------------------------------------------ reading
def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check one of our training checkpoints without running any code from it.

    Raises:
        UnsafeCheckpointError: the file's pickle references anything but tensors and plain data.
        CheckpointError: unreadable, not a training checkpoint, another format version, missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such training checkpoint file")
    try:
        kind = sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read training checkpoint ({e.strerror or e})") from None
    if kind is not FileKind.TORCH_ZIP:
        raise CheckpointError(
            f"{path}: not a training checkpoint (it looks like {kind}); expected torch.save output"
        )
    hint = (
        "; training checkpoints hold only tensors and plain data (ones written before checkpoint format "
        f"{CHECKPOINT_VERSION} held numpy objects and cannot be resumed safely)"
    )
    try:
        scan_torch_file(path, kind)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{e}{hint}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if "nsupported" in line)[:300]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data, which could run "
            f"code when unpickled ({reason or type(e).__name__}){hint}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: truncated or corrupt training checkpoint ({msg})") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: not a llama2 training checkpoint (expected one written by train())")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: training checkpoint format version {state.get('version')!r}, this llama2 reads "
            f"version {CHECKPOINT_VERSION}; resume with the llama2 that wrote it, or start over with "
            "--overwrite"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"resume: checkpoint {path.name} lacks {', '.join(missing)}; expected a complete checkpoint "
            "written by llama2 train"
        )
    for key, want in (("step", int), ("tokens_seen", int), ("model", dict), ("optimizer", dict),
                      ("scheduler", dict), ("data", dict), ("rng", dict), ("config", dict)):  # fmt: skip
        if not isinstance(state[key], want) or isinstance(state[key], bool):
            raise CheckpointError(
                f"resume: checkpoint {path.name} has {key} of type {type(state[key]).__name__}; "
                f"expected {want.__name__}"
            )
    bad = [k for k, v in state["model"].items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"resume: checkpoint {path.name} has a non-tensor model entry {bad[0]!r}")
    return state
