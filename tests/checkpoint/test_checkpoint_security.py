"""A crafted pickle that tries to run code is refused with `UnsafeCheckpointError`, and its payload
never runs (the marker file it would create stays absent)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from llama2.checkpoint import load_model
from llama2.errors import CheckpointError, UnsafeCheckpointError

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "hidden_dim": 80,
    "multiple_of": 16,
    "norm_eps": 1e-5,
    "max_seq_len": 16,
}


class SystemPayload:
    """Unpickling calls os.system(command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _meta_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return folder


@pytest.mark.parametrize("payload_cls", [SystemPayload, OpenPayload])
@pytest.mark.parametrize("writer", ["pickle-p2", "pickle-p4", "torch-zip"])
def test_code_execution_payload_refused(payload_cls: type, writer: str, tmp_path: Path) -> None:
    folder = _meta_folder(tmp_path)
    marker = tmp_path / "pwned"
    obj = {"tok_embeddings.weight": torch.zeros(96, 64), "evil": payload_cls(marker)}
    target = folder / "consolidated.00.pth"
    if writer == "torch-zip":
        torch.save(obj, target)
    else:
        with target.open("wb") as f:
            pickle.dump(obj, f, protocol=2 if writer == "pickle-p2" else 4)
    # Sanity: the payload is live — a plain unpickle would run it.
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(folder, progress=False)
    assert "consolidated.00.pth" in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_model(target, progress=False)  # the single file too
    assert not marker.exists()


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the same bytes do run code under plain pickle, so the refusal above is meaningful."""
    marker = tmp_path / "pwned"
    data = pickle.dumps({"evil": OpenPayload(marker)}, protocol=2)
    obj = pickle.loads(data)
    obj["evil"].close()
    assert marker.exists()


def test_hf_pytorch_model_bin_payload_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
    }
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(96, 64), "x": SystemPayload(marker)},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refused"):
        load_model(folder, progress=False)
    assert not marker.exists()


def test_unsafe_error_is_a_checkpoint_error() -> None:
    assert issubclass(UnsafeCheckpointError, CheckpointError)
