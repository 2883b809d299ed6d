"""The embedded models load, and generate what an independent implementation generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2.assets import EMBEDDED_MODELS, embedded_model_dir
from llama2.checkpoint import load_model
from llama2.checkpoint.save import export_hf
from llama2.generation import Generator, SamplingParams
from llama2.tokenizer import Tokenizer

# Greedy continuation of "ROMEO:" by the embedded base model (regenerate when base is retrained).
BASE_ROMEO_GREEDY = [13, 4058, 4031, 4042, 542, 4042, 296, 270, 775, 298, 270, 775, 4042, 13, 4052, 269]


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_embedded_model_is_complete_and_small(name: str) -> None:
    folder = embedded_model_dir(name)
    for file in ("params.json", "model.safetensors", "tokenizer.model", "MODEL_CARD.md"):
        assert (folder / file).is_file(), f"{name}: missing {file}"
    loaded = load_model(folder, progress=False)
    assert loaded.tokenizer_path is not None
    assert Tokenizer.from_file(loaded.tokenizer_path).vocab_size == loaded.args.vocab_size


def test_embedded_models_fit_the_budget() -> None:
    total = sum(p.stat().st_size for n in EMBEDDED_MODELS for p in embedded_model_dir(n).iterdir())
    assert total <= 60 * 1024 * 1024


def test_base_greedy_matches_transformers_and_golden(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    loaded = load_model(embedded_model_dir("base"), dtype=torch.float32, progress=False)
    assert loaded.tokenizer_path is not None
    tok = Tokenizer.from_file(loaded.tokenizer_path)
    prompt = tok.encode("ROMEO:", bos=True, eos=False)
    n = len(BASE_ROMEO_GREEDY)
    [ours] = Generator(loaded.model, tok).generate([prompt], n, SamplingParams(temperature=0.0))

    export_hf(loaded.model, loaded.args, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    theirs = out[0, len(prompt) :].tolist()
    assert list(ours.tokens) == theirs
    assert theirs == BASE_ROMEO_GREEDY
