"""The nested SFT config: `[lora]` / `[loop]` tables, `--lora.rank` / `--loop.lr` flags, the older flat
flags as aliases, and the run's config.toml loading back through the same command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from llama2 import cli
from llama2.errors import ConfigError
from llama2.train.loop_config import LoopConfig
from llama2.train.lora import LoRAConfig
from llama2.train.run_config import config_from_dict, config_to_dict, to_toml
from llama2.train.sft import SFTConfig

Capture = pytest.CaptureFixture[str]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[SFTConfig]:
    got: list[SFTConfig] = []
    monkeypatch.setitem(cli.TRAIN_COMMANDS, "sft", cli.ConfigCommand(SFTConfig, got.append, "sft"))
    return got


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(["train", "sft", *argv])
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_nested_flags_keep_the_stage_loop_defaults(seen: list[SFTConfig], capsys: Capture) -> None:
    code, err = _run(["--base", "b", "--lora.rank", "4", "--lora.target-modules", "wq", "wk",
                      "--loop.max-steps", "7", "--loop.out-dir", "o"], capsys)  # fmt: skip
    assert code == 0, err
    [c] = seen
    assert c.lora == LoRAConfig(rank=4, alpha=16.0, dropout=0.0, target_modules=["wq", "wk"])
    assert c.loop.max_steps == 7 and c.loop.out_dir == Path("o")
    assert c.loop.lr == 2e-5 and c.loop.warmup_steps == 10  # SFT's loop defaults, not LoopConfig's 3e-4/100
    assert c.model == Path("b")


def test_without_lora_values_it_is_full_finetuning(seen: list[SFTConfig], capsys: Capture) -> None:
    assert _run(["--loop.lr", "1e-4"], capsys)[0] == 0
    assert seen[0].lora is None and seen[0].loop.lr == 1e-4


def test_flat_flags_are_aliases(seen: list[SFTConfig], capsys: Capture) -> None:
    code, err = _run(["--lora-rank", "8", "--lora-targets", "wo", "--lr", "3e-4", "--out-dir", "runs/x",
                      "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    [c] = seen
    assert c.lora is not None and (c.lora.rank, c.lora.target_modules) == (8, ["wo"])
    assert (c.loop.lr, c.loop.out_dir, c.loop.progress) == (3e-4, Path("runs/x"), False)


def test_toml_tables_and_precedence(
    tmp_path: Path, seen: list[SFTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "sft.toml"
    f.write_text('base = "m"\n[lora]\n[loop]\nlr = 1e-3\nmax_steps = 50\n')
    code, err = _run(["--config", str(f), "--loop.max-steps", "9"], capsys)
    assert code == 0, err
    [c] = seen
    assert c.lora == LoRAConfig()  # an empty [lora] table: LoRA with its defaults (rank 8, wq/wv)
    assert (c.loop.lr, c.loop.max_steps) == (1e-3, 9)  # the flag beats the file

    f.write_text("lora_rank = 2\nlr = 0.5\n")  # an older flat file still loads
    assert _run(["--config", str(f)], capsys)[0] == 0
    assert seen[1].lora is not None and seen[1].lora.rank == 2 and seen[1].loop.lr == 0.5

    f.write_text("[loop]\nlearning_rate = 1.0\n")
    code, err = _run(["--config", str(f)], capsys)
    assert code == 1 and "unknown setting 'learning_rate' in [loop]" in err and "max_steps" in err
    f.write_text("[lora]\nrank = 0\n")
    code, err = _run(["--config", str(f)], capsys)
    assert code == 1 and "LoRA rank must be a positive integer, got 0" in err
    f.write_text("loop = 3\n")
    code, err = _run(["--config", str(f)], capsys)
    assert code == 1 and "'loop' must be a table" in err


def test_resolved_config_round_trips_through_toml(
    tmp_path: Path, seen: list[SFTConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    loop = LoopConfig(lr=1e-4, out_dir=tmp_path / "o")
    cfg = SFTConfig(model=Path("b"), lora=LoRAConfig(rank=4), loop=loop)
    text = to_toml(config_to_dict(cfg))
    parsed = tomllib.loads(text)
    assert parsed["lora"]["rank"] == 4 and parsed["loop"]["lr"] == 1e-4 and "lora_rank" not in parsed
    assert config_from_dict(SFTConfig, parsed) == cfg
    f = tmp_path / "config.toml"
    f.write_text(text)
    assert _run(["--config", str(f)], capsys)[0] == 0
    assert seen[0] == cfg


def test_config_from_dict_reads_an_older_flat_sft_config() -> None:
    cfg = config_from_dict(SFTConfig, {"base": "b", "lora_rank": 4, "lora_targets": ["wo"], "lr": 1e-3})
    assert cfg.lora == LoRAConfig(rank=4, target_modules=["wo"]) and cfg.loop.lr == 1e-3
    assert cfg.loop.warmup_steps == 10  # SFT's loop default, not LoopConfig's 100


def test_constructor_takes_the_flat_keywords_of_the_chat_model_card() -> None:
    card = Path(__file__).resolve().parents[2] / "src/llama2/assets/models/chat/MODEL_CARD.md"
    m = re.search(r"run_sft\((SFTConfig\(.*?\))\)\n", card.read_text(), re.S)
    assert m is not None, "the model card's SFTConfig(...) call moved; update this test"
    c = eval(m[1], {"SFTConfig": SFTConfig, "Path": Path, "data": Path("d.jsonl")})
    assert (c.model, c.data, c.seq_len, c.save_dtype, c.lora) == (
        Path("src/llama2/assets/models/base"), Path("d.jsonl"), 256, "bfloat16", None)  # fmt: skip
    assert (c.loop.lr, c.loop.max_steps, c.loop.warmup_steps, c.loop.batch_size) == (1e-3, 600, 10, 8)
    assert (c.loop.ckpt_every, c.loop.threads, c.loop.out_dir) == (50, 1, Path("runs/chat/sft2"))
    assert SFTConfig(base=Path("m"), lora_rank=4).lora == LoRAConfig(rank=4)  # type: ignore[call-arg]
    assert SFTConfig(lr=1e-4).loop.warmup_steps == 10  # SFT's loop default, not LoopConfig's 100
    with pytest.raises(ConfigError, match="'base' and 'model' name the same field"):
        SFTConfig(base=Path("m"), model=Path("n"))  # type: ignore[call-arg]
