"""The nested pretraining configs (`llama2 train pretrain`, `llama2 train code`): a `[loop]` table and
`--loop.lr` flags, the older flat flags, keys and constructor keywords as aliases, and the files that
predate the nesting (scripts/configs/base.toml, scripts/train_code.sh, the code model card)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llama2 import cli
from llama2.errors import ConfigError
from llama2.train.code import CodePretrainConfig
from llama2.train.loop_config import LoopConfig
from llama2.train.pretrain import PretrainConfig
from llama2.train.run_config import config_from_dict, config_to_dict, to_toml

REPO = Path(__file__).resolve().parents[2]
Capture = pytest.CaptureFixture[str]
STAGES = {"pretrain": PretrainConfig, "code": CodePretrainConfig}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    got: list[Any] = []
    for name, cls in STAGES.items():
        monkeypatch.setitem(cli.TRAIN_COMMANDS, name, cli.ConfigCommand(cls, got.append, name))
    return got


def _run(stage: str, argv: list[str], capsys: Capture) -> tuple[int, str]:
    try:
        code = cli.main(["train", stage, *argv])
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("stage", STAGES)
def test_nested_flags(stage: str, seen: list[Any], capsys: Capture) -> None:
    code, err = _run(stage, ["--dim", "64", "--loop.lr", "1e-3", "--loop.out-dir", "o", "--no-loop.progress",
                             "--resume"], capsys)  # fmt: skip
    assert code == 0, err
    [c] = seen
    assert type(c) is STAGES[stage] and c.dim == 64 and c.resume is True
    assert (c.loop.lr, c.loop.out_dir, c.loop.progress) == (1e-3, Path("o"), False)
    # the loop values not given keep LoopConfig's defaults (the paper's recipe, unchanged by the nesting)
    assert (c.loop.warmup_steps, c.loop.max_steps, c.loop.batch_size, c.loop.seed) == (100, 1000, 8, 1337)
    assert (c.loop.beta1, c.loop.beta2, c.loop.eps, c.loop.weight_decay) == (0.9, 0.95, 1e-5, 0.1)


@pytest.mark.parametrize("stage", STAGES)
def test_flat_flags_are_aliases(stage: str, seen: list[Any], capsys: Capture) -> None:
    code, err = _run(stage, ["--lr", "2e-3", "--max-steps", "5", "--out-dir", "runs/x", "--no-progress",
                             "--seed", "7", "--device", "cpu", "--n-layers", "3"], capsys)  # fmt: skip
    assert code == 0, err
    [c] = seen
    assert (c.loop.lr, c.loop.max_steps, c.loop.out_dir) == (2e-3, 5, Path("runs/x"))
    assert (c.loop.progress, c.loop.seed, c.loop.device, c.n_layers) == (False, 7, "cpu", 3)
    assert not hasattr(c, "lr")  # one place for each setting


@pytest.mark.parametrize("stage", STAGES)
def test_toml_loop_table_and_precedence(stage: str, tmp_path: Path, seen: list[Any], capsys: Capture) -> None:
    f = tmp_path / "run.toml"
    f.write_text('dim = 64\n[loop]\nlr = 1e-3\nmax_steps = 50\nout_dir = "runs/t"\n')
    code, err = _run(stage, ["--config", str(f), "--loop.max-steps", "9"], capsys)
    assert code == 0, err
    assert (seen[0].dim, seen[0].loop.lr, seen[0].loop.max_steps) == (64, 1e-3, 9)  # the flag beats the file
    assert seen[0].loop.out_dir == Path("runs/t") and seen[0].loop.warmup_steps == 100
    assert _run(stage, ["--config", str(f), "--max-steps", "4"], capsys)[0] == 0  # a flat flag beats it too
    assert (seen[1].loop.lr, seen[1].loop.max_steps) == (1e-3, 4)

    f.write_text("[loop]\nlearning_rate = 1.0\n")
    code, err = _run(stage, ["--config", str(f)], capsys)
    assert code == 1 and "unknown setting 'learning_rate' in [loop]" in err and "max_steps" in err
    f.write_text("[loop]\nmax_steps = 0\n")
    code, err = _run(stage, ["--config", str(f)], capsys)
    assert code == 1 and "max_steps must be a positive integer, got 0" in err
    f.write_text("loop = 3\n")
    code, err = _run(stage, ["--config", str(f)], capsys)
    assert code == 1 and "'loop' must be a table" in err


def test_old_flat_base_toml_loads_unchanged(seen: list[Any], capsys: Capture) -> None:
    # the model card's command for the embedded `base` model, on the flat file it was trained with
    base = REPO / "scripts" / "configs" / "base.toml"
    code, err = _run("pretrain", ["--config", str(base), "--resume", "--save-dtype", "bfloat16",
                                  "--loop.max-steps", "2000"], capsys)  # fmt: skip
    assert code == 0, err
    [c] = seen
    assert (c.dim, c.n_layers, c.n_heads, c.seq_len) == (256, 4, 8, 256)
    assert (c.resume, c.save_dtype) == (True, "bfloat16")
    assert (c.loop.lr, c.loop.warmup_steps, c.loop.max_steps, c.loop.batch_size) == (1e-3, 30, 2000, 8)
    assert (c.loop.ckpt_every, c.loop.threads, c.loop.dtype) == (25, 1, "float32")
    assert c.loop.out_dir == Path("runs/base")


def test_run_stage_overrides_flat_and_nested() -> None:
    # scripts/train_base.sh: run_stage.py pretrain scripts/configs/base.toml resume=true save_dtype="bfloat16"
    spec = importlib.util.spec_from_file_location("run_stage", REPO / "scripts" / "run_stage.py")
    assert spec is not None and spec.loader is not None
    run_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_stage)
    base = str(REPO / "scripts" / "configs" / "base.toml")
    c = run_stage.load(PretrainConfig, base, ["resume=true", 'save_dtype="bfloat16"', "max_steps=10"])
    assert (c.resume, c.save_dtype) == (True, "bfloat16")
    assert (c.loop.max_steps, c.loop.lr, c.loop.seed) == (10, 1e-3, 1337)
    nested = run_stage.load(PretrainConfig, base, ["loop.lr=0.5"])
    assert (nested.loop.lr, nested.loop.max_steps, nested.loop.warmup_steps) == (0.5, 600, 30)


def test_constructor_takes_flat_keywords_of_scripts_and_model_card() -> None:
    script = (REPO / "scripts" / "train_code.sh").read_text()
    card = (REPO / "src" / "llama2" / "assets" / "models" / "code" / "MODEL_CARD.md").read_text()
    calls = [
        re.search(r"cfg = (CodePretrainConfig\(.*?\))\nr = ", script, re.S),
        re.search(r"run_code_pretrain\((CodePretrainConfig\(.*?\))\)\n", card, re.S),
    ]
    for m in calls:
        assert m is not None, "the CodePretrainConfig(...) call moved; update this test"
        c = eval(m[1], {"CodePretrainConfig": CodePretrainConfig, "Path": Path})
        assert (c.dim, c.n_layers, c.hidden_dim, c.vocab_size) == (192, 4, 512, 2048)
        assert (c.seq_len, c.max_chars) == (256, 640)
        assert (c.loop.lr, c.loop.max_steps, c.loop.warmup_steps, c.loop.batch_size) == (2e-3, 1800, 100, 8)
        assert (c.loop.eval_every, c.loop.eval_batches, c.loop.ckpt_every) == (200, 16, 100)
        assert (c.loop.log_every, c.loop.threads, c.loop.progress, c.resume) == (20, 1, False, True)
        assert c.loop.out_dir == Path("runs/code2")
    # flat keywords change the given loop; a bad value or a non-table loop is a ConfigError
    c = PretrainConfig(loop=LoopConfig(lr=1e-3, max_steps=7), max_steps=9)
    assert (c.loop.lr, c.loop.max_steps) == (1e-3, 9)
    with pytest.raises(ConfigError, match="max_steps must be a positive integer, got 0"):
        CodePretrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="'loop' must be a config table"):
        PretrainConfig(loop=3, lr=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", STAGES)
def test_resolved_config_round_trips(stage: str, tmp_path: Path, seen: list[Any], capsys: Capture) -> None:
    cls = STAGES[stage]
    cfg = cls(dim=64, loop=LoopConfig(lr=1e-4, out_dir=tmp_path / "o"), resume=True)
    text = to_toml(config_to_dict(cfg))
    parsed = tomllib.loads(text)
    assert parsed["loop"]["lr"] == 1e-4 and "lr" not in parsed and parsed["dim"] == 64
    assert config_from_dict(cls, parsed) == cfg
    f = tmp_path / "config.toml"
    f.write_text(text)
    assert _run(stage, ["--config", str(f)], capsys)[0] == 0
    assert seen[0] == cfg


@pytest.mark.parametrize("stage", STAGES)
def test_config_from_dict_reads_an_older_flat_config(stage: str) -> None:
    # a config.toml / checkpoint config written before the nesting: every loop field at the top level
    cls = STAGES[stage]
    flat = {"dim": 64, **config_to_dict(LoopConfig(lr=5e-4, max_steps=12, out_dir=Path("runs/old")))}
    cfg = config_from_dict(cls, flat)
    assert cfg == cls(dim=64, loop=LoopConfig(lr=5e-4, max_steps=12, out_dir=Path("runs/old")))
    assert config_from_dict(cls, {"lr": 5e-4}).loop.warmup_steps == 100
    with pytest.raises(ConfigError, match="unknown"):
        config_from_dict(cls, {"learning_rate": 1.0})
