"""Independent oracles for `llama2.train.rl_losses`: torchtune's `rlhf` functions and TRL's reward loss.

`make setup` installs `torchtune` and `trl` with `--no-deps` (pinned in the Makefile): their own
dependencies (torchao, datasets, accelerate, ...) are heavy and not needed, so neither package can be
imported normally. Instead:

- torchtune: the three source files `torchtune/rlhf/rewards.py`, `rlhf/loss/ppo.py` and
  `rlhf/loss/dpo.py` are loaded by path (they only need torch; `ppo.py`'s `from torchtune import rlhf`
  is served, for the duration of its import only, by a stub package holding the loaded `rewards.py`).
- TRL: `RewardTrainer.compute_loss` is taken from the source of `trl/trainer/reward_trainer.py` (its
  module imports accelerate/datasets at top level) by compiling that one method from the file's AST, and
  is called unbound with a fake trainer `self` and a fake model returning the given scores as logits.

If a package is missing, the test fails (not skips) and says to run `make setup`.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

_SETUP_HINT = "run `make setup` (it installs the pinned torchtune and trl used as test oracles)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        pytest.fail(f"oracle package {name!r} is not installed; {_SETUP_HINT}")
    return Path(next(iter(locations)))


def _load_file(path: Path, module_name: str, stubs: dict[str, types.ModuleType] | None = None) -> Any:
    """Execute one source file as a fresh module, with `stubs` in sys.modules during its import only."""
    if not path.is_file():
        pytest.fail(f"oracle source {path} is missing; {_SETUP_HINT}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        pytest.fail(f"cannot load oracle source {path}; {_SETUP_HINT}")
    module = importlib.util.module_from_spec(spec)
    stubs = stubs or {}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # an incompatible version: say so instead of erroring obscurely
        pytest.fail(f"cannot import oracle source {path}: {exc!r}; {_SETUP_HINT}")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


@dataclass
class Torchtune:
    """The torchtune oracle functions (torchtune 0.6.1 signatures)."""

    rewards: Any  # module torchtune/rlhf/rewards.py: get_rewards_ppo, estimate_advantages, whiten, ...
    PPOLoss: Any
    DPOLoss: Any


def load_torchtune() -> Torchtune:
    root = _package_dir("torchtune")
    rewards = _load_file(root / "rlhf" / "rewards.py", "_oracle_torchtune_rlhf_rewards")
    stub = types.ModuleType("torchtune")
    stub.rlhf = rewards  # type: ignore[attr-defined]  # what `from torchtune import rlhf` uses in ppo.py
    ppo = _load_file(root / "rlhf" / "loss" / "ppo.py", "_oracle_torchtune_ppo", {"torchtune": stub})
    dpo = _load_file(root / "rlhf" / "loss" / "dpo.py", "_oracle_torchtune_dpo")
    return Torchtune(rewards=rewards, PPOLoss=ppo.PPOLoss, DPOLoss=dpo.DPOLoss)


def _method_from_source(path: Path, class_name: str, method: str) -> Callable[..., Any]:
    if not path.is_file():
        pytest.fail(f"oracle source {path} is missing; {_SETUP_HINT}")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    item.decorator_list = []
                    code = compile(ast.Module(body=[item], type_ignores=[]), str(path), "exec")
                    namespace: dict[str, Any] = {"torch": torch, "nn": torch.nn}
                    exec(code, namespace)
                    return namespace[method]  # type: ignore[no-any-return]
    pytest.fail(f"{class_name}.{method} not found in {path}; {_SETUP_HINT}")


class _FakeAccelerator:
    def gather(self, x: Tensor) -> Tensor:
        return x

    def gather_for_metrics(self, x: Tensor) -> Tensor:
        return x


def trl_reward_loss() -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """`(chosen, rejected, margin or None) -> loss` through TRL's `RewardTrainer.compute_loss`."""
    compute_loss = _method_from_source(
        _package_dir("trl") / "trainer" / "reward_trainer.py", "RewardTrainer", "compute_loss"
    )

    def loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None) -> Tensor:
        logits = torch.cat([chosen, rejected]).unsqueeze(-1)  # (2B, 1): TRL chunks chosen first

        def model(**inputs: Any) -> Any:
            return types.SimpleNamespace(logits=logits)

        fake_self = types.SimpleNamespace(
            model=types.SimpleNamespace(training=False),  # "eval" mode: no token counting
            args=types.SimpleNamespace(center_rewards_coefficient=None),
            accelerator=_FakeAccelerator(),
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
        )
        b = chosen.shape[0]
        inputs: dict[str, Any] = {
            "input_ids": torch.zeros(2 * b, 3, dtype=torch.long),
            "attention_mask": torch.ones(2 * b, 3, dtype=torch.long),
        }
        if margin is not None:
            inputs["margin"] = margin
        result = compute_loss(fake_self, model, inputs)
        assert isinstance(result, Tensor)
        return result

    return loss
