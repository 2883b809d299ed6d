"""One seed, one answer: at temperature 0.8 the HTTP server, `Generator`, `Llama.text_completion` and
`llama2 generate` give the same tokens for the same seed, for n = 2 (choice c uses
`choice_seed(seed, c)`), for a batch of prompts, and alone or batched on the library side."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_support import TOKENIZER_MODEL, ServerProcess, server_process, tiny_args, tiny_model

from llama2.api import Llama
from llama2.checkpoint import save_checkpoint
from llama2.generation import Generator, SamplingParams, choice_seed
from llama2.tokenizer import Tokenizer

PROMPTS = ["In a hole in the ground there lived", "def add(a, b):"]
SEED = 11
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with server_process("--vocab", "32016", "--max-slots", "4", "--prefill-chunk", "8") as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def _params(seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, seed=seed)


def _complete(http: httpx.Client, prompt: str | list[str], n: int) -> list[dict[str, object]]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.8, "top_p": 0.95, "n": n}
    body["seed"] = SEED
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices: list[dict[str, object]] = r.json()["choices"]
    return sorted(choices, key=lambda c: int(str(c["index"])))


def test_n2_seeded_server_equals_generator(
    http: httpx.Client, code_oracle: Generator, code_tokenizer: Tokenizer
) -> None:
    ids = code_tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    choices = _complete(http, PROMPTS[0], n=2)
    params = [_params(choice_seed(SEED, c)) for c in range(2)]
    batched = code_oracle.generate([ids, ids], MAX_TOKENS, params)
    alone = [code_oracle.generate([ids], MAX_TOKENS, p)[0] for p in params]
    assert [c["text"] for c in choices] == [r.text for r in batched] == [r.text for r in alone]
    assert choices[0]["text"] != choices[1]["text"]  # two streams, not one seed twice
    greedy = code_oracle.generate([ids], MAX_TOKENS)[0].text
    assert greedy not in {r.text for r in batched}  # really sampled


def test_seeded_server_equals_text_completion(http: httpx.Client, code_tokenizer: Tokenizer) -> None:
    llama = Llama(tiny_model(32016), code_tokenizer)
    lib = llama.text_completion(PROMPTS, temperature=0.8, top_p=0.95, max_gen_len=MAX_TOKENS, seed=SEED)
    lib_alone = [
        llama.text_completion([p], temperature=0.8, top_p=0.95, max_gen_len=MAX_TOKENS, seed=SEED)[0]
        for p in PROMPTS
    ]
    served = _complete(http, PROMPTS, n=1)  # one choice per prompt, every one with the seed
    texts = [c["text"] for c in served]
    assert texts == [p["generation"] for p in lib] == [p["generation"] for p in lib_alone]
    # choice 0 of an n=2 request is the plain seeded completion
    assert _complete(http, PROMPTS[1], n=2)[0]["text"] == lib[1]["generation"]


def test_seeded_cli_generate_equals_generator(tmp_path: Path) -> None:
    """`llama2 generate --seed` (a subprocess on a saved checkpoint) samples what `Generator` samples
    with the same seed, which the tests above tie to the server and to `text_completion`."""
    model = tiny_model(32000)
    ckpt = save_checkpoint(model, tiny_args(32000), tmp_path / "m", tokenizer_path=TOKENIZER_MODEL)
    cmd = [
        sys.executable, "-m", "llama2", "generate", "--model", str(ckpt), "--prompt", PROMPTS[0],
        "--temperature", "0.8", "--top-p", "0.95", "--seed", str(SEED), "--max-new-tokens", str(MAX_TOKENS),
        "--no-echo", "--quiet", "--dtype", "float32",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.from_file(TOKENIZER_MODEL)
    ids = tok.encode(PROMPTS[0], bos=True, eos=False)
    expected = Generator(model, tok).generate([ids], MAX_TOKENS, _params(SEED))[0].text
    greedy = Generator(model, tok).generate([ids], MAX_TOKENS)[0].text
    assert proc.stdout == expected + "\n"
    assert expected != greedy  # really sampled
