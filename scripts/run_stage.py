"""Run a training stage from a TOML config, with `key=value` overrides (TOML syntax for values).

Until the `llama2 train ...` console commands are wired, this is how scripts/train_base.sh runs:
    python scripts/run_stage.py pretrain scripts/configs/base.toml max_steps=10 resume=true
    python scripts/run_stage.py tokenizer scripts/configs/base_tokenizer.toml
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from llama2.train.loop import config_from_dict
from llama2.train.pretrain import PretrainConfig, run_pretrain
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer


def load(cls: Any, path: str, overrides: list[str]) -> Any:
    data: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    for item in overrides:
        data.update(tomllib.loads(item.replace("=", " = ", 1)))
    return config_from_dict(cls, data)


def main() -> None:
    stage, path, *overrides = sys.argv[1:]
    if stage == "pretrain":
        cfg = load(PretrainConfig, path, overrides)
        res = run_pretrain(cfg)
        print(f"done: step {res.train.step}, val loss {res.train.val_loss}, model in {res.model_dir}")
    elif stage == "tokenizer":
        print(train_tokenizer(load(TokenizerTrainConfig, path, overrides)))
    else:
        raise SystemExit(f"unknown stage {stage!r}; expected pretrain or tokenizer")


if __name__ == "__main__":
    main()
