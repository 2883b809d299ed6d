"""Thread configuration: explicit counts, the user's environment wins, physical-core detection."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from llama2 import runtime
from llama2.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    n = torch.get_num_threads()
    for var in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "_configured", False)
    yield
    torch.set_num_threads(n)


def test_explicit_count_and_invalid_counts() -> None:
    assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="positive integer"):
            runtime.configure_threads(bad)


def test_physical_cores_bounded_by_logical_cpus() -> None:
    n = runtime.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_default_is_physical_cores_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "physical_cores", lambda: 1)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # torch's default
    assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
    # OMP_NUM_THREADS set: leave torch's count alone.
    monkeypatch.setattr(runtime, "_configured", False)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.configure_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LLAMA2_NUM_THREADS", "1")
    assert runtime.configure_threads() == 1
    monkeypatch.setenv("LLAMA2_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="LLAMA2_NUM_THREADS"):
        runtime.configure_threads()
