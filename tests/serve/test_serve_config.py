"""`ServeConfig` / `build_app` in-process: loading a saved checkpoint with its tokenizer (the path
`llama2 serve --model DIR` takes), API key files, and the CLI options."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_support import TOKENIZER_MODEL, tiny_args, tiny_model

from llama2.checkpoint.save import save_checkpoint
from llama2.errors import CheckpointError, ConfigError
from llama2.generation import Generator, SamplingParams
from llama2.serve.server import ServeConfig, add_arguments, build_app, config_from_args
from llama2.tokenizer import Tokenizer


def test_serves_a_saved_checkpoint(tmp_path: Path) -> None:
    model = tiny_model()
    ckpt = save_checkpoint(model, tiny_args(), tmp_path / "tiny-ckpt", tokenizer_path=TOKENIZER_MODEL)
    app, engine = build_app(ServeConfig(model_path=ckpt, max_slots=2, max_seq_len=128))
    assert engine.context_window == 128
    tok = Tokenizer.from_file(TOKENIZER_MODEL)
    ids = tok.encode("Hello world", bos=True, eos=False)
    expected = Generator(model, tok).generate([ids], 6, SamplingParams(temperature=0.0))[0].text
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-ckpt"
        r = client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected


def test_api_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-a\n\n  sk-b  \n", encoding="utf-8")
    config = ServeConfig(api_keys=("sk-cli",), api_key_file=keys)
    assert config.all_api_keys() == ("sk-cli", "sk-a", "sk-b")
    with pytest.raises(ConfigError, match="does not exist"):
        ServeConfig(api_key_file=tmp_path / "missing.txt").all_api_keys()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no key"):
        ServeConfig(api_key_file=empty).all_api_keys()
    app, _ = build_app(
        ServeConfig(api_key_file=keys, max_slots=1),
        model=tiny_model(),
        tokenizer=Tokenizer.from_file(TOKENIZER_MODEL),
    )
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-b"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-b "}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Basic sk-b"}).status_code == 401


def test_cli_options_and_defaults(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = config_from_args(parser.parse_args(["--model", str(ckpt), "--api-key", "k1", "--api-key", "k2"]))
    assert config.host == "127.0.0.1"  # local only unless told otherwise
    assert config.model_path == ckpt and config.api_keys == ("k1", "k2")
    with pytest.raises(CheckpointError, match="not-a-model"):
        config_from_args(parser.parse_args(["--model", str(tmp_path / "not-a-model")]))
    with pytest.raises(ConfigError, match="no model"):
        build_app(ServeConfig())
