"""The `llama2` console script: `generate`, `chat`, `infill`, and the `train` / `eval` command groups.

Bad arguments print one line (`llama2: error: ...`) and exit with status 2; any `Llama2Error` raised
while running prints one line and exits with status 1.

Config-driven commands (trainers, evaluators) are declared with `add_config_command`: a dataclass
becomes `--config PATH` (TOML; YAML when pyyaml is installed) plus one `--field-name` flag per field,
with precedence dataclass defaults < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from llama2.dtypes import DTYPE_NAMES
from llama2.errors import ConfigError, Llama2Error
from llama2.quant.schemes import SPEC_HELP

if TYPE_CHECKING:
    from llama2.api import Llama

PROG = "llama2"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `llama2: error: ...` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


# ================================================================================ value types
def _float_at_least(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {text}")
        return value

    return parse


def _probability(text: str) -> float:
    value = _float_at_least(0.0)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


DTYPE_CHOICES = DTYPE_NAMES  # every spelling of llama2.dtypes


def _add_model_args(p: argparse.ArgumentParser, default_model: str, default_temperature: float) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=default_model,
        help=f"checkpoint path (any supported format) or embedded model name: base, chat, code "
        f"(default: {default_model})",
    )
    g.add_argument("--tokenizer", type=Path, help="tokenizer.model or GGUF file (default: the checkpoint's)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, help="weight dtype (default: the checkpoint's)")
    g.add_argument("--quantize", metavar="SCHEME", help=SPEC_HELP)
    g.add_argument(
        "--max-seq-len", type=_int_at_least(1), help="context window in tokens (default: the checkpoint's)"
    )
    g.add_argument(
        "--threads", type=_int_at_least(1), help="CPU threads (default: one per physical core)"
    )
    g.add_argument("--quiet", action="store_true", help="no loading messages or progress bar")
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--temperature",
        type=_float_at_least(0.0),
        default=default_temperature,
        help=f"0 = greedy (default: {default_temperature})",
    )
    s.add_argument("--top-p", type=_probability, default=0.9, help="nucleus mass (default: 0.9)")
    s.add_argument("--top-k", type=_int_at_least(0), default=0, help="keep the k best tokens; 0 = off")
    s.add_argument("--min-p", type=_float_at_least(0.0), default=0.0, help="min-p threshold; 0 = off")
    s.add_argument(
        "--repetition-penalty", type=_float_at_least(1e-6), default=1.0, help="CTRL penalty; 1 = off"
    )
    s.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=256,
        help="tokens to generate at most (default: 256)",
    )
    s.add_argument("--seed", type=int, help="seed for reproducible sampling")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _load(args: argparse.Namespace) -> Llama:

    from llama2.api import Llama
    from llama2.assets import resolve_model
    from llama2.runtime import configure_threads, resolve_device

    configure_threads(args.threads)
    if args.device is not None:
        resolve_device(args.device)  # one-line ConfigError for a device this build or machine lacks
    path = resolve_model(args.model)
    if not args.quiet:
        print(f"{PROG}: loading {path}", file=sys.stderr)
    return Llama.build(
        path,
        tokenizer_path=args.tokenizer,
        max_seq_len=args.max_seq_len,
        max_batch_size=1,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed if args.seed is not None else 1,
        progress=not args.quiet,
        quantize=args.quantize,
    )


def _sampling(args: argparse.Namespace) -> Any:
    from llama2.generation import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ================================================================================ commands
def _cmd_generate(args: argparse.Namespace) -> int:
    llama = _load(args)
    ids = llama.tokenizer.encode(args.prompt, bos=True, eos=False)
    if args.echo:
        _write(args.prompt)
    for event in llama.stream(ids, args.max_new_tokens, _sampling(args), stop=args.stop):
        _write(event.text)
    _write("\n")
    return 0


def _chat_reply(llama: Llama, dialog: list[Any], args: argparse.Namespace, out: Callable[[str], None]) -> str:
    from llama2.chat import encode_dialog_with_info

    reserve = min(args.max_new_tokens, llama.max_seq_len // 2)
    encoded = encode_dialog_with_info(dialog, llama.tokenizer, max_tokens=llama.max_seq_len - reserve)
    if encoded.dropped_turns and not args.quiet:
        print(
            f"{PROG}: dropped the {encoded.dropped_turns} oldest messages to fit the context", file=sys.stderr
        )
    pieces: list[str] = []
    for event in llama.stream(encoded.tokens, args.max_new_tokens, _sampling(args), stop=args.stop):
        pieces.append(event.text)
        out(event.text)
    return "".join(pieces)


def _cmd_chat(args: argparse.Namespace) -> int:
    from llama2.errors import DialogError

    llama = _load(args)
    system: list[Any] = [{"role": "system", "content": args.system}] if args.system else []
    dialog: list[Any] = list(system)
    if args.message:
        reply = ""
        for message in args.message:
            dialog.append({"role": "user", "content": message})
            reply = _chat_reply(llama, dialog, args, lambda _text: None)
            dialog.append({"role": "assistant", "content": reply})
        _write(reply.strip() + "\n")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "Chat with the model. /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr
        )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            dialog = list(system)
            continue
        dialog.append({"role": "user", "content": text})
        try:
            reply = _chat_reply(llama, dialog, args, _write)
        except DialogError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            dialog.pop()
            continue
        _write("\n")
        dialog.append({"role": "assistant", "content": reply})
    return 0


def _cmd_infill(args: argparse.Namespace) -> int:
    llama = _load(args)
    [pred] = llama.text_infilling(
        [args.prefix],
        [args.suffix],
        temperature=args.temperature,
        top_p=args.top_p,
        max_gen_len=args.max_new_tokens,
        suffix_first=args.suffix_first,
        top_k=args.top_k,
        seed=args.seed,
    )
    _write((pred["full_text"] if args.full else pred["generation"]) + "\n")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from llama2.api import parse_dtype
    from llama2.assets import resolve_model
    from llama2.checkpoint.quantize import quantize_checkpoint

    out = quantize_checkpoint(
        resolve_model(args.model),
        args.out,
        args.scheme,
        output_format=args.format,
        tokenizer_path=args.tokenizer,
        dtype=parse_dtype(args.dtype),
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"{PROG}: wrote {out}", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from llama2.serve.server import config_from_args, run_server

    run_server(config_from_args(args))
    return 0


# ================================================================================ config commands
@dataclass(frozen=True)
class ConfigCommand:
    """A config-driven command registered under `llama2 train` or `llama2 eval`."""

    config_cls: type[Any]
    runner: Callable[[Any], object]
    help: str


TRAIN_COMMANDS: dict[str, ConfigCommand] = {}
EVAL_COMMANDS: dict[str, ConfigCommand] = {}


def register_train_command(
    name: str, config_cls: type[Any], runner: Callable[[Any], object], help: str
) -> None:
    """Add `llama2 train <name>`: `runner(config_cls(...))` with flags and `--config` from the dataclass."""
    TRAIN_COMMANDS[name] = ConfigCommand(config_cls, runner, help)


def register_eval_command(
    name: str, config_cls: type[Any], runner: Callable[[Any], object], help: str
) -> None:
    """Add `llama2 eval <name>` (see `register_train_command`)."""
    EVAL_COMMANDS[name] = ConfigCommand(config_cls, runner, help)


# Built-in config commands: group -> name -> (module, config class, runner, help). Modules are
# imported only when their group is on the command line, so `llama2 generate` never imports trainers.
BUILTIN_COMMANDS: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "train": {
        "tokenizer": (
            "llama2.train.tokenizer",
            "TokenizerTrainConfig",
            "train_tokenizer",
            "train a SentencePiece BPE tokenizer with Llama 2's settings",
        ),
        "pretrain": (
            "llama2.train.pretrain",
            "PretrainConfig",
            "run_pretrain",
            "pretrain a Llama 2-architecture model on text (the paper's recipe as defaults)",
        ),
        "code": (
            "llama2.train.code",
            "CodePretrainConfig",
            "run_code_pretrain",
            "pretrain a code model with Code Llama's fill-in-the-middle objective",
        ),
        "sft": (
            "llama2.train.sft",
            "SFTConfig",
            "run_sft",
            "supervised fine-tuning on chat dialogs (full or LoRA), loss on assistant tokens only",
        ),
    },
    "eval": {
        "perplexity": (
            "llama2.eval.perplexity",
            "PerplexityConfig",
            "run_perplexity",
            "mean NLL per token and perplexity of a model on a text or token file",
        ),
        "exact-match": (
            "llama2.eval.exact_match",
            "ExactMatchConfig",
            "run_exact_match",
            "greedy chat answers scored by the instruction suite's checkers",
        ),
        "infill": (
            "llama2.eval.infill_eval",
            "InfillEvalConfig",
            "run_infill_eval",
            "held-out fill-in-the-middle accuracy of a code model",
        ),
    },
}


def _register_builtin_commands(groups: Sequence[str]) -> None:
    """Import and register the built-in commands of the given groups ("train", "eval")."""
    import importlib

    for group in groups:
        registry = TRAIN_COMMANDS if group == "train" else EVAL_COMMANDS
        for name, (module_name, cls_name, runner_name, help_text) in BUILTIN_COMMANDS[group].items():
            if name not in registry:
                module = importlib.import_module(module_name)
                registry[name] = ConfigCommand(
                    getattr(module, cls_name), getattr(module, runner_name), help_text
                )


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


# ================================================================================ parser
def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `llama2` argument parser. The `train`/`eval` sub-commands get their full flags only when
    `argv` names that group (their modules are imported lazily)."""
    words = list(sys.argv[1:] if argv is None else argv)
    _register_builtin_commands([g for g in BUILTIN_COMMANDS if g in words[:1]])
    parser = _Parser(prog=PROG, description="The Llama 2 system: generate, chat, infill, train, evaluate.")
    from llama2 import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="continue a text prompt (streams to stdout)")
    p.add_argument("--prompt", required=True, help="text to continue (BOS is added)")
    p.add_argument(
        "--echo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the prompt before the generation",
    )
    _add_model_args(p, "base", 0.6)
    p.set_defaults(_handler=_cmd_generate)

    p = sub.add_parser("chat", help="chat in the Llama 2-Chat format (interactive, or --message)")
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--message",
        action="append",
        default=[],
        help="user message; repeat for several turns (the model answers each); prints the last answer",
    )
    _add_model_args(p, "chat", 0.6)
    p.set_defaults(_handler=_cmd_chat)

    p = sub.add_parser("infill", help="fill in code between a prefix and a suffix (Code Llama)")
    p.add_argument("--prefix", required=True, help="code before the hole")
    p.add_argument("--suffix", required=True, help="code after the hole")
    p.add_argument("--suffix-first", action="store_true", help="suffix-prefix-middle prompt order")
    p.add_argument("--full", action="store_true", help="print prefix + middle + suffix instead of the middle")
    _add_model_args(p, "code", 0.0)
    p.set_defaults(_handler=_cmd_infill)

    p = sub.add_parser(
        "quantize",
        help="write a quantized copy of a checkpoint (our format, or GGUF for llama.cpp)",
        description="Quantize a checkpoint tensor by tensor. Our format takes any scheme "
        "(int8, int4, nf4, q8_0, q4_0, q4_k, with options such as int4,groupsize=64) and records it in "
        "the file; GGUF takes f32, f16, bf16, q8_0, q4_0 or q4_k.",
    )
    p.add_argument("--model", required=True, help="source checkpoint (any format) or base/chat/code")
    p.add_argument("--out", required=True, type=Path, help="output folder (llama2) or .gguf file (gguf)")
    p.add_argument("--scheme", required=True, help="quantization scheme (see above)")
    p.add_argument("--format", choices=("llama2", "gguf"), default="llama2", help="output format")
    p.add_argument("--tokenizer", type=Path, help="tokenizer to store (default: the checkpoint's)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype of the unquantized layers (llama2 format)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(_handler=_cmd_quantize)

    bench_help = "prompt-processing / generation tokens/s, load time and peak memory (like llama-bench)"
    p = sub.add_parser("bench", help=bench_help, description=bench_help)
    if words[:1] == ["bench"]:  # torch is imported only for this command
        from llama2.bench import add_arguments as add_bench_arguments
        from llama2.bench import run as run_bench

        add_bench_arguments(p)
        p.set_defaults(_handler=run_bench)

    plan_help = "memory a model needs (weights, KV cache, activations) for a scheme, context and batch"
    p = sub.add_parser("plan", help=plan_help, description=plan_help + "; reads no tensor data")
    if words[:1] == ["plan"]:  # torch is imported only for this command
        from llama2.plan_cli import add_arguments as add_plan_arguments
        from llama2.plan_cli import run as run_plan

        add_plan_arguments(p)
        p.set_defaults(_handler=run_plan)

    serve_help = "OpenAI-compatible HTTP server with continuous batching (127.0.0.1 by default)"
    p = sub.add_parser("serve", help=serve_help, description=serve_help)
    if words[:1] == ["serve"]:  # FastAPI/uvicorn are imported only for this command
        from llama2.serve.server import add_arguments

        add_arguments(p)
        p.set_defaults(_handler=_cmd_serve)

    for group, registry, what in (("train", TRAIN_COMMANDS, "STAGE"), ("eval", EVAL_COMMANDS, "KIND")):
        names = list(dict.fromkeys([*BUILTIN_COMMANDS[group], *registry]))
        gp = sub.add_parser(group, help=f"{group} commands: {', '.join(names)}")
        gsub = gp.add_subparsers(dest=group + "_command", metavar=what, required=True)
        for name in names:
            if name in registry:
                cmd = registry[name]
                add_config_command(gsub, name, cmd.config_cls, cmd.runner, cmd.help)
            else:  # listed for --help; its flags are built when the group is on the command line
                gsub.add_parser(name, help=BUILTIN_COMMANDS[group][name][3])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llama2` command line; returns the exit status."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._handler(args))
    except Llama2Error as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
