"""Fixtures for checkpoint tests (helpers live in ckpt_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_support import hf_model, save_hf
from transformers import LlamaForCausalLM

from llama2.checkpoint import LoadedModel, load_model


@pytest.fixture(scope="session")
def gqa_hf() -> LlamaForCausalLM:
    """A GQA model (4 query heads, 2 KV heads) used as the weights of the round-trip tests."""
    return hf_model("gqa", seed=3)


@pytest.fixture(scope="session")
def gqa_hf_dir(gqa_hf: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(gqa_hf, tmp_path_factory.mktemp("gqa_hf"))


@pytest.fixture(scope="session")
def gqa_loaded(gqa_hf_dir: Path) -> LoadedModel:
    return load_model(gqa_hf_dir, progress=False)
