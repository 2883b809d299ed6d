"""Training configs as plain data: dataclass <-> dict, TOML output, and the run's `config.toml`.

`config_to_dict` turns a config dataclass into str/int/float/bool/list/dict values (what a training
checkpoint and a TOML file can hold); `config_from_dict` rebuilds the dataclass from that dict or from
a parsed TOML file. `flat_aliases` lets a config's constructor take the older flat names of its
`ALIASES` (`PretrainConfig(lr=1e-3)` for `PretrainConfig(loop=LoopConfig(lr=1e-3))`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from llama2.errors import ConfigError
from llama2.train.checkpointing import write_text_atomic

_C = TypeVar("_C")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as a JSON/TOML-friendly dict (Paths -> str, nested dataclasses flattened to dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def nested_config_type(hint: Any) -> type[Any] | None:
    """The dataclass type of a nested config field (`LoopConfig`, `LoRAConfig | None`), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def config_from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Rebuild a config dataclass from `config_to_dict` output (or a parsed TOML file): `Path` fields
    are converted back, nested tables become their dataclass (`[loop]` -> `LoopConfig`), a class's
    `ALIASES` map older flat keys into them; unknown keys raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    names = set(fields)
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})  # older flat keys: lora_rank -> lora.rank
    if any(k in aliases and k not in names for k in data):
        nested: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        for key in [k for k in data if k in aliases and k not in names]:
            if "." not in aliases[key]:  # a renamed top-level field: base -> model
                nested.setdefault(aliases[key], nested.pop(key))
                continue
            table, sub_key = aliases[key].split(".", 1)
            if not isinstance(nested.setdefault(table, {}), dict):
                raise ConfigError(f"{cls.__name__}: {table!r} must be a table, got {nested[table]!r}")
            nested[table].setdefault(sub_key, nested.pop(key))
        data = nested
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        hint = hints[k]
        sub = nested_config_type(hint)
        if sub is not None and isinstance(v, Mapping):  # missing keys: the field's default, e.g. SFT's loop
            factory = fields[k].default_factory
            default = None if factory is dataclasses.MISSING else factory()
            start = config_to_dict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[k] = config_from_dict(sub, {**start, **v})
            continue
        is_path = hint is Path or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and Path in typing.get_args(hint)
        )
        kwargs[k] = Path(v) if is_path and isinstance(v, str) else v
    return cls(**kwargs)


def fold_aliases(cls: type[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keywords with `cls.ALIASES`' older flat names moved to their nested place:
    `{"lr": 1e-3, "dim": 64}` -> `{"loop": <the loop default with lr 1e-3>, "dim": 64}`. A nested value
    given as well (`loop=LoopConfig(...)`) is the start the flat names change; a field given under both
    its old and new top-level name raises `ConfigError`."""
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flat = [k for k in kwargs if k in aliases and k not in fields]
    if not flat:
        return dict(kwargs)
    out = {k: v for k, v in kwargs.items() if k not in flat}
    tables: dict[str, dict[str, Any]] = {}
    for key in flat:
        target = aliases[key]
        if "." not in target:  # a renamed top-level field: base -> model
            if target in out:
                raise ConfigError(f"{cls.__name__}: {key!r} and {target!r} name the same field; give one")
            out[target] = kwargs[key]
            continue
        table, sub_key = target.split(".", 1)
        tables.setdefault(table, {})[sub_key] = kwargs[key]
    hints = typing.get_type_hints(cls)
    for table, values in tables.items():
        start = out.get(table)
        if start is None:
            f = fields[table]
            sub = nested_config_type(hints[table])
            start = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if start is None and sub is not None:
                start = sub()  # an optional table (SFT's lora = None): its own defaults
        if not (dataclasses.is_dataclass(start) and not isinstance(start, type)):
            raise ConfigError(f"{cls.__name__}: {table!r} must be a config table, got {start!r}")
        out[table] = dataclasses.replace(start, **values)
    return out


def flat_aliases(cls: type[_C]) -> type[_C]:
    """Class decorator (above `@dataclass`): the constructor also takes the class's `ALIASES` names
    (`fold_aliases`), so scripts written against the flat config keep working. Typed code should use
    the nested fields; mypy sees only the dataclass's own signature."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **fold_aliases(cls, kwargs))

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses assigning to a method
    return cls


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialise a flat mapping (str/int/float/bool/list, None values skipped) as TOML."""
    lines = []
    tables = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((key, value))
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string literal is a valid TOML basic string


def save_resolved_config(cfg: Any, out_dir: Path, name: str = "config") -> Path:
    """Write the final resolved config dataclass as `<out_dir>/<name>.toml` (loadable with `--config`)."""
    path = Path(out_dir) / f"{name}.toml"
    write_text_atomic(path, to_toml(config_to_dict(cfg)))
    return path
