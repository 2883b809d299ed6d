"""`llama2 eval exact-match` and `llama2 eval infill` take `--model` with an embedded name, like every
command; `--checkpoint` still works as a hidden, deprecated alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2 import cli


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_exact_match_with_embedded_chat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "em.json"
    argv = ["eval", "exact-match", "--model", "chat", "--n-per-task", "1", "--tasks", "add", "uppercase"]
    code, stdout, err = _run([*argv, "--max-new-tokens", "4", "--out-json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["overall"]["n"] == 2 and set(report["per_task"]) == {"add", "uppercase"}
    assert "add" in stdout


def test_infill_with_embedded_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):  # the split is by name hash: with half held out, both sides get files
        body = "".join(f"def function_{i}_{j}(value):\n    return value + {j}\n\n" for j in range(6))
        (src / f"mod{i}.py").write_text(body, encoding="utf-8")
    out = tmp_path / "infill.json"
    argv = ["eval", "infill", "--model", "code", "--source-dir", str(src), "--heldout-fraction", "0.5"]
    argv += ["--n-cases", "2", "--kinds", "line", "--modes", "psm", "--max-new-tokens", "3"]
    code, _, err = _run([*argv, "--out-json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert set(report) == {"line/psm"} and report["line/psm"]["n_cases"] == 2


@pytest.mark.parametrize("command", ["exact-match", "infill"])
def test_checkpoint_is_a_hidden_alias_of_model(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["eval", command, "--help"], capsys)
    flags = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert code == 0 and "--model" in flags and "--checkpoint" not in flags
    missing = tmp_path / "missing"
    for flag in ("--model", "--checkpoint"):  # both reach the loader with the same value
        code, _, err = _run(["eval", command, flag, str(missing)], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and f"model {str(missing)!r} not found" in lines[0], err
