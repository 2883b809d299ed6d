"""The `llama2` command line: one-line errors with the right exit status, generate / chat / infill
end to end on a tiny random model saved in our format, and config-driven commands."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "generation"))
from gen_support import save_tiny_checkpoint

import llama2.assets
from llama2 import cli, config_cli
from llama2.api import Llama
from llama2.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; with several on a busy machine each op waits for all."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def llama(ckpt: Path) -> Llama:
    return Llama.build(ckpt, max_seq_len=None, max_batch_size=1, progress=False)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["generate"],  # --prompt is required
        ["generate", "--prompt", "x", "--temperature", "-1"],
        ["generate", "--prompt", "x", "--top-p", "1.5"],
        ["generate", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "--prompt", "x", "--dtype", "int3"],
        ["chat", "--top-k", "many"],
        ["infill", "--prefix", "a"],  # --suffix is required
    ],
)
def test_bad_arguments_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama2: error: ")


def test_bad_arguments_via_python_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llama2", "generate", "--top-p", "7"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("llama2: error: ") and "Traceback" not in proc.stderr


def test_missing_embedded_model_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(llama2.assets, "MODELS_DIR", tmp_path / "models")
    code, _, err = run(["generate", "--prompt", "Hi"], capsys)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()]
    assert "embedded model 'base' is not installed" in err
    code, _, err = run(["chat", "--model", str(tmp_path / "nowhere"), "--message", "hi"], capsys)
    assert code == 1 and "not found" in err and len(err.strip().splitlines()) == 1


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama2.assets, "MODELS_DIR", tmp_path)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "params.json").write_text("{}")
    assert llama2.assets.resolve_model("code") == tmp_path / "code"
    assert llama2.assets.resolve_model(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="'chat' is not installed"):
        llama2.assets.resolve_model("chat")


# ----------------------------------------------------------------------------- end to end
def test_generate_end_to_end(ckpt: Path, llama: Llama, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "generate",
        "--model",
        str(ckpt),
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0
    [expected] = llama.text_completion(["Hello"], temperature=0.0, max_gen_len=6)
    assert out == "Hello" + expected["generation"] + "\n"
    assert "loading" in err
    code, out, _ = run([*argv, "--no-echo", "--quiet"], capsys)
    assert out == expected["generation"] + "\n"


def test_generate_seeded_sampling_reproducible(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "generate",
        "--model",
        str(ckpt),
        "--prompt",
        "Hi",
        "--seed",
        "4",
        "--max-new-tokens",
        "8",
        "--quiet",
    ]
    first = run(argv, capsys)
    assert first[0] == 0 and run(argv, capsys) == first


def test_chat_messages_end_to_end(ckpt: Path, llama: Llama, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["chat", "--model", str(ckpt), "--temperature", "0", "--max-new-tokens", "5", "--quiet"]
    code, out, _ = run([*argv, "--system", "Be brief.", "--message", "Hi", "--message", "And you?"], capsys)
    assert code == 0
    [first] = llama.chat_completion(
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
        temperature=0.0,
        max_gen_len=5,
    )
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        first["generation"],
        {"role": "user", "content": "And you?"},
    ]
    [second] = llama.chat_completion([dialog], temperature=0.0, max_gen_len=5)  # type: ignore[list-item]
    assert out == second["generation"]["content"].strip() + "\n"


def test_chat_repl_from_stdin(
    ckpt: Path, llama: Llama, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/reset\n[INST] no\nHi\n/exit\nnever read\n"))
    argv = ["chat", "--model", str(ckpt), "--temperature", "0", "--max-new-tokens", "5", "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 0
    [reply] = llama.chat_completion([[{"role": "user", "content": "Hi"}]], temperature=0.0, max_gen_len=5)
    text = reply["generation"]["content"]
    assert out == f"{text}\n{text}\n"  # /reset: the second "Hi" starts a new conversation
    assert "special tags" in err or "[INST]" in err  # the bad line is reported, the REPL goes on


def test_infill_end_to_end(ckpt: Path, llama: Llama, capsys: pytest.CaptureFixture[str]) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    argv = ["infill", "--model", str(ckpt), "--prefix", prefix, "--suffix", suffix, "--max-new-tokens", "6"]
    code, out, _ = run([*argv, "--quiet"], capsys)
    assert code == 0
    [expected] = llama.text_infilling([prefix], [suffix], max_gen_len=6)  # default temperature 0 both
    assert out == expected["generation"] + "\n"
    code, out, _ = run([*argv, "--quiet", "--suffix-first", "--full"], capsys)
    [spm] = llama.text_infilling([prefix], [suffix], max_gen_len=6, suffix_first=True)
    assert out == spm["full_text"] + "\n"


def test_infill_needs_code_tokenizer(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = (
        Path(__file__).resolve().parents[1]
        / ".."
        / "shared"
        / "fixtures"
        / "llama2-tokenizer"
        / "tokenizer.model"
    )
    argv = [
        "infill",
        "--model",
        str(ckpt),
        "--tokenizer",
        str(plain),
        "--prefix",
        "a",
        "--suffix",
        "b",
        "--quiet",
    ]
    code, _, err = run(argv, capsys)
    assert code == 1 and "▁<PRE>" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- config commands
@dataclass
class DemoConfig:
    """A demo stage."""

    data: Path
    steps: int = 10
    lr: float = 3e-4
    name: str = "run"
    resume: Path | None = None
    tags: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    compile: bool = True
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = 5


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> list[DemoConfig]:
    seen: list[DemoConfig] = []
    monkeypatch.setitem(
        cli.TRAIN_COMMANDS, "demo", cli.ConfigCommand(DemoConfig, seen.append, "a demo stage")
    )
    return seen


def test_config_command_precedence(
    tmp_path: Path, demo: list[DemoConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "demo.toml"
    cfg.write_text('data = "d.bin"\nsteps = 50\nlr = 1\ntags = ["a", "b"]\nmode = "slow"\ncompile = false\n')
    code, _, err = run(["train", "demo", "--config", str(cfg), "--steps", "7", "--files", "x", "y"], capsys)
    assert code == 0, err
    [c] = demo
    assert c == DemoConfig(
        data=Path("d.bin"),
        steps=7,  # flag beats file
        lr=1.0,  # file beats default; int accepted for float
        tags=["a", "b"],
        files=[Path("x"), Path("y")],
        compile=False,
        mode="slow",
    )
    run(
        ["train", "demo", "--data", "e", "--compile", "--no-compile", "--resume", "ck", "--limit", "none"],
        capsys,
    )
    assert demo[1] == DemoConfig(data=Path("e"), compile=False, resume=Path("ck"), limit=None)


def test_config_command_errors(
    tmp_path: Path, demo: list[DemoConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('data = "d"\nstepz = 3\n')
    code, _, err = run(["train", "demo", "--config", str(cfg)], capsys)
    assert code == 1 and "unknown setting 'stepz'" in err and len(err.strip().splitlines()) == 1
    cfg.write_text('data = "d"\nsteps = "many"\n')
    code, _, err = run(["train", "demo", "--config", str(cfg)], capsys)
    assert code == 1 and "'steps' must be int" in err
    code, _, err = run(["train", "demo"], capsys)
    assert code == 1 and "'data'" in err and "--data" in err
    code, _, err = run(["train", "demo", "--data", "d", "--mode", "medium"], capsys)
    assert code == 2 and err.startswith("llama2: error:")
    code, _, err = run(["train", "demo", "--config", str(tmp_path / "missing.toml")], capsys)
    assert code == 1 and "missing.toml" in err
    cfg.write_text("data = [")
    code, _, err = run(["train", "demo", "--config", str(cfg)], capsys)
    assert code == 1 and "not valid TOML" in err
    assert demo == []


def test_add_config_command_directly() -> None:
    parser = cli._Parser(prog="x")
    sub = parser.add_subparsers(dest="cmd", required=True)
    got: list[DemoConfig] = []
    cli.add_config_command(sub, "demo", DemoConfig, got.append, "demo")
    args = parser.parse_args(["demo", "--data", "d", "--tags", "t1", "t2", "--lr", "0.5"])
    assert args._handler(args) == 0
    assert got == [DemoConfig(data=Path("d"), tags=["t1", "t2"], lr=0.5)]
    with pytest.raises(ConfigError):
        config_cli._coerce(config_cli._field_type(int, "f"), True, "f", "src")  # bool is not an int


# ----------------------------------------------------------------------------- quantization
def test_generate_quantize_flag_matches_api(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", str(ckpt), "--prompt", "Hello", "--temperature", "0"]
    argv += ["--max-new-tokens", "6", "--no-echo", "--quiet", "--quantize", "q8_0"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    quantized = Llama.build(ckpt, max_seq_len=None, max_batch_size=1, progress=False, quantize="q8_0")
    [expected] = quantized.text_completion(["Hello"], temperature=0.0, max_gen_len=6)
    assert out == expected["generation"] + "\n"
    code, _, err = run([*argv[:-1], "int3"], capsys)
    assert code == 1 and "unknown quantization scheme 'int3'" in err and len(err.strip().splitlines()) == 1


def test_quantize_command_writes_a_checkpoint_that_loads_as_stored(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama2.checkpoint.load import load_model
    from llama2.quant import QuantConfig
    from llama2.quant.linear import QuantizedLinear

    out_dir = tmp_path / "int8"
    code, _, err = run(["quantize", "--model", str(ckpt), "--scheme", "int8", "--out", str(out_dir)], capsys)
    assert code == 0 and "wrote" in err
    assert (out_dir / "tokenizer.model").is_file()
    loaded = load_model(out_dir, progress=False)
    assert loaded.quantization == QuantConfig("int8")
    assert isinstance(loaded.model.layers[0].attention.wq, QuantizedLinear)
    on_the_fly = load_model(ckpt, quantize="int8", progress=False)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), on_the_fly.model(tokens))


def test_quantize_command_gguf_output_generates(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gguf

    out_file = tmp_path / "tiny-q8_0.gguf"
    argv = ["quantize", "--model", str(ckpt), "--scheme", "q8_0", "--format", "gguf", "--out", str(out_file)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    reader = gguf.GGUFReader(out_file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    gen = ["generate", "--model", str(out_file), "--prompt", "Hello", "--temperature", "0"]
    code, out, err = run([*gen, "--max-new-tokens", "6", "--no-echo", "--quiet"], capsys)
    assert code == 0, err
    from_gguf = Llama.build(out_file, max_seq_len=None, max_batch_size=1, progress=False)
    [expected] = from_gguf.text_completion(["Hello"], temperature=0.0, max_gen_len=6)
    assert out == expected["generation"] + "\n"
    code, _, err = run([*argv[:4], "nf4", *argv[5:]], capsys)  # GGUF cannot hold nf4
    assert code == 1 and "GGUF output supports" in err


# ------------------------------------------------------------ output paths that cannot be written (issue 9)
def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama2: error: "), err  # no traceback
    return lines[0]


@pytest.mark.parametrize("fmt", ["llama2", "gguf"])
def test_quantize_out_under_a_file_is_one_line(
    fmt: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("user data\n")
    out = in_the_way / "sub" / ("q.gguf" if fmt == "gguf" else "q")
    scheme = "q8_0" if fmt == "gguf" else "int8"
    argv = ["quantize", "--model", str(ckpt), "--scheme", scheme, "--format", fmt, "--out", str(out)]
    code, _, err = run([*argv, "--quiet"], capsys)
    line = _one_error_line(err)
    assert code == 1 and str(out) in line and f"{in_the_way} is a file, not a folder" in line, err
    assert in_the_way.read_text() == "user data\n"  # never touched


def test_quantize_out_of_the_wrong_kind_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "existing.txt"
    a_file.write_text("keep me\n")
    code, _, err = run(["quantize", "--model", str(ckpt), "--scheme", "int8", "--out", str(a_file)], capsys)
    assert code == 1 and "it exists and is not a folder" in _one_error_line(err), err
    assert a_file.read_text() == "keep me\n"
    a_dir = tmp_path / "folder.gguf"
    a_dir.mkdir()
    argv = ["quantize", "--model", str(ckpt), "--scheme", "f16", "--format", "gguf", "--out", str(a_dir)]
    code, _, err = run(argv, capsys)
    assert code == 1 and "it is a folder" in _one_error_line(err), err
    assert list(a_dir.iterdir()) == []


@pytest.mark.parametrize("fmt", ["llama2", "gguf"])
def test_quantize_checks_the_output_before_reading_the_model(fmt: str, tmp_path: Path) -> None:
    from llama2.checkpoint.quantize import quantize_checkpoint

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write .* is a file, not a folder"):  # not "no such file"
        quantize_checkpoint(tmp_path / "missing-model", tmp_path / "f" / "out", "q8_0", output_format=fmt)


def test_quantize_unwritable_folder_is_one_line(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: permissions are not enforced")
    argv = ["quantize", "--model", str(ckpt), "--scheme", "int8", "--out", str(locked / "q")]
    code, _, err = run(argv, capsys)
    assert code == 1 and f"folder {locked} is not writable" in _one_error_line(err), err


@pytest.mark.parametrize("command", ["exact-match", "infill"])
def test_eval_out_json_under_a_file_fails_before_loading(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "report.json"
    argv = ["eval", command, "--checkpoint", str(tmp_path / "missing"), "--out-json", str(out)]
    code, _, err = run(argv, capsys)
    line = _one_error_line(err)
    assert code == 1 and f"cannot write out_json {out}" in line and "is a file, not a folder" in line, err
