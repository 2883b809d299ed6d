"""The Llama 2-Chat recipe end to end, one timed subprocess per command, in the documented order.

The commands are those of `scripts/configs/recipe/*.toml`:

    train preferences -> train reward (helpful) -> train reward (safety) -> eval reward (both models)
    -> eval rejection-curve -> train rejection -> train ppo -> train gatt -> train dpo -> eval recipe

Each runs as `python -m llama2 ...` from the repository root and is timed (wall seconds, process
start included). Output: a markdown table (command / wall time / exit status) on stdout, then the
stage table the last command writes (`<out-root>/stage_table.md`); `--json FILE` also writes the
rows as JSON.

    python benchmarks/recipe.py --scale tiny --out-root /tmp/recipe_bench   # a smoke run, minutes
    python benchmarks/recipe.py --json runs/recipe_bench/times.json         # the full recipe, ~40 min

Decisions:
  - Paths: every string value of a config (and of its tables and lists) that starts with
    `runs/recipe/` (or is `runs/recipe`), or holds it right after `=` (the `name=path` entries of
    eval.toml's `stages`), is rewritten to `--out-root`; the rewritten config is written to
    `<out-root>/configs/<name>.toml` and passed as `--config`, so a benchmark never touches the
    live runs under runs/recipe. Other paths (the SFT model runs/chat/sft2/model) are read as they are.
  - `--scale full` runs the configs as they are; `--scale tiny` adds the small flags of a smoke run
    (few prompts, few samples, a few optimizer steps) on the same models, which exercises every
    command and file hand-off but measures nothing about the recipe's quality.
  - Every training run gets `--loop.overwrite` (preferences: `--overwrite`) so a benchmark can be
    rerun into the same out-root; `eval reward`, which has no config file, gets its flags directly.
  - A command that fails stops the chain (later commands need its outputs); the table then shows the
    commands that ran, and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama2.train.run_config import to_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts/configs/recipe"
LIVE = "runs/recipe"
_LIVE_RE = re.compile(rf"(^|=){re.escape(LIVE)}(?=/|$)")  # at the start, or after `name=`

# Small flags of a smoke run, per config file (appended after the config's own flags).
TINY: dict[str, list[str]] = {
    "preferences": [
        "--n-per-task", "4", "--n-harmful", "16", "--n-benign", "4", "--heldout-n-per-task", "1",
        "--heldout-n-harmful", "6", "--heldout-n-benign", "2", "--temperatures", "0.7", "1.3",
        "--samples-per-temperature", "1", "--max-new-tokens", "12",
    ],
    "reward_helpful": ["--loop.max-steps", "4", "--loop.eval-batches", "2"],
    "reward_safety": ["--loop.max-steps", "4", "--loop.eval-batches", "2"],
    "rejection_curve": ["--n-per-task", "1", "--k", "2", "--temperatures", "0.7", "1.0"],
    "rejection": [
        "--n-per-task", "1", "--n-harmful", "2", "--n-benign", "1", "--k", "2", "--max-new-tokens", "8",
        "--loop.max-steps", "2", "--loop.eval-batches", "1",
    ],
    "ppo": [
        "--n-prompts-per-task", "2", "--rollout-batch", "8", "--mini-batch", "4", "--max-new-tokens", "8",
        "--heldout-n-per-task", "1", "--loop.max-steps", "4", "--loop.eval-every", "2",
        "--loop.ckpt-every", "2",
    ],
    "gatt": [
        "--n-dialogs", "8", "--max-turns", "2", "--max-new-tokens", "8", "--loop.max-steps", "2",
        "--loop.eval-batches", "1",
    ],
    "dpo": ["--loop.max-steps", "4", "--loop.eval-every", "2", "--loop.eval-batches", "2"],
    "eval": [
        "--n-per-task", "1", "--benign-n", "2", "--gatt-dialogs", "2", "--max-new-tokens", "8",
    ],
}  # fmt: skip
TINY_EVAL_REWARD = ["--batch-size", "8"]


@dataclass(frozen=True)
class Step:
    """One command of the recipe: a name for the table and the argv after `python -m llama2`."""

    name: str
    argv: list[str]


@dataclass
class Row:
    command: str
    wall_s: float
    exit_status: int
    argv: list[str]


def rewrite(value: Any, out_root: str) -> Any:
    """`value` with every `runs/recipe` path prefix (see the module docstring) moved to `out_root`."""
    if isinstance(value, str):
        return _LIVE_RE.sub(lambda m: m.group(1) + out_root, value)
    if isinstance(value, list):
        return [rewrite(v, out_root) for v in value]
    if isinstance(value, dict):
        return {k: rewrite(v, out_root) for k, v in value.items()}
    return value


def config_args(name: str, out_root: Path, scale: str) -> list[str]:
    """`--config <out-root>/configs/<name>.toml` (the rewritten config) plus the scale's flags."""
    data = tomllib.loads((CONFIGS / f"{name}.toml").read_text(encoding="utf-8"))
    path = out_root / "configs" / f"{name}.toml"  # as the command sees it (cwd: the repo root)
    (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / path).write_text(to_toml(rewrite(data, str(out_root))), encoding="utf-8")
    return ["--config", str(path), *(TINY[name] if scale == "tiny" else [])]


def recipe_steps(out_root: Path, scale: str) -> list[Step]:
    """The recipe's commands in order."""
    overwrite = ["--loop.overwrite"]
    steps = [
        Step("train preferences", ["train", "preferences", *config_args("preferences", out_root, scale),
                                   "--overwrite"]),
        Step("train reward (helpful)", ["train", "reward", *config_args("reward_helpful", out_root, scale),
                                        *overwrite]),
        Step("train reward (safety)", ["train", "reward", *config_args("reward_safety", out_root, scale),
                                       *overwrite]),
    ]  # fmt: skip
    prefs = out_root / "preferences"
    for model, data in (("rm_helpful", "helpful_heldout"), ("rm_safety", "safety_heldout")):
        argv = [
            "eval", "reward", "--model", str(out_root / model / "model"), "--data",
            str(prefs / f"{data}.jsonl"), "--out-json", str(out_root / model / "eval_reward.json"),
        ]  # fmt: skip
        steps.append(Step(f"eval reward ({model})", argv + (TINY_EVAL_REWARD if scale == "tiny" else [])))
    steps += [
        Step("eval rejection-curve", ["eval", "rejection-curve",
                                      *config_args("rejection_curve", out_root, scale)]),
        Step("train rejection", ["train", "rejection", *config_args("rejection", out_root, scale),
                                 *overwrite]),
        Step("train ppo", ["train", "ppo", *config_args("ppo", out_root, scale), *overwrite]),
        Step("train gatt", ["train", "gatt", *config_args("gatt", out_root, scale), *overwrite]),
        Step("train dpo", ["train", "dpo", *config_args("dpo", out_root, scale), *overwrite]),
        Step("eval recipe", ["eval", "recipe", *config_args("eval", out_root, scale)]),
    ]  # fmt: skip
    return steps


def run_step(step: Step, log_dir: Path) -> Row:
    """Run one command from the repository root; its output goes to `<log_dir>/<n>.log`."""
    log = log_dir / (re.sub(r"[^a-z0-9]+", "_", step.name.lower()).strip("_") + ".log")
    argv = [sys.executable, "-m", "llama2", *step.argv]
    print(f"$ {' '.join(argv[1:])}", flush=True)
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        print("\n".join(["  " + line for line in tail]), file=sys.stderr, flush=True)
    return Row(step.name, wall, proc.returncode, step.argv)


def table(rows: list[Row]) -> str:
    lines = ["| command | wall time (s) | exit status |", "|---|---:|---:|"]
    lines += [f"| {r.command} | {r.wall_s:.1f} | {r.exit_status} |" for r in rows]
    lines.append(f"| total | {sum(r.wall_s for r in rows):.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--out-root",
        type=Path,
        default=Path("runs/recipe_bench"),
        help="folder that replaces runs/recipe in every config (relative: to the repo root)",
    )
    p.add_argument(
        "--scale",
        choices=("full", "tiny"),
        default="full",
        help="full: the configs as they are; tiny: the small flags of a smoke run",
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)  # fmt: skip
    out_root: Path = args.out_root
    if out_root.resolve() == (ROOT / LIVE).resolve():
        p.error(f"--out-root {out_root} is the live recipe folder; choose another")
    log_dir = ROOT / out_root / "logs"  # ROOT / an absolute path is that path
    log_dir.mkdir(parents=True, exist_ok=True)

    steps = recipe_steps(out_root, args.scale)
    rows: list[Row] = []
    for step in steps:
        rows.append(run_step(step, log_dir))
        if rows[-1].exit_status != 0:
            print(f"{step.name} failed (exit {rows[-1].exit_status}); stopping", file=sys.stderr)
            break
    print()
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"scale": args.scale, "out_root": str(out_root), "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    stage_table = ROOT / out_root / "stage_table.md"
    if stage_table.is_file():
        print()
        print(stage_table.read_text(encoding="utf-8"))
    failed = any(r.exit_status != 0 for r in rows)
    return 1 if failed or len(rows) < len(steps) else 0


if __name__ == "__main__":
    sys.exit(main())
