"""Shared helpers of the training tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ListBatches:
    """A resumable cycle over a fixed list of batches (the `Batches` protocol: iterator + state)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.pos = 0

    def __iter__(self) -> ListBatches:
        return self

    def __next__(self) -> Any:
        b = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pos = int(state["pos"])
