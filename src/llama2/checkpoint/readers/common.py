"""Pieces the readers share: the JSON config beside the weights and lazily opened safetensors files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2.checkpoint.formats import DetectedCheckpoint, read_safetensors_header
from llama2.errors import CheckpointError, ConfigError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def config_file(found: DetectedCheckpoint, expected: str) -> Path:
    """The checkpoint's JSON config (detect() finds one for these formats; never None here)."""
    if found.config_file is None:
        raise CheckpointError(f"{found.root}: no {expected} found beside the weights")
    return found.config_file


def config_error(file: Path, e: ConfigError) -> CheckpointError:
    return CheckpointError(f"{file}: {e}")


class SafetensorsFile:
    """A safetensors file opened lazily: header parsed now, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header, _ = read_safetensors_header(path)
        meta = self.header.get("__metadata__") or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self._handle: Any = None

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name].get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code!r}")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(name)  # type: ignore[no-any-return]
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None
