"""Config-driven commands: a dataclass becomes `--config PATH` (TOML; YAML when pyyaml is installed)
plus one `--field-name` flag per field (`--table.field` for a nested dataclass such as SFT's `[lora]`
and `[loop]`), with precedence dataclass defaults < config file < flags. Used by `llama2 train ...` and
`llama2 eval ...` (see `llama2.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2.errors import ConfigError


@dataclass(frozen=True)
class _FieldType:
    """How a dataclass field's annotation maps to a flag and to config-file values."""

    base: Any  # int, float, str, bool, Path, or a tuple of Literal choices
    is_list: bool
    optional: bool

    def describe(self) -> str:
        name = (
            "one of " + ", ".join(map(repr, self.base))
            if isinstance(self.base, tuple)
            else self.base.__name__
        )
        name = f"a list of {name}" if self.is_list else name
        return f"{name} or null" if self.optional else name


def _field_type(annotation: Any, where: str) -> _FieldType:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{where}: unsupported union type {annotation}")
        optional, annotation = True, members[0]
        origin = typing.get_origin(annotation)
    is_list = False
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        if not args:
            raise TypeError(f"{where}: list fields need an element type, got {annotation}")
        is_list, annotation = True, args[0]
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return _FieldType(tuple(typing.get_args(annotation)), is_list, optional)
    if annotation in (int, float, str, bool, Path):
        return _FieldType(annotation, is_list, optional)
    raise TypeError(f"{where}: unsupported field type {annotation}")


def _parse_scalar(ft: _FieldType, text: str) -> Any:
    """A flag's text -> the field's value (argparse `type=`)."""
    if ft.optional and text.lower() in ("none", "null"):
        return None
    if isinstance(ft.base, tuple):
        for choice in ft.base:
            if str(choice) == text:
                return choice
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, ft.base))}, got {text!r}")
    try:
        return ft.base(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {ft.base.__name__}, got {text!r}") from None


def _scalar_parser(ft: _FieldType) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return _parse_scalar(ft, text)

    return parse


def _coerce(ft: _FieldType, value: Any, key: str, source: str) -> Any:
    """A config-file value -> the field's value, or ConfigError naming the key."""
    bad = ConfigError(f"{source}: {key!r} must be {ft.describe()}, got {value!r}")
    if value is None:
        if ft.optional:
            return None
        raise bad
    if ft.is_list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(_FieldType(ft.base, False, False), v, key, source) for v in value]
    base = ft.base
    if isinstance(base, tuple):
        if value not in base:
            raise bad
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad
        return value
    if not isinstance(value, str):  # Path
        raise bad
    return Path(value)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs the pyyaml package; use a TOML file") from None
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _nested_type(annotation: Any) -> type[Any] | None:
    """The dataclass of a nested config field (`loop: LoopConfig`, `lora: LoRAConfig | None`), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


def _nested_default(f: dataclasses.Field[Any], sub: type[Any]) -> Any:
    """The value a nested config starts from: the field's default, else the dataclass's defaults."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if dataclasses.is_dataclass(f.default) and not isinstance(f.default, type):
        return f.default
    return sub()


def _add_field_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    dest: str,
    ft: _FieldType,
    f: dataclasses.Field[Any],
    default: Any = dataclasses.MISSING,
) -> None:
    """One `--flag` for a dataclass field (see `add_config_command` for the parsing rules); `default`
    overrides the default shown in the help (a nested config's own default)."""
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    default_text = "(computed)" if has_default else "required"
    if default is not dataclasses.MISSING:
        default_text = repr(default)
    elif f.default is not dataclasses.MISSING:
        default_text = repr(f.default)
    help_text = f.metadata.get("help", "") if f.metadata else ""
    help_text = f"{help_text} (default: {default_text})".strip().replace("%", "%%")
    if ft.base is bool and not ft.is_list:
        parser.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
        return
    choices = ft.base if isinstance(ft.base, tuple) else None
    parser.add_argument(
        flag,
        dest=dest,
        type=_scalar_parser(ft),
        nargs="*" if ft.is_list else None,
        choices=choices,
        default=argparse.SUPPRESS,
        metavar=f.name.upper() if choices is None else None,
        help=help_text,
    )


def add_config_command(
    subparsers: Any,
    name: str,
    config_cls: type[Any],
    runner: Callable[[Any], object],
    help: str,
) -> argparse.ArgumentParser:
    """Add a subcommand that builds `config_cls` from defaults, a config file and flags, then runs it.

    Every dataclass field `some_name` becomes `--some-name`; its annotation gives the parsing: `int`,
    `float`, `str`, `Path`, `Literal[...]` (choices), `bool` (`--flag/--no-flag`), `X | None` (the
    value `none` gives None), `list[X]` (several values after the flag). A field whose type is itself
    a dataclass (`loop: LoopConfig`, `lora: LoRAConfig | None`) nests: its fields are the flags
    `--loop.lr`, `--lora.rank` and the keys of the file's `[loop]`, `[lora]` tables; the nested config
    starts from the field's default (for an optional one that is None: the dataclass's own defaults)
    and is built when any of its values, or its table, is given. A class attribute
    `ALIASES: dict[str, str]` maps older flat names to nested ones (`lora_rank` -> `lora.rank`; both
    `--lora-rank` and a top-level `lora_rank` key work). `--config PATH` reads a TOML file (YAML if
    the name ends in .yaml/.yml and pyyaml is installed). Precedence: dataclass defaults < config file
    < flags. Unknown or ill-typed config keys, and required fields given nowhere, raise `ConfigError`.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers()`.
        name: the subcommand's name.
        config_cls: a dataclass type.
        runner: called with the config instance; an int result becomes the exit status.
        help: one-line description for `--help`.

    Returns:
        The subcommand's parser.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"add_config_command({name!r}): {config_cls!r} is not a dataclass")
    aliases: dict[str, str] = dict(getattr(config_cls, "ALIASES", {}))
    description = (config_cls.__doc__ or help).strip()
    if aliases:  # "every --loop.X also as --X" for whole tables, pairs for the rest
        same = sorted({t.split(".")[0] for a, t in aliases.items() if t.split(".", 1)[-1] == a})
        pairs = [
            f"{_flag(a)} = --{t.replace('_', '-')}" for a, t in aliases.items() if t.split(".", 1)[-1] != a
        ]
        said = [f"every --{table}.X also as --X" for table in same] + pairs
        description += " Older flat flags still work: " + "; ".join(said) + "."
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML (or YAML) file of settings; flags override it"
    )
    hints = typing.get_type_hints(config_cls)
    specs: dict[str, _FieldType] = {}  # field name, or "table.field" for nested configs
    nested: dict[str, tuple[type[Any], dataclasses.Field[Any]]] = {}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        sub = _nested_type(hints[f.name])
        if sub is None:
            specs[f.name] = _field_type(hints[f.name], f"{config_cls.__name__}.{f.name}")
            _add_field_flag(parser, _flag(f.name), f"cfg__{f.name}", specs[f.name], f)
            continue
        nested[f.name] = (sub, f)
        sub_hints = typing.get_type_hints(sub)
        start = _nested_default(f, sub)
        for sf in dataclasses.fields(sub):
            if sf.init:
                key = f"{f.name}.{sf.name}"
                specs[key] = _field_type(sub_hints[sf.name], f"{config_cls.__name__}.{key}")
                flag, dest = "--" + key.replace("_", "-"), f"cfg__{f.name}__{sf.name}"
                _add_field_flag(parser, flag, dest, specs[key], sf, getattr(start, sf.name))
    for alias, target in aliases.items():
        if target not in specs or alias in specs:
            raise TypeError(f"{config_cls.__name__}.ALIASES: {alias!r} -> {target!r} names no free flag")
        ft = specs[target]
        flag = "--" + target.replace("_", "-")
        dest = "cfg__" + target.replace(".", "__")
        if ft.base is bool and not ft.is_list:
            parser.add_argument(
                _flag(alias), dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,  # same as `flag`; listed once, in the description
            )  # fmt: skip
        else:
            parser.add_argument(
                _flag(alias), dest=dest, type=_scalar_parser(ft), nargs="*" if ft.is_list else None,
                choices=ft.base if isinstance(ft.base, tuple) else None, default=argparse.SUPPRESS,
                metavar=target.split(".")[-1].upper(), help=argparse.SUPPRESS,  # same as `flag`
            )  # fmt: skip

    def read_file(path: Path) -> tuple[dict[str, Any], set[str]]:
        """Dotted key -> value, and the nested tables the file names."""
        values: dict[str, Any] = {}
        tables: set[str] = set()
        expected = f"expected one of {', '.join([*(k for k in specs if '.' not in k), *nested])}"
        for key, value in _read_config_file(path).items():
            if key in nested:
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: {key!r} must be a table of settings ([{key}]), got {value!r}")
                tables.add(key)
                for sub_key, sub_value in value.items():
                    dotted = f"{key}.{sub_key}"
                    if dotted not in specs:
                        raise ConfigError(
                            f"{path}: unknown setting {sub_key!r} in [{key}] for '{name}'; expected one of "
                            f"{', '.join(k.split('.', 1)[1] for k in specs if k.startswith(key + '.'))}"
                        )
                    values[dotted] = _coerce(specs[dotted], sub_value, dotted, str(path))
                continue
            dotted = aliases.get(key, key)
            if dotted not in specs:
                raise ConfigError(f"{path}: unknown setting {key!r} for '{name}'; {expected}")
            values[dotted] = _coerce(specs[dotted], value, key, str(path))
        return values, tables

    def handler(args: argparse.Namespace) -> int:
        values: dict[str, Any] = {}
        tables: set[str] = set()
        if args.config is not None:
            values, tables = read_file(args.config)
        for key in specs:
            dest = "cfg__" + key.replace(".", "__")
            if hasattr(args, dest):
                values[key] = getattr(args, dest)
        top = {k: v for k, v in values.items() if "." not in k}
        for table, (sub, f) in nested.items():
            given = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(table + ".")}
            if not given and table not in tables:
                continue
            top[table] = dataclasses.replace(_nested_default(f, sub), **given)
        for f in dataclasses.fields(config_cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.init and required and f.name not in top:
                raise ConfigError(
                    f"'{name}' needs a value for {f.name!r}: pass {_flag(f.name)} or set it in --config"
                )
        result = runner(config_cls(**top))
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    parser.set_defaults(_handler=handler)
    return parser
