"""Helpers of tests/test_readme.py: read README.md's code blocks, expand its shell lines exactly as bash
would, check the values a Python comment states, and run commands in a worker process or a server.

Nothing here knows any particular README line: the tables of substitutions live in test_readme.py.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ================================================================================ blocks
FENCE = re.compile(r"^```(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, the rest of the info string, and its body."""

    lang: str  # first word of the info string ("" when none)
    info: str  # the rest of the info string (annotations such as a file name)
    line: int  # 1-based README line of the first body line
    text: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'plain'}"


def parse_blocks(markdown: str) -> list[Block]:
    """Every fenced code block of a Markdown text, in order; an unclosed fence raises ValueError."""
    blocks: list[Block] = []
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        words = m.group(1).strip().split(maxsplit=1)
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README line {i + 1}: code block is never closed")
        lang = words[0] if words else ""
        info = words[1] if len(words) > 1 else ""
        blocks.append(Block(lang, info, start + 1, "\n".join(lines[start:j]) + "\n"))
        i = j + 1
    return blocks


# ================================================================================ shell lines
@dataclass(frozen=True)
class ShellCommand:
    """One simple command of a bash block, expanded by bash itself (quotes, $'...', ~, $VAR, `\\`)."""

    line: int  # README line where the command starts
    source: str  # the README text of the command (continuation lines joined), comment removed
    argv: tuple[str, ...]
    cwd: str  # bash's $PWD when the command ran
    env: Mapping[str, str]  # LLAMA2_* variables in effect (exported or given as VAR=value prefixes)

    @property
    def id(self) -> str:
        words = [Path(self.argv[0]).name]
        for w in self.argv[1:4]:
            if w.startswith("-") and w != "-m":
                break
            words.append(Path(w).name if "://" not in w else w.rsplit("/", 1)[-1])
        return f"L{self.line}-" + "-".join(words)


_RECORDER = r"""
command_not_found_handle() {
  printf '%s\036%s\036' "$((README_OFFSET + BASH_LINENO[0]))" "$PWD"
  for v in ${!LLAMA2_@}; do printf '%s=%s\036' "$v" "${!v}"; done
  printf '\035'
  printf '%s\037' "$1" "${@:2}"
  printf '\034'
  return 0
}
for f in "$@"; do
  README_OFFSET="${f##*/}"; README_OFFSET="$((${README_OFFSET%%.sh} - 1))"
  source "$f"
done
"""


def _source_lines(block: Block) -> dict[int, str]:
    """README line -> the logical command text starting there (`\\` continuations and open quotes
    joined, trailing comment dropped), for naming commands in test ids and tables."""
    out: dict[int, str] = {}
    lines = block.text.rstrip("\n").split("\n")
    i = 0
    while i < len(lines):
        start = i
        text = lines[i]
        while (text.endswith("\\") or _open_quote(text)) and i + 1 < len(lines):
            i += 1
            text = (text[:-1] if text.endswith("\\") else text + "\n") + lines[i]
        out[block.line + start] = _strip_comment(text).strip()
        i += 1
    return out


def _scan(text: str) -> tuple[str | None, int | None]:
    """(open quote char or None, index of a `#` comment outside quotes or None)."""
    quote: str | None = None
    k = 0
    while k < len(text):
        c = text[k]
        if quote is None:
            if c in "'\"":
                quote = c
            elif c == "\\":
                k += 1
            elif c == "#" and (k == 0 or text[k - 1].isspace()):
                return None, k
        elif c == quote:
            quote = None
        elif c == "\\" and quote == '"':
            k += 1
        k += 1
    return quote, None


def _open_quote(text: str) -> bool:
    return _scan(text)[0] is not None


def _strip_comment(text: str) -> str:
    at = _scan(text)[1]
    return text if at is None else text[:at]


def record_shell_commands(blocks: Sequence[Block], home: Path, cwd: Path) -> list[ShellCommand]:
    """Expand every command of the given bash blocks with bash, running none of them.

    The blocks are sourced in order by one `bash` whose PATH holds nothing, so each command ends in
    `command_not_found_handle`, which prints its words as bash expanded them. Builtins (`cd`,
    `export`) do run, so the directory and exported variables carry over as in a user's shell;
    `~` expands to `home`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for b in blocks:
            f = Path(tmp) / f"{b.line}.sh"
            f.write_text(b.text)
            files.append(str(f))
        env = {"HOME": str(home), "PATH": "/nonexistent", "LANG": "C.UTF-8"}
        bash = shutil.which("bash")
        if bash is None:
            raise ValueError("the README's shell blocks are read with bash, which is not installed")
        proc = subprocess.run(
            [bash, "--noprofile", "--norc", "-c", _RECORDER, "bash", *files],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if proc.returncode != 0 or proc.stderr.strip():
        raise ValueError(f"bash could not read the README's shell blocks: {proc.stderr.strip()}")
    sources: dict[int, str] = {}
    for b in blocks:
        sources.update(_source_lines(b))
    commands = []
    for record in proc.stdout.split("\034")[:-1]:
        head, words = record.split("\035")
        line, pwd, *env_items = head.split("\036")[:-1]
        commands.append(
            ShellCommand(
                line=int(line),
                source=sources.get(int(line), ""),
                argv=tuple(words.split("\037")[:-1]),
                cwd=pwd,
                env=dict(item.split("=", 1) for item in env_items),
            )
        )
    return commands


# ================================================================================ Python checks
@dataclass(frozen=True)
class Check:
    """A README comment that states the value of the expression statement before it."""

    line: int  # line of the statement inside the block (1-based)
    expected: Any
    comment: str


def _comment_literal(comment: str) -> tuple[bool, Any]:
    text = comment.lstrip("#").strip()
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def expression_checks(source: str) -> dict[int, Check]:
    """Top-level expression statements whose trailing comment (same line) or next-line comment is a
    Python literal: statement index -> the check. Prose comments are not checks."""
    lines = source.split("\n")
    tree = ast.parse(source)
    checks: dict[int, Check] = {}
    for index, stmt in enumerate(tree.body):
        if not isinstance(stmt, ast.Expr) or stmt.end_lineno is None or stmt.end_col_offset is None:
            continue
        candidates = [lines[stmt.end_lineno - 1][stmt.end_col_offset :].strip()]
        if stmt.end_lineno < len(lines):
            candidates.append(lines[stmt.end_lineno].strip())
        for text in candidates:
            if text.startswith("#"):
                ok, value = _comment_literal(text)
                if ok:
                    checks[index] = Check(stmt.lineno, value, text)
                    break
    return checks


def matches(expected: Any, actual: Any) -> bool:
    """`actual == expected`, where a string holding `...` matches any string with the text around
    the `...` as prefix/suffix (`'...'` alone: any string) and a bare `...` matches anything."""
    if expected is Ellipsis:
        return True
    if isinstance(expected, str) and "..." in expected:
        if not isinstance(actual, str):
            return False
        head, _, tail = expected.strip().partition("...")
        return actual.strip().startswith(head) and actual.strip().endswith(tail)
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(actual) == set(expected)
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list | tuple):
        return (
            type(actual) is type(expected)
            and len(actual) == len(expected)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual) and type(expected) is type(actual)


# ================================================================================ worker functions
# Run in one spawned worker process (see test_readme.py): torch is imported once for all commands,
# and the directory, environment, stdio and thread changes of a command never reach pytest.
@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    failures: list[str] = field(default_factory=list)


def init_worker(env: Mapping[str, str]) -> None:
    """Set the worker's environment before torch is imported there."""
    os.environ.update(env)


@contextlib.contextmanager
def _process_state(cwd: str, env: Mapping[str, str], stdin: str) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    old_streams = sys.stdin, sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    os.environ.update(env)
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        yield out, err
    finally:
        sys.stdin, sys.stdout, sys.stderr = old_streams
        os.environ.clear()
        os.environ.update(old_env)
        os.chdir(old_cwd)


def run_cli(argv: Sequence[str], cwd: str, env: Mapping[str, str], stdin: str) -> Outcome:
    """`llama2 ARGV` as `llama2.cli.main` runs it; an escaping exception is a failure (rc 99)."""
    from llama2.cli import main

    with _process_state(cwd, env, stdin) as (out, err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            err.write(traceback.format_exc())
            rc = 99
    return Outcome(rc, out.getvalue(), err.getvalue())


def run_python(source: str, cwd: str, env: Mapping[str, str]) -> Outcome:
    """Execute a README Python block statement by statement in a fresh namespace, checking each value
    a comment states (see `expression_checks`)."""
    checks = expression_checks(source)
    tree = ast.parse(source)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    failures: list[str] = []
    with _process_state(cwd, env, "") as (out, err):
        try:
            for index, stmt in enumerate(tree.body):
                check = checks.get(index)
                if check is None:
                    exec(compile(ast.Module([stmt], []), "<README>", "exec"), namespace)
                    continue
                expr = ast.Expression(stmt.value) if isinstance(stmt, ast.Expr) else None
                assert expr is not None
                value = eval(compile(expr, "<README>", "eval"), namespace)
                if not matches(check.expected, value):
                    failures.append(f"block line {check.line}: comment {check.comment}, value {value!r}")
            rc = 0
        except BaseException:
            err.write(traceback.format_exc())
            rc = 99
    return Outcome(rc, out.getvalue(), err.getvalue(), failures)


def check_config(text: str, file_name: str, group: str, name: str) -> Outcome:
    """Load a README TOML block as `llama2 GROUP NAME --config FILE` would, through the command's own
    config reader (`llama2.cli.add_config_command`), without running the command."""
    import argparse

    from llama2 import cli

    if name not in cli.BUILTIN_COMMANDS.get(group, {}):
        return Outcome(1, "", f"no command llama2 {group} {name}")
    cli._register_builtin_commands([group])
    command = (cli.TRAIN_COMMANDS if group == "train" else cli.EVAL_COMMANDS)[name]
    built: list[Any] = []
    parser = argparse.ArgumentParser()
    cli.add_config_command(parser.add_subparsers(), name, command.config_cls, built.append, command.help)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / file_name
        config.write_text(text)
        try:
            args = parser.parse_args([name, "--config", str(config)])
            args._handler(args)
        except BaseException:
            return Outcome(1, "", traceback.format_exc())
    if len(built) != 1 or not isinstance(built[0], command.config_cls):
        return Outcome(1, "", f"the config reader built {built!r}")
    return Outcome(0, repr(built[0]), "")


# ================================================================================ curl
@dataclass(frozen=True)
class CurlRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: str | None
    stream_output: bool  # -N: the README expects a streamed answer


def parse_curl(argv: Sequence[str]) -> CurlRequest:
    """The request a `curl` command line makes; options this parser does not know raise ValueError."""
    method: str | None = None
    url: str | None = None
    headers: dict[str, str] = {}
    body: str | None = None
    stream = False
    words = list(argv[1:])
    while words:
        w = words.pop(0)
        if w in ("-s", "--silent", "-S", "--show-error", "-f", "--fail"):
            continue
        if w in ("-N", "--no-buffer"):
            stream = True
        elif w in ("-H", "--header"):
            name, _, value = words.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif w in ("-d", "--data", "--data-raw"):
            body = words.pop(0)
        elif w in ("-X", "--request"):
            method = words.pop(0)
        elif not w.startswith("-") and url is None:
            url = w
        else:
            raise ValueError(f"curl option {w!r} is not understood by tests/readme_support.parse_curl")
    if url is None:
        raise ValueError("curl command without a URL")
    return CurlRequest(method or ("POST" if body is not None else "GET"), url, headers, body, stream)


# ================================================================================ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process started from a README line; healthy once GET /health answers 200."""

    def __init__(self, argv: Sequence[str], port: int, cwd: Path, env: Mapping[str, str], log: Path) -> None:
        self.argv = tuple(argv)
        self.port = port
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server did not answer /health within {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the README's graceful stop), then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent-events body."""
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
