"""The one tokenizer-discovery rule (`llama2.checkpoint.tokenizer_path`) against hand-built folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2.api import Llama
from llama2.checkpoint.formats import CheckpointFormat
from llama2.checkpoint.gguf_export import export_gguf
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import find_tokenizer, require_tokenizer
from llama2.config import ModelArgs
from llama2.errors import TokenizerError
from llama2.model import Transformer


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.mark.parametrize("fmt", [CheckpointFormat.LLAMA2, CheckpointFormat.HF, CheckpointFormat.LLAMA2C])
def test_next_to_the_weights(tmp_path: Path, fmt: CheckpointFormat) -> None:
    weights = _touch(tmp_path / "m" / "model.safetensors")
    assert find_tokenizer(tmp_path / "m", [weights], fmt) is None
    tok = _touch(tmp_path / "m" / "tokenizer.model")
    assert find_tokenizer(tmp_path / "m", [weights], fmt) == tok


@pytest.mark.parametrize("fmt", [CheckpointFormat.LLAMA2, CheckpointFormat.HF, CheckpointFormat.LLAMA2C])
def test_parent_folder_is_not_looked_at_outside_meta_layout(tmp_path: Path, fmt: CheckpointFormat) -> None:
    _touch(tmp_path / "tokenizer.model")  # a stray tokenizer one level up belongs to something else
    weights = _touch(tmp_path / "m" / "model.safetensors")
    assert find_tokenizer(tmp_path / "m", [weights], fmt) is None


def test_meta_download_layout_parent_folder(tmp_path: Path) -> None:
    parent_tok = _touch(tmp_path / "llama" / "tokenizer.model")
    shard = _touch(tmp_path / "llama" / "llama-2-7b" / "consolidated.00.pth")
    root = shard.parent
    assert find_tokenizer(root, [shard], CheckpointFormat.META) == parent_tok
    own = _touch(root / "tokenizer.model")  # one inside the model folder comes first
    assert find_tokenizer(root, [shard], CheckpointFormat.META) == own


def test_gguf_carries_its_own_vocabulary(tmp_path: Path) -> None:
    gguf = _touch(tmp_path / "model.gguf")
    _touch(tmp_path / "tokenizer.model")  # ignored: the GGUF file's vocabulary is the model's
    assert find_tokenizer(tmp_path, [gguf], CheckpointFormat.GGUF) == gguf
    assert find_tokenizer(tmp_path, [gguf], "gguf") == gguf  # LoadedModel.format is a plain string


def test_explicit_wins_and_must_exist(tmp_path: Path) -> None:
    weights = _touch(tmp_path / "model.safetensors")
    _touch(tmp_path / "tokenizer.model")
    mine = _touch(tmp_path / "elsewhere" / "my.model")
    assert find_tokenizer(tmp_path, [weights], CheckpointFormat.LLAMA2, explicit=mine) == mine
    assert find_tokenizer(tmp_path, [weights], CheckpointFormat.LLAMA2, explicit=str(mine)) == mine
    with pytest.raises(TokenizerError, match=r"missing\.model does not exist"):
        find_tokenizer(tmp_path, [weights], CheckpointFormat.LLAMA2, explicit=tmp_path / "missing.model")
    found = tmp_path / "tokenizer.model"
    assert require_tokenizer(found, mine, "ckpt", "pass --tokenizer PATH") == mine
    assert require_tokenizer(found, None, "ckpt", "pass --tokenizer PATH") == found


def test_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as e:
        require_tokenizer(None, None, tmp_path / "ckpt", "pass --tokenizer PATH")
    msg = str(e.value)
    assert "no tokenizer.model found with the checkpoint" in msg and str(tmp_path / "ckpt") in msg
    assert msg.endswith("pass --tokenizer PATH")


def test_nothing_on_disk_has_no_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model held in memory has no folder: a tokenizer.model in the working directory is not its."""
    assert find_tokenizer(Path("."), [], CheckpointFormat.LLAMA2) is None
    _touch(tmp_path / "tokenizer.model")
    monkeypatch.chdir(tmp_path)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    with pytest.raises(TokenizerError, match=r"held in memory.*pass tokenizer_path"):
        export_gguf(Transformer(args), tmp_path / "out.gguf", qtype="f32", progress=False)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("name", ["base", "chat", "code"])
def test_embedded_models_find_their_tokenizer(name: str) -> None:
    loaded = load_model(name, progress=False)
    assert loaded.tokenizer_path is not None
    assert loaded.tokenizer_path.name == "tokenizer.model" and loaded.tokenizer_path.parent.name == name


def test_llama_build_takes_an_embedded_name() -> None:
    llama = Llama.build("chat", max_seq_len=32, max_batch_size=1, progress=False)
    assert llama.tokenizer.vocab_size == llama.model.args.vocab_size == 4096  # MODEL_CARD: 4096 pieces
