"""The package's shape: no import cycles (every `llama2.*` import counts, at module level, inside
functions and under TYPE_CHECKING) and no Python file over 500 lines."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500


def _module(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name imported from a package that is itself a
    module, `from llama2.quant import config`, counts as that module)."""
    modules = {_module(p, src): p for p in sorted((src / "llama2").rglob("*.py"))}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                found = owner(target) if target.startswith("llama2") else None
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        cycle: list[str] = e.args[1]
        return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_relative_and_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "llama2"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llama2.sub.a\n"
    (pkg / "sub" / "b.py").write_text(b)
    graph = import_graph(tmp_path)
    assert graph["llama2.sub.a"] == {"llama2.sub.b"} and graph["llama2.sub.b"] == {"llama2.sub.a"}
    assert find_cycle(graph) is not None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


@pytest.mark.parametrize(
    "path", sorted((SRC / "llama2").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC))
)
def test_no_file_over_500_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (at most {MAX_LINES}: split it)"
