"""The `llama2` console script: `generate`, `chat`, `infill`, and the `train` / `eval` command groups.

Bad arguments print one line (`llama2: error: ...`) and exit with status 2; any `Llama2Error` raised
while running prints one line and exits with status 1.

Config-driven commands (trainers, evaluators) are declared with `add_config_command`
(`llama2.config_cli`): a dataclass becomes `--config PATH` plus one flag per field, with precedence
dataclass defaults < config file < flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from llama2.cli_commands import BUILTIN_COMMANDS
from llama2.config_cli import add_config_command
from llama2.dtypes import DTYPE_NAMES
from llama2.errors import Llama2Error
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


# Built-in config commands (`llama2.cli_commands`): imported lazily, per group.


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
