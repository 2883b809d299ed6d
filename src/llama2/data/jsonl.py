"""JSONL files of records (one JSON object per line): the one reader and writer of the data files
(instruction items, preference pairs, rejection-sampling samples and gold dialogs, GAtt dialogs).

`read_records(path, parse)` skips blank lines and turns a line that is not JSON, or that `parse`
refuses with a `DialogError`, into a `DialogError` naming `path:line`. `jsonl_text` is the file's text,
for callers that write it atomically (`llama2.train.checkpointing.write_text_atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from llama2.errors import DialogError

T = TypeVar("T")


def jsonl_text(records: Iterable[Mapping[str, Any]]) -> str:
    """The records as JSONL text (UTF-8 kept as is, one object per line, a newline after each)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_records(records: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Write the records as JSONL (the parent folder is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_records(path: Path | str, parse: Callable[[Any], T]) -> list[T]:
    """`parse` of every non-blank line's JSON object; `DialogError` naming `path:line` on a bad one."""
    path = Path(path)
    out: list[T] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except (json.JSONDecodeError, DialogError) as e:
                raise DialogError(f"{path}:{lineno}: {e}") from None
    return out
