"""Every command and code snippet of README.md runs here, read from the README on each run.

The README's contract (developers' guide): it starts with exactly two commands that work on a fresh
machine (`make run`, `make test`), and every other command and snippet is executed by the test suite.
Each fenced block is turned into tests: bash lines are expanded by bash itself and run (`llama2 ...`
through `llama2.cli.main` in one worker process, `llama2 serve` as a real server process, `curl`
against it), Python blocks are executed with the values their comments state checked, annotated
TOML/JSON blocks are validated. A block or program the harness does not know makes a test fail.

Everything the README leaves to the reader (its checkpoints, corpus, port) is made in one working
directory by the tables below, and every change to a README command is listed with its reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

from readme_support import (
    Block,
    Outcome,
    Server,
    ShellCommand,
    check_config,
    free_port,
    init_worker,
    matches,
    parse_blocks,
    parse_curl,
    record_shell_commands,
    run_cli,
    run_python,
    sse_events,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MODELS = REPO / "src" / "llama2" / "assets" / "models"
LLAMA2_TOKENIZER = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"
SERVER_DEFAULT_PORT = "8000"  # `llama2 serve` without --port
# Each port a README line names (`--port N`, `127.0.0.1:N`) becomes a free port of this run: other
# test runs share this machine. A serve line without --port gets --port 8000, the server's default.
URL_PORT = re.compile(r"\b(127\.0\.0\.1|localhost):(\d{2,5})\b")
WORKER_TIMEOUT_S = 300.0
# One torch thread in the worker and the servers, as conftest.py sets for the suite: the models are
# tiny, and on a shared 2-core machine two threads stall each other.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "LLAMA2_NUM_THREADS": "1"}


# ================================================================================ the tables
def _link(target: Path) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.symlink_to(target, target_is_directory=target.is_dir())

    return make


def _text_files(n_files: int, lines_per_file: int, offset: int = 0) -> Callable[[Path], None]:
    """A folder of text files: lines of this repository's own sources (deterministic, offline)."""

    def make(path: Path) -> None:
        path.mkdir(parents=True)
        sources = sorted((REPO / "src" / "llama2").rglob("*.py"))
        text = [line.strip() for f in sources for line in f.read_text().splitlines() if line.strip()]
        for i in range(n_files):
            start = (offset + i) * lines_per_file % max(1, len(text) - lines_per_file)
            (path / f"part{i}.txt").write_text("\n".join(text[start : start + lines_per_file]) + "\n")

    return make


def _dialogs(path: Path) -> None:
    with path.open("w") as f:
        for a in range(2, 26):
            b = a * 3 % 17
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def _held_out(path: Path) -> None:
    path.write_text((MODELS / "base" / "MODEL_CARD.md").read_text())


# The reader's files, made in the working directory every command runs in (bash's `~` is that
# directory too). name -> (how to make it, why this stands in for what the README means).
WORKDIR: dict[str, tuple[Callable[[Path], None], str]] = {
    "llama-2-7b": (_link(MODELS / "base"), "~/llama-2-7b: a Llama 2 checkpoint; the embedded base model "
                   "goes through the same loader (a 7B one cannot be downloaded or run here)"),
    "llama-2-7b-chat": (_link(MODELS / "chat"), "~/llama-2-7b-chat: likewise, the embedded chat model"),
    "checkpoints/llama-2-7b-chat": (_link(MODELS / "chat"), "a chat checkpoint: the embedded chat model"),
    "path/to/llama-2-7b-chat": (_link(MODELS / "chat"), "Llama.build's chat checkpoint: the embedded one"),
    "path/to/CodeLlama-7b": (_link(MODELS / "code"), "a Code Llama checkpoint: the embedded code model "
                             "(its tokenizer has the infilling pieces)"),
    "tokenizer.model": (_link(LLAMA2_TOKENIZER), "Llama 2's real tokenizer (../shared/fixtures): the "
                        "README states Llama 2's token ids"),
    "scripts": (_link(REPO / "scripts"), "README paths such as scripts/configs/base.toml are relative to "
                "the repository root"),
    "corpus": (_text_files(6, 400), "the reader's training text: lines of this repository's sources"),
    "held_out.txt": (_held_out, "the reader's held-out text: the base model's card"),
    "dialogs.jsonl": (_dialogs, "the reader's SFT dialogs: 24 hand-written additions"),
    "runs/chat/sft2/model": (_link(MODELS / "chat"), "the recipe's SFT model (made by "
                             "scripts/chat_pipeline.py in 13 min): the embedded chat model stands in"),
    ".cache/shakespeare/train": (_text_files(4, 300), "scripts/configs/base.toml's data, which "
                                 "scripts/get_shakespeare.sh downloads (no network in tests)"),
    ".cache/shakespeare/val": (_text_files(1, 200, offset=7), "base.toml's validation plays, likewise"),
}

# Words of a command replaced before it runs: (README words, replacement, why).
REPLACE: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("--loop.max-steps", "2000"), ("--loop.max-steps", "2"), "2 optimizer steps show the command works; "
     "2000 take hours"),
    (("--max-steps", "100"), ("--max-steps", "2"), "likewise"),
    (("--preset", "tinyllama-1.1b"), ("--model", "base"), "the same benchmark code on the embedded "
     "model: random TinyLlama weights take 2.2 GB and minutes to build here"),
]
# Text replaced inside any word of a command and inside Python blocks: (README text, replacement, why).
SUBSTRINGS: list[tuple[str, str, str]] = [
    ('top_p=0.9)', 'top_p=0.9, max_gen_len=8)', "text_completion's default length is the whole context"),
    ("max_gen_len=200,", "max_gen_len=8,", "8 tokens show the call works"),
    ('suffix_first=False)', 'suffix_first=False, max_gen_len=8)', "the default length fills the "
     "context: about a minute on 2 cores"),
]
# Flags added to a command that does not set them: command prefix -> [(flag, value or None, why)].
DEFAULT_FLAGS: dict[tuple[str, ...], list[tuple[str, str | None, str]]] = {
    ("llama2", "generate"): [("--max-new-tokens", "4", "the default 256 tokens take seconds each")],
    ("llama2", "chat"): [("--max-new-tokens", "4", "likewise")],
    ("llama2", "infill"): [("--max-new-tokens", "4", "likewise")],
    ("llama2", "train", "pretrain"): [
        ("--dim", "64", "a tiny model: the command, not the model, is under test"),
        ("--n-layers", "2", "likewise"),
        ("--n-heads", "2", "likewise"),
        ("--seq-len", "32", "a tiny run: 2 steps of 2 x 32 tokens"),
        ("--batch-size", "2", "likewise"),
        ("--eval-batches", "1", "likewise"),
        ("--no-progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "train", "sft"): [
        ("--max-steps", "2", "2 optimizer steps show the command works"),
        ("--batch-size", "2", "likewise"),
        ("--seq-len", "64", "likewise"),
        ("--eval-batches", "1", "likewise"),
        ("--no-progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "train", "preferences"): [
        ("--n-per-task", "1", "a handful of prompts: the command, not the data, is under test"),
        ("--n-harmful", "3", "likewise"),
        ("--n-benign", "2", "likewise"),
        ("--heldout-n-per-task", "1", "likewise"),
        ("--heldout-n-harmful", "2", "likewise"),
        ("--heldout-n-benign", "2", "likewise"),
        ("--samples-per-temperature", "1", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
    ],
    ("llama2", "train", "reward"): [
        ("--loop.max-steps", "2", "2 optimizer steps show the command works"),
        ("--loop.batch-size", "2", "likewise"),
        ("--loop.eval-batches", "1", "likewise"),
        ("--no-loop.progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "eval", "rejection-curve"): [
        ("--n-per-task", "1", "a handful of prompts and samples show the command works"),
        ("--k", "2", "likewise"),
        ("--temperatures", "1.0", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
    ],
    ("llama2", "train", "rejection"): [
        ("--n-per-task", "1", "a handful of prompts, 1 SFT step per iteration"),
        ("--n-harmful", "2", "likewise"),
        ("--n-benign", "2", "likewise"),
        ("--k", "2", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
        ("--val-fraction", "0", "likewise"),
        ("--loop.max-steps", "1", "likewise"),
        ("--loop.batch-size", "2", "likewise"),
        ("--no-loop.progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "train", "ppo"): [
        ("--n-prompts-per-task", "1", "one rollout of 4 prompts, 2 PPO steps"),
        ("--rollout-batch", "4", "likewise"),
        ("--mini-batch", "2", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
        ("--heldout-n-per-task", "1", "likewise"),
        ("--loop.max-steps", "2", "likewise"),
        ("--no-loop.progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "train", "gatt"): [
        ("--n-dialogs", "4", "a handful of 2-turn dialogs and 1 SFT step"),
        ("--max-turns", "2", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
        ("--val-fraction", "0", "likewise"),
        ("--loop.max-steps", "1", "likewise"),
        ("--loop.batch-size", "2", "likewise"),
        ("--no-loop.progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "train", "dpo"): [
        ("--loop.max-steps", "2", "2 optimizer steps show the command works"),
        ("--loop.batch-size", "2", "likewise"),
        ("--loop.eval-batches", "1", "likewise"),
        ("--no-loop.progress", None, "no progress bar in the test log"),
    ],
    ("llama2", "eval", "recipe"): [
        ("--n-per-task", "1", "one held-out item per task and a few safety prompts per stage"),
        ("--benign-n", "2", "likewise"),
        ("--gatt-dialogs", "2", "likewise"),
        ("--max-new-tokens", "8", "likewise"),
    ],
    ("llama2", "bench"): [
        ("--n-prompt", "16", "pp16/tg2 once show the command works; pp512/tg128 x3 take minutes"),
        ("--n-gen", "2", "likewise"),
        ("--repetitions", "1", "likewise"),
    ],
}
# What an interactive command reads on stdin: command prefix -> the typed lines.
STDIN: dict[tuple[str, ...], str] = {
    ("llama2", "chat"): "Hi\n/reset\nWhat is 2 plus 2?\n/exit\n",
}
# Exit status a command must end with, from what it printed: command prefix -> (rule, why). Others: 0.
EXIT_STATUS: dict[tuple[str, ...], tuple[Callable[[str], int], str]] = {
    ("llama2", "plan"): (
        lambda out: 0 if re.search(r"^fits.*\byes$", out, re.MULTILINE) else 1,
        "the README: exit status 1 when the model will not fit this machine (70b here: it does not)",
    ),
}
# README commands that fail because of a bug in src/ (README text -> the bug): strict xfail, so the
# test reports the fix.
KNOWN_BROKEN: dict[str, str] = {
}
# README commands that cannot run in the test suite (README text -> why). Never a silent skip.
CANNOT_RUN: dict[str, str] = {
    "make run": "sets up .venv, which this suite already runs in (CI runs both on a fresh clone)",
    "make test": "runs this test suite",
}


# ================================================================================ reading the README
@dataclass(frozen=True)
class Case:
    """One test: a shell command, or a whole Python/TOML/JSON/plain block."""

    id: str
    block: Block
    command: ShellCommand | None = None


def _blocks() -> list[Block]:
    return parse_blocks(README.read_text())


def _first_block_commands(block: Block) -> list[str]:
    lines = [re.sub(r"\s+#.*", "", line).strip() for line in block.text.splitlines()]
    return [line for line in lines if line]


def _cases() -> list[Case]:
    blocks = _blocks()
    shell = [b for b in blocks[1:] if b.lang in ("bash", "sh", "shell", "console")]
    commands = record_shell_commands(shell, Path("/nonexistent-readme-home"), REPO)
    cases: list[Case] = []
    for block in blocks[1:]:
        if block in shell:
            for c in commands:
                if block.line <= c.line < block.line + block.text.count("\n"):
                    cases.append(Case(c.id, block, c))
        else:
            cases.append(Case(block.id, block))
    return cases


CASES = _cases()


def _param(case: Case) -> Any:
    source = case.command.source if case.command else ""
    marks = []
    if source in KNOWN_BROKEN:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[source]))
    return pytest.param(case, id=case.id, marks=marks)


# ================================================================================ the run's context
class Context:
    """The working directory, the worker process and the server shared by this module's tests."""

    def __init__(self, workdir: Path, logs: Path) -> None:
        self.workdir = workdir
        self.logs = logs
        self.ports: dict[str, int] = {}  # README port -> this run's port
        self.servers: dict[str, Server] = {}  # README port -> its running server
        self.pool = ProcessPoolExecutor(
            max_workers=1, mp_context=get_context("spawn"), initializer=init_worker, initargs=(ONE_THREAD,)
        )
        # Expand the README's shell lines again with `~` as the working directory.
        blocks = [c.block for c in CASES if c.command is not None]
        unique = list(dict.fromkeys(blocks))
        self.commands = {
            (c.line, c.source): c for c in record_shell_commands(unique, workdir, workdir)
        }

    def expanded(self, command: ShellCommand) -> ShellCommand:
        return self.commands[(command.line, command.source)]

    def call(self, fn: Callable[..., Outcome], *args: Any) -> Outcome:
        return self.pool.submit(fn, *args).result(timeout=WORKER_TIMEOUT_S)

    def port(self, readme_port: str) -> int:
        return self.ports.setdefault(readme_port, free_port())

    def start_server(self, readme_port: str, argv: Sequence[str], env: dict[str, str], name: str) -> Server:
        self.stop_server(readme_port)
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA2_API_KEY")}
        server_env.update(env)
        server_env.update(PYTHONUNBUFFERED="1", **ONE_THREAD)
        server = Server(argv, self.port(readme_port), self.workdir, server_env, self.logs / f"{name}.log")
        self.servers[readme_port] = server
        server.wait_healthy(timeout=300)  # a first run may compile the C++ kernels
        return server

    def stop_server(self, readme_port: str) -> int | None:
        server = self.servers.pop(readme_port, None)
        return None if server is None else server.stop()

    def close(self) -> None:
        for readme_port in list(self.servers):
            self.stop_server(readme_port)
        self.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    workdir = tmp_path_factory.mktemp("readme_workdir")
    for name, (make, _why) in WORKDIR.items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    for block in _blocks():
        target = _toml_target(block)
        if target is not None:  # the files the README shows are on the reader's disk too
            (workdir / target[0]).write_text(block.text)
    context = Context(workdir, tmp_path_factory.mktemp("readme_logs"))
    yield context
    context.close()


# ================================================================================ substitutions
def _prefix(argv: Sequence[str]) -> tuple[str, ...]:
    """The command's program and sub-commands (`llama2 train sft`, `python -m llama2.serve.server`)."""
    words = [Path(argv[0]).name, *argv[1:]]
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        return tuple(words[:3])
    out = [words[0]]
    for w in words[1:3]:
        if w.startswith("-"):
            break
        out.append(w)
    return tuple(out)


def _matching_prefix(table: dict[tuple[str, ...], Any], argv: Sequence[str]) -> tuple[str, ...] | None:
    prefix = _prefix(argv)
    keys = [k for k in table if prefix[: len(k)] == k]
    return max(keys, key=len) if keys else None


def with_defaults(argv: Sequence[str]) -> list[str]:
    """The README command with the tables' replacements and added flags (ports still the README's)."""
    words = list(argv)
    for old, new, _why in REPLACE:
        for i in range(len(words) - len(old) + 1):
            if tuple(words[i : i + len(old)]) == old:
                words[i : i + len(old)] = new
    for old_text, new_text, _why in SUBSTRINGS:
        words = [w.replace(old_text, new_text) for w in words]
    key = _matching_prefix(DEFAULT_FLAGS, words)
    for flag, value, _why in DEFAULT_FLAGS.get(key, []) if key else []:
        negative = "--no-" + flag[2:]
        if flag not in words and negative not in words and not any(w.startswith(flag + "=") for w in words):
            words += [flag] if value is None else [flag, value]
    # a server's default port, made explicit to be mapped to a free one
    if _is_server(words) and not any(w == "--port" or w.startswith("--port=") for w in words):
        words += ["--port", SERVER_DEFAULT_PORT]
    return words


def readme_ports(words: Sequence[str]) -> list[str]:
    """The ports a command names: its `--port` value and the ports of its URLs."""
    ports = [b for a, b in itertools.pairwise(words) if a == "--port"]
    ports += [w.split("=", 1)[1] for w in words if w.startswith("--port=")]
    return ports + [m[2] for w in words for m in URL_PORT.finditer(w)]


def substitute(argv: Sequence[str], ctx: Context) -> list[str]:
    """`with_defaults`, then every README port mapped to this run's port."""
    words = with_defaults(argv)
    out = []
    for i, w in enumerate(words):
        if i > 0 and words[i - 1] == "--port":
            w = str(ctx.port(w))
        elif w.startswith("--port="):
            w = f"--port={ctx.port(w.split('=', 1)[1])}"
        out.append(URL_PORT.sub(lambda m: f"{m[1]}:{ctx.port(m[2])}", w))
    return out


def substitute_source(source: str, ctx: Context) -> str:
    for old_text, new_text, _why in SUBSTRINGS:
        source = source.replace(old_text, new_text)
    return URL_PORT.sub(lambda m: f"{m[1]}:{ctx.port(m[2])}", source)


# ================================================================================ the tests
def test_readme_starts_with_the_two_setup_commands() -> None:
    text = README.read_text()
    first = _blocks()[0]
    head = text.split("```", 1)[0].strip().splitlines()
    assert head == ["# llama2"], f"README must start with its title and then the set-up block, got {head}"
    assert first.lang == "bash"
    assert _first_block_commands(first) == ["make run", "make test"]


def test_tables_name_only_what_the_readme_has() -> None:
    """A table entry whose README text is gone fails here, so the tables cannot go stale."""
    text = README.read_text()
    commands = [c.command for c in CASES if c.command is not None]
    sources = {c.source for c in commands}
    configs = "".join(
        (REPO / w).read_text()
        for c in commands
        for flag, w in zip(c.argv, c.argv[1:], strict=False)
        if flag == "--config" and (REPO / w).is_file()
    )
    for name in WORKDIR:
        assert name in text or name in configs, f"WORKDIR names {name!r}, which the README no longer uses"
    for old, _new, _why in REPLACE:
        assert any(" ".join(old) in " ".join(c.argv) for c in commands), f"REPLACE: {old} not in README"
    for old_text, _new, _why in SUBSTRINGS:
        assert old_text in text, f"SUBSTRINGS: {old_text!r} not in the README"
    for table in (DEFAULT_FLAGS, STDIN, EXIT_STATUS):
        for prefix in table:
            assert any(_prefix(c.argv)[: len(prefix)] == prefix for c in commands), f"no README {prefix}"
    for prefix, flags in DEFAULT_FLAGS.items():
        lines = [c.argv for c in commands if _prefix(c.argv)[: len(prefix)] == prefix]
        for flag, _value, _why in flags:
            assert any(flag not in argv for argv in lines), f"DEFAULT_FLAGS {prefix}: every line sets {flag}"
    first = set(_first_block_commands(_blocks()[0]))
    for source in [*KNOWN_BROKEN, *CANNOT_RUN]:
        assert source in sources or source in first, f"no README command {source!r} (table is stale)"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_readme(case: Case, ctx: Context) -> None:
    if case.command is not None:
        if case.command.source in CANNOT_RUN:
            pytest.skip(f"listed in CANNOT_RUN: {CANNOT_RUN[case.command.source]}")
        _run_shell(ctx, ctx.expanded(case.command), case)
    elif case.block.lang == "python":
        _run_python_block(ctx, case)
    elif case.block.lang == "toml":
        _check_toml(ctx, case.block)
    elif case.block.lang == "json":
        _check_json(ctx, case.block)
    elif case.block.lang == "" and case.block.text.startswith("src/llama2/"):
        _check_layout(case.block)
    else:
        pytest.fail(
            f"README block at line {case.block.line} ({case.block.lang or 'no language'}) has no runner: "
            "teach tests/test_readme.py to execute it"
        )


# ---------------------------------------------------------------- shell commands
def _client_ports(case: Case) -> list[str]:
    """README ports a case talks to as a client (URLs in its words or its block)."""
    text = " ".join(case.command.argv) if case.command is not None else case.block.text
    return [m[2] for m in URL_PORT.finditer(text)]


def _is_server(argv: Sequence[str]) -> bool:
    prefix = _prefix(argv)
    return prefix[:2] == ("llama2", "serve") or prefix == ("python", "-m", "llama2.serve.server")


def _server_port(command: ShellCommand) -> str:
    return readme_ports(with_defaults(command.argv))[0]


def _ensure_servers_for(ctx: Context, case: Case) -> None:
    """Start, for each port the case talks to, the nearest earlier README serve line on that port
    (unless it already runs)."""
    for port in dict.fromkeys(_client_ports(case)):
        servers = [
            c.command
            for c in CASES
            if c.command is not None
            and c.command.line < _case_line(case)
            and _is_server(c.command.argv)
            and _server_port(c.command) == port
        ]
        if not servers:
            pytest.fail(f"README line {_case_line(case)} talks to port {port}, which no earlier line serves")
        command = ctx.expanded(servers[-1])
        argv = _server_argv(substitute(command.argv, ctx))
        running = ctx.servers.get(port)
        if running is None or running.argv != tuple(argv) or running.proc.poll() is not None:
            ctx.start_server(port, argv, dict(command.env), f"L{command.line}-for-{case.id}")


def _case_line(case: Case) -> int:
    return case.command.line if case.command is not None else case.block.line


def _server_argv(words: Sequence[str]) -> list[str]:
    if words[0] == "llama2":
        return [sys.executable, "-m", "llama2", *words[1:]]
    return [sys.executable, *words[1:]]


def _run_shell(ctx: Context, command: ShellCommand, case: Case) -> None:
    argv = substitute(command.argv, ctx)
    program = Path(argv[0]).name
    if _is_server(argv):
        _run_server_command(ctx, command, argv, case)
    elif program == "llama2" or (program in ("python", "python3") and argv[1:3] == ["-m", "llama2"]):
        words = argv[1:] if program == "llama2" else argv[3:]
        key = _matching_prefix(STDIN, ["llama2", *words])
        stdin = STDIN[key] if key is not None and "--message" not in words else ""
        outcome = ctx.call(run_cli, words, command.cwd, dict(command.env), stdin)
        status = _matching_prefix(EXIT_STATUS, argv)
        _assert_ok(outcome, argv, EXIT_STATUS[status][0](outcome.stdout) if status else 0)
        _assert_outputs_exist(words, Path(command.cwd))
    elif program in ("python", "python3"):
        proc = subprocess.run(
            [sys.executable, *argv[1:]], cwd=command.cwd, capture_output=True, text=True, timeout=300,
            env={**os.environ, **command.env}, check=False,
        )
        _assert_ok(Outcome(proc.returncode, proc.stdout, proc.stderr), argv)
    elif program == "curl":
        _ensure_servers_for(ctx, case)
        _run_curl(ctx, argv)
    else:
        pytest.fail(f"README line {command.line}: no runner for program {program!r}; teach test_readme.py")


def _assert_ok(outcome: Outcome, argv: Sequence[str], status: int = 0) -> None:
    shown = " ".join(argv)
    output = f"{outcome.stderr[-3000:]}\n{outcome.stdout[-1000:]}"
    assert outcome.rc == status, f"`{shown}` exited {outcome.rc}, expected {status}:\n{output}"
    assert "Traceback" not in outcome.stderr, f"`{shown}` printed a traceback:\n{output}"


def _assert_outputs_exist(words: Sequence[str], cwd: Path) -> None:
    for flag, value in itertools.pairwise(words):
        if flag in ("--out", "--out-dir"):
            assert (cwd / value).exists(), f"{flag} {value} was not written"


def _run_server_command(ctx: Context, command: ShellCommand, argv: Sequence[str], case: Case) -> None:
    """Start the server, check it answers, and leave it running only if a later case is its client."""
    import httpx

    port = _server_port(command)
    server = ctx.start_server(port, _server_argv(argv), dict(command.env), case.id)
    models = httpx.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=30)
    assert models.status_code in (200, 401), models.text
    if not any(port in _client_ports(c) for c in CASES if _case_line(c) > command.line):
        rc = ctx.stop_server(port)
        assert rc == 0, f"server exited {rc} after SIGTERM:\n{server.output()}"


def _run_curl(ctx: Context, argv: Sequence[str]) -> None:
    import httpx

    request = parse_curl(argv)
    with httpx.Client(timeout=120) as client:
        r = client.request(request.method, request.url, headers=request.headers, content=request.body)
    logs = "\n".join(s.output() for s in ctx.servers.values())
    assert r.status_code == 200, f"`{' '.join(argv)}` answered {r.status_code}: {r.text}\n{logs}"
    body = json.loads(request.body) if request.body else {}
    if body.get("stream"):
        events = sse_events(r.text)
        assert events and events[-1] == "[DONE]", r.text
        assert all(isinstance(json.loads(e), dict) for e in events[:-1])
    else:
        answer = r.json()
        assert "choices" in answer or "data" in answer or "status" in answer, answer


# ---------------------------------------------------------------- Python blocks
def _run_python_block(ctx: Context, case: Case) -> None:
    source = substitute_source(case.block.text, ctx)
    _ensure_servers_for(ctx, case)
    outcome = ctx.call(run_python, source, str(ctx.workdir), {})
    assert outcome.rc == 0, f"README block at line {case.block.line} raised:\n{outcome.stderr[-4000:]}"
    assert not outcome.failures, "\n".join(outcome.failures)


# ---------------------------------------------------------------- TOML / JSON / layout blocks
TOML_INFO = re.compile(r"^(?P<file>\S+\.toml)\s+for\s+llama2\s+(?P<group>train|eval)\s+(?P<name>[\w-]+)$")


def _toml_target(block: Block) -> tuple[str, str, str] | None:
    m = TOML_INFO.match(block.info.strip()) if block.lang == "toml" else None
    return None if m is None else (m["file"], m["group"], m["name"])


def _check_toml(ctx: Context, block: Block) -> None:
    """A TOML block says which file it is and for which command (```toml run.toml for llama2 train
    pretrain); it must load through that command's own config reader, unknown keys failing."""
    target = _toml_target(block)
    if target is None:
        pytest.fail(
            f"README TOML block at line {block.line} needs an info string like "
            "'toml run.toml for llama2 train pretrain'"
        )
    outcome = ctx.call(check_config, block.text, *target)
    assert outcome.rc == 0, f"README TOML block at line {block.line}:\n{outcome.stderr[-3000:]}"


def _check_json(ctx: Context, block: Block) -> None:
    """A JSON block annotated with an endpoint (```json POST /v1/completions) is sent to the server."""
    m = re.match(r"^(GET|POST)\s+(/\S+)(\s+\d+)?$", block.info.strip())
    if m is None:
        pytest.fail(
            f"README JSON block at line {block.line} needs an info string like 'json POST /v1/completions'"
        )
    import httpx

    port = block.info.split()[2] if len(block.info.split()) > 2 else SERVER_DEFAULT_PORT
    case = Case(block.id, replace(block, text=f"127.0.0.1:{port}"))
    _ensure_servers_for(ctx, case)
    url = f"http://127.0.0.1:{ctx.port(port)}{m[2]}"
    r = httpx.request(m[1], url, json=json.loads(block.text), timeout=120)
    assert r.status_code == 200, r.text


def _check_layout(block: Block) -> None:
    """The layout block: every folder and file it names exists."""
    missing = []
    top = REPO
    folder = top
    for raw in block.text.splitlines():
        line = re.sub(r"\([^)]*\)", "", raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        words = line.split()
        if indent == 0:
            top = REPO / words[0]
            folder = top
            if not top.exists():
                missing.append(words[0])
            continue
        if indent <= 2:
            folder = top
        for k, word in enumerate(words):
            if word.endswith("/") and indent <= 2 and k == 0:
                folder = top / word
                if not folder.is_dir():
                    missing.append(str(folder.relative_to(REPO)))
            elif re.fullmatch(r"[\w./]+\.(py|cpp)|[\w]+/", word):
                path = folder / word
                if not path.exists():
                    missing.append(str(path.relative_to(REPO)))
    assert not missing, f"the README's layout names paths that do not exist: {missing}"


# ================================================================================ the harness itself
def test_comment_checks_catch_a_wrong_value(tmp_path: Path) -> None:
    source = "1 + 1  # 3\n[1, 2]\n# [1, 2]\n'abc'  # 'a...'\nx = 5  # 6 (not an expression: prose)\n"
    outcome = run_python(source, str(tmp_path), {})
    assert outcome.rc == 0, outcome.stderr
    assert len(outcome.failures) == 1 and "# 3" in outcome.failures[0] and "value 2" in outcome.failures[0]


def test_elided_values_match_only_their_shape() -> None:
    assert matches(" ...", "ER ") and matches("...", "") and matches("a...z", "abcz")
    assert not matches("a...z", "abc") and not matches("...", 3)
    assert matches([{"generation": "..."}], [{"generation": "x"}])
    assert not matches([{"generation": "..."}], [{"generation": "x", "extra": 1}])
    assert not matches([1, 2], [1, 2, 3]) and not matches(1, True) and not matches([1], (1,))


def test_shell_lines_expand_as_bash_does(tmp_path: Path) -> None:
    text = (
        "llama2 infill --prefix $'a\\n  ' --model ~/m  # comment\n"
        "# a comment line\n"
        "curl -s http://127.0.0.1:8000/x \\\n  -d '{\"a\":\n 1}'\n"
        "LLAMA2_API_KEY=k llama2 serve\n"
    )
    commands = record_shell_commands([Block("bash", "", 10, text)], tmp_path, tmp_path)
    assert [c.line for c in commands] == [10, 12, 15]
    assert commands[0].argv == ("llama2", "infill", "--prefix", "a\n  ", "--model", f"{tmp_path}/m")
    assert commands[0].source == "llama2 infill --prefix $'a\\n  ' --model ~/m"
    assert commands[1].argv == ("curl", "-s", "http://127.0.0.1:8000/x", "-d", '{"a":\n 1}')
    assert commands[2].env == {"LLAMA2_API_KEY": "k"} and commands[2].argv == ("llama2", "serve")


def test_tables_add_flags_only_where_the_readme_sets_none() -> None:
    assert with_defaults(["llama2", "generate", "--prompt", "x"])[-2:] == ["--max-new-tokens", "4"]
    assert with_defaults(["llama2", "generate", "--max-new-tokens", "100"]) == [
        "llama2", "generate", "--max-new-tokens", "100"
    ]
    assert readme_ports(with_defaults(["llama2", "serve", "--model", "m"])) == [SERVER_DEFAULT_PORT]
    assert readme_ports(["curl", "http://127.0.0.1:8001/v1"]) == ["8001"]


def test_unknown_blocks_and_options_fail(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="no runner"):
        test_readme(Case("x", Block("ruby", "", 1, "puts 1\n")), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--insecure"):
        parse_curl(["curl", "--insecure", "http://127.0.0.1:8000/health"])
    with pytest.raises(AssertionError, match=r"nowhere\.py"):
        _check_layout(Block("", "", 1, "src/llama2/\n  cli.py  nowhere.py\n"))
    _check_layout(Block("", "", 1, "src/llama2/\n  cli.py (the CLI)\n  model/  layers.py\n"))
