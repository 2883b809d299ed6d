"""Shared test fixtures: the Llama 2 tokenizer fixtures in `<repo>/../shared/fixtures/`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
LLAMA2_TOKENIZER_DIR = SHARED_FIXTURES / "llama2-tokenizer"


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    """Folder with the real Llama 2 `tokenizer.model` and llama.cpp's vocabulary GGUF + test cases."""
    if not (LLAMA2_TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.fail(f"missing shared fixtures at {LLAMA2_TOKENIZER_DIR} (expected ../shared beside the repo)")
    return LLAMA2_TOKENIZER_DIR


# The suite's models are tiny: one intra-op thread is faster than two and keeps timings stable
# on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
