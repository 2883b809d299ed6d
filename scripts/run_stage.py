"""Run a training stage from a TOML config, with `key=value` overrides (TOML syntax for values).

Until the `llama2 train ...` console commands are wired, this is how scripts/train_base.sh runs:
    python scripts/run_stage.py pretrain scripts/configs/base.toml max_steps=10 resume=true
    python scripts/run_stage.py tokenizer scripts/configs/base_tokenizer.toml
An override may name a key of a table (`loop.max_steps=10`) or, as in older files, its flat alias
(`max_steps=10`); either replaces that one value and keeps the rest of the table.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from llama2.train.loop import config_from_dict
from llama2.train.pretrain import PretrainConfig, run_pretrain
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer


def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge `new` into `into`, table by table (`{"loop": {"lr": 1}}` keeps the loop's other keys)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def load(cls: Any, path: str, overrides: list[str]) -> Any:
    data: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    for item in overrides:
        new = tomllib.loads(item.replace("=", " = ", 1))
        for key in [k for k in new if "." in aliases.get(k, "")]:  # a flat alias: beat the file's table too
            table, sub_key = aliases[key].split(".", 1)
            new.setdefault(table, {})[sub_key] = new.pop(key)
        merge(data, new)
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
