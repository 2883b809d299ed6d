"""Fixtures for generation tests (helpers live in gen_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gen_support import TOKENIZER, hf_to_ours, make_hf

from llama2.model import Transformer
from llama2.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; with several on a busy machine each op waits for all."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return make_hf()


@pytest.fixture(scope="module")
def model(hf: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    folder: Path = tmp_path_factory.mktemp("hf")
    return hf_to_ours(hf, folder)
