"""Fixtures for the server tests: the in-process oracle (the same tiny model run by the generation
helper's `Generator`) and single-threaded torch for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from serve_support import tiny_model, tokenizer_for

from llama2.generation import Generator
from llama2.tokenizer import Tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The in-process oracles run single-threaded (the machine is shared; threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def code_tokenizer() -> Tokenizer:
    return tokenizer_for(32016)


@pytest.fixture(scope="session")
def code_oracle(code_tokenizer: Tokenizer) -> Generator:
    """Static-batch generation over the exact weights the 32016-vocabulary test server uses."""
    return Generator(tiny_model(32016), code_tokenizer)
