"""Safe reading of PyTorch weight files: refuse any pickle that references more than tensors.

A file's pickle opcodes are scanned (nothing is executed) for globals outside `torch.*` and
`collections.OrderedDict` before `torch.load(weights_only=True, mmap=True)` reads it; torch's
weights-only unpickler is the second guard.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from llama2.checkpoint.formats import FileKind, sniff
from llama2.errors import CheckpointError, UnsafeCheckpointError

# Globals a plain tensor pickle may reference (torch's weights_only unpickler is the final guard).
_SAFE_GLOBAL_MODULES = ("torch", "collections")


def _pickle_globals(stream: IO[bytes], max_pickles: int = 5) -> list[str]:
    """Globals referenced by the (up to `max_pickles` consecutive) pickles in `stream`.

    Only reads opcodes (nothing is executed). STACK_GLOBAL's operands are taken from the two most
    recent string pushes, which is how every pickler emits them.
    """
    found: list[str] = []
    for _ in range(max_pickles):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
            break
        if stream.read(1) == b"":  # end of data
            break
        stream.seek(-1, io.SEEK_CUR)
    return found


def _unsafe_globals(names: list[str]) -> list[str]:
    allowed_collections = {"collections.OrderedDict"}
    return [
        name
        for name in names
        if name.split(".", 1)[0] not in _SAFE_GLOBAL_MODULES
        or (name.startswith("collections.") and name not in allowed_collections)
    ]


def _scan_torch_file(file: Path, kind: FileKind) -> None:
    """Refuse a PyTorch file whose pickle references anything but torch/OrderedDict (before loading)."""
    if kind is FileKind.TORCH_ZIP:
        try:
            with zipfile.ZipFile(file) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not pkl:
                    raise CheckpointError(
                        f"{file}: PyTorch archive without data.pkl; expected torch.save output"
                    )
                names = _pickle_globals(io.BytesIO(zf.read(pkl[0])))
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(
                f"{file}: truncated or corrupt PyTorch archive ({e}); cannot read any tensor"
            ) from None
    else:
        with file.open("rb") as f:
            names = _pickle_globals(f)
    bad = _unsafe_globals(names)
    if bad:
        raise UnsafeCheckpointError(
            f"{file}: refused to load: the pickle references {', '.join(sorted(set(bad)))}, which a weights "
            "file never needs (it could run code); expected only tensors"
        )


def torch_load(file: Path) -> dict[str, Tensor]:
    """Memory-map a PyTorch weights file safely and return its flat name -> tensor dict."""
    kind = sniff(file)
    if kind not in (FileKind.TORCH_ZIP, FileKind.PICKLE):
        raise CheckpointError(
            f"{file}: not a PyTorch file (it looks like {kind}); expected torch.save output"
        )
    _scan_torch_file(file, kind)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=kind is FileKind.TORCH_ZIP)
    except pickle.UnpicklingError as e:
        reason = " ".join(line for line in str(e).splitlines()[2:] if line.strip())[:300]
        raise UnsafeCheckpointError(
            f"{file}: refused to load: it holds objects other than plain tensors, which could run code "
            f"when unpickled ({reason}); expected only tensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{file}: truncated or corrupt PyTorch file ({e}); cannot read its tensors"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(value).__name__}; expected a tensor")
    return obj
