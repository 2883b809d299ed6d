"""Rejection-sampling fine-tuning (Llama 2 paper, sec. 3.2.3 "Rejection Sampling").

`run_rejection(RejectionConfig(...))` is the whole stage. Each iteration i:

1. samples `k` responses per training prompt from the current model (`llama2.train.rollout.
   sample_responses`, seed `1000 * seed + i`; the paper explores temperatures 0.6-1.5);
2. scores every sample with the reward models (`RewardScorer.score(...).r_c`: the safety reward for
   prompts of the safety set or when it falls below 0.15, the helpfulness reward otherwise);
3. keeps, per prompt, the highest-reward sample seen in ANY iteration so far (the paper's fix for the
   regressions of iterations that only used the latest samples); ties keep the earlier sample;
4. drops prompts whose best R_c is below `min_reward` and writes the rest as gold dialogs (prompt
   dialog + best response) for the SFT stage (`llama2.train.sft.run_sft`).

Prompts: `n_per_task` instruction-suite train prompts per task (the `refuse` task counts as safety),
`n_harmful` harmful and `n_benign` benign-but-alarming safety-suite train prompts (both flagged as
safety prompts, as the paper's `is_safety` flags every prompt of the safety set); duplicates are merged.

Decision: each iteration's fine-tune starts from the previous iteration's fine-tuned model (the model
that also produced its samples), as the paper fine-tunes the latest model; iteration 0 starts from
`model`. Run folder (`loop.out_dir`)::

    config.toml
    iter_0/samples.jsonl   every sample: prompt key, response, r_h, r_s, r_c, iteration, sample, seed
    iter_0/best.jsonl      the pooled gold dialogs (`{"messages": ...}` + their scores), the SFT data
    iter_0/sft/            run_sft's run folder; its model in iter_0/sft/model
    iter_0/iteration.json  written last: the iteration is complete
    model/                 the final model (a copy of the last iteration's sft/model)
    summary.json           per iteration: prompts, best-reward mean/max/median, bests from earlier
                           iterations, SFT loss, wall time

`resume = true` skips complete iterations (their samples rebuild the pool), reuses a written
samples.jsonl and continues an interrupted SFT through `run_sft(resume=True)`; asking for more
iterations than a finished run had extends it. A used out_dir is refused without `resume`/`overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from llama2.chat import Dialog, Message
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.data.instruct_suite import generate_items
from llama2.data.jsonl import jsonl_text, read_records
from llama2.data.safety_suite import benign_alarming_prompts, harmful_prompts
from llama2.errors import ConfigError, DialogError
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir, write_text_atomic
from llama2.train.loop_config import LoopConfig
from llama2.train.pretrain import parse_save_dtype, write_json, write_run_files
from llama2.train.reward_scoring import RewardScorer
from llama2.train.rollout import sample_responses
from llama2.train.run_config import flat_aliases
from llama2.train.sft import SFTConfig, run_sft

_ITER_RE = re.compile(r"iter_\d+")


def _rs_loop() -> LoopConfig:
    """SFT settings of each iteration's fine-tune: the paper's SFT learning rate, a short warmup."""
    return LoopConfig(lr=2e-5, warmup_steps=10, out_dir=Path("runs/rejection"))


@flat_aliases
@dataclass
class RejectionConfig:
    """`llama2 train rejection`: prompts, sampling and reward settings, and a `[loop]` table (the SFT
    settings of each iteration's fine-tune; `loop.out_dir` is the rejection run folder)."""

    model: Path = field(
        default=Path("chat"), metadata={"help": "policy to start from (path or embedded name)"}
    )
    reward_helpful: Path = field(default=Path("reward_helpful"), metadata={"help": "helpfulness RM folder"})
    reward_safety: Path = field(default=Path("reward_safety"), metadata={"help": "safety RM folder"})
    n_per_task: int = field(default=20, metadata={"help": "instruction-suite train prompts per task"})
    n_harmful: int = field(default=20, metadata={"help": "safety-suite harmful train prompts"})
    n_benign: int = field(default=20, metadata={"help": "safety-suite benign-but-alarming train prompts"})
    k: int = field(default=8, metadata={"help": "samples per prompt (paper: up to 10-30)"})
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature (paper explores 0.6-1.5)"}
    )
    iterations: int = field(default=1, metadata={"help": "rejection-sampling rounds (paper: RLHF V1-V4)"})
    max_new_tokens: int = 24
    seed: int = field(default=0, metadata={"help": "chooses the prompts and seeds the samples"})
    min_reward: float = field(default=0.0, metadata={"help": "drop prompts whose best R_c is below this"})
    loss_turns: str = field(default="all", metadata={"help": "SFT loss on all assistant turns or the last"})
    val_fraction: float = field(default=0.05, metadata={"help": "gold dialogs held out by each SFT"})
    save_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    resume: bool = field(default=False, metadata={"help": "continue the run in loop.out_dir"})
    loop: LoopConfig = field(
        default_factory=_rs_loop, metadata={"help": "each iteration's SFT ([loop] table)"}
    )

    ALIASES: ClassVar[dict[str, str]] = {  # flat loop flags, except `seed`: the stage's own field
        f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig) if f.name != "seed"
    }

    def __post_init__(self) -> None:
        for name in ("k", "iterations", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"RejectionConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_per_task", "n_harmful", "n_benign"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"RejectionConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_per_task + self.n_harmful + self.n_benign == 0:
            raise ConfigError("RejectionConfig needs prompts: n_per_task, n_harmful or n_benign must be > 0")
        if not self.temperature >= 0:
            raise ConfigError(f"RejectionConfig.temperature must be >= 0, got {self.temperature}")
        if self.loss_turns not in ("all", "last"):
            raise ConfigError(f"RejectionConfig.loss_turns must be 'all' or 'last', got {self.loss_turns!r}")


# ------------------------------------------------------------------------------ prompts and samples
@dataclass(frozen=True)
class RSPrompt:
    """One training prompt: its dialog (ending with the user turn), safety flag and task."""

    dialog: list[Message]
    is_safety: bool
    task: str

    @property
    def key(self) -> str:
        """The prompt's identity across iterations and resumes: its dialog as canonical JSON."""
        return json.dumps(self.dialog, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Candidate:
    """One scored sample of one prompt (`key` = `RSPrompt.key`)."""

    key: str
    response: str
    r_h: float
    r_s: float
    r_c: float
    iteration: int = 0
    sample: int = 0
    seed: int = 0
    finish_reason: str = "stop"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Candidate:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as e:
            raise DialogError(f"malformed sample record ({e}); expected the fields {sorted(names)}") from None


class ScoresLike(Protocol):
    """What `RewardScorer.score` returns: (N,) probabilities."""

    r_h: Tensor
    r_s: Tensor
    r_c: Tensor


class Scorer(Protocol):
    """`RewardScorer`'s scoring call (tests pass stand-ins)."""

    def score(
        self, dialogs: Sequence[Sequence[Message]], responses: Sequence[str], is_safety: Sequence[bool]
    ) -> ScoresLike: ...


def build_prompts(n_per_task: int, n_harmful: int, n_benign: int, seed: int) -> list[RSPrompt]:
    """The training prompts of a run (see the module docstring), duplicates merged, order kept."""
    prompts = [RSPrompt(it.prompt_dialog, it.task == "refuse", it.task) for it in
               (generate_items("train", n_per_task, seed) if n_per_task else [])]  # fmt: skip
    safety = (harmful_prompts("train", n_harmful, seed) if n_harmful else []) + (
        benign_alarming_prompts("train", n_benign, seed) if n_benign else []
    )
    prompts += [RSPrompt(list(p.dialog), True, p.task) for p in safety]
    unique: dict[str, RSPrompt] = {}
    for p in prompts:
        unique.setdefault(p.key, p)
    return list(unique.values())


def score_samples(
    scorer: Scorer,
    prompts: Sequence[RSPrompt],
    responses: Sequence[Sequence[str]],
    *,
    iteration: int = 0,
    seed: int = 0,
    finish_reasons: Sequence[Sequence[str]] | None = None,
) -> list[Candidate]:
    """Score `responses[i][j]` (sample j of prompt i) in one `scorer.score` call; candidates in order."""
    if len(responses) != len(prompts):
        raise ConfigError(f"{len(responses)} response lists for {len(prompts)} prompts; expected one each")
    flat = [(i, j, r) for i, rs in enumerate(responses) for j, r in enumerate(rs)]
    if not flat:
        return []
    scores = scorer.score(
        [prompts[i].dialog for i, _, _ in flat],
        [r for _, _, r in flat],
        [prompts[i].is_safety for i, _, _ in flat],
    )
    r_h, r_s, r_c = (t.detach().float().cpu().tolist() for t in (scores.r_h, scores.r_s, scores.r_c))
    return [
        Candidate(
            key=prompts[i].key,
            response=r,
            r_h=r_h[n],
            r_s=r_s[n],
            r_c=r_c[n],
            iteration=iteration,
            sample=j,
            seed=seed,
            finish_reason=finish_reasons[i][j] if finish_reasons else "stop",
        )
        for n, (i, j, r) in enumerate(flat)
    ]


# ------------------------------------------------------------------------------ selection, pooling
def best_per_prompt(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    """Per prompt key, the candidate with the highest `r_c` (ties: the earliest in the list)."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.key not in best or c.r_c > best[c.key].r_c:
            best[c.key] = c
    return best


def pool_best(previous: Mapping[str, Candidate], new: Mapping[str, Candidate]) -> dict[str, Candidate]:
    """Per prompt, the better of an earlier iteration's best and this iteration's (ties keep the earlier)."""
    pooled = dict(previous)
    for key, c in new.items():
        if key not in pooled or c.r_c > pooled[key].r_c:
            pooled[key] = c
    return pooled


def gold_dialogs(
    prompts: Sequence[RSPrompt], best: Mapping[str, Candidate], min_reward: float = 0.0
) -> list[tuple[Dialog, Candidate]]:
    """(prompt dialog + best response, the best) for every prompt whose best `r_c` >= `min_reward`."""
    out: list[tuple[Dialog, Candidate]] = []
    for p in prompts:
        c = best.get(p.key)
        if c is not None and c.r_c >= min_reward:
            out.append(([*p.dialog, {"role": "assistant", "content": c.response}], c))
    return out


def write_gold(path: Path, gold: Sequence[tuple[Dialog, Candidate]]) -> Path:
    """The SFT data file: one `{"messages": [...], ...scores}` line per gold dialog, written atomically."""
    write_text_atomic(path, jsonl_text({"messages": d, **c.to_json()} for d, c in gold))
    return path


def write_samples(path: Path, candidates: Sequence[Candidate]) -> Path:
    write_text_atomic(path, jsonl_text(c.to_json() for c in candidates))
    return path


def read_samples(path: Path) -> list[Candidate]:
    """Candidates written by `write_samples`; `DialogError` naming the bad line."""
    return read_records(path, Candidate.from_json)


def reward_stats(best: Mapping[str, Candidate], iteration: int) -> dict[str, Any]:
    """Mean/max/median of the pooled best rewards, and how many bests came from earlier iterations."""
    rewards = [c.r_c for c in best.values()]
    return {
        "prompts": len(rewards),
        "mean_best_reward": statistics.fmean(rewards) if rewards else None,
        "max_best_reward": max(rewards) if rewards else None,
        "median_best_reward": statistics.median(rewards) if rewards else None,
        "from_earlier_iterations": sum(c.iteration < iteration for c in best.values()),
    }


# ------------------------------------------------------------------------------------------ runner
@dataclass
class RejectionResult:
    """What `run_rejection` produced."""

    model_dir: Path
    iterations: list[dict[str, Any]]  # the per-iteration records of summary.json
    out_dir: Path
    best: dict[str, Candidate] = field(default_factory=dict)  # the final pool


def _prepare_out_dir(cfg: RejectionConfig) -> Path:
    """`prepare_run_dir` plus the rejection run's own files: refused when used unless resume/overwrite."""
    out = prepare_run_dir(cfg.loop.out_dir, resume=cfg.resume, overwrite=cfg.loop.overwrite)
    ours = sorted(
        p for p in out.iterdir() if _ITER_RE.fullmatch(p.name) or p.name in ("model", "summary.json")
    )
    if ours and not cfg.resume:
        if not cfg.loop.overwrite:
            raise ConfigError(
                f"out_dir {out} already holds a rejection-sampling run "
                f"({', '.join(p.name for p in ours[:3])}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out-dir"
            )
        for p in ours:  # only the folders and files this stage writes
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return out


def _read_seconds(path: Path) -> float | None:
    """`wall_time_s` of a timing file, or None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("wall_time_s")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _iteration_complete(it_dir: Path) -> bool:
    return (it_dir / "iteration.json").is_file() and (it_dir / "sft" / "model").is_dir()


def _sft_config(cfg: RejectionConfig, base: Path, data: Path, out: Path) -> SFTConfig:
    loop = dataclasses.replace(cfg.loop, out_dir=out, overwrite=False)
    return SFTConfig(
        model=base, data=data, val_fraction=cfg.val_fraction, save_dtype=cfg.save_dtype,
        loss_turns=cfg.loss_turns, resume=cfg.resume, loop=loop,
    )  # fmt: skip


def _sample_and_score(
    cfg: RejectionConfig, model_path: Path, prompts: Sequence[RSPrompt], scorer: Scorer | None, iteration: int
) -> tuple[list[Candidate], Scorer]:
    """Sample `k` responses per prompt from `model_path` and score them; the reward models are loaded
    on first use, with the policy's tokenizer (they are trained on it)."""
    device = resolve_device(cfg.loop.device)
    loaded = load_model(model_path, dtype=torch.float32, progress=False)
    tok_path = require_tokenizer(loaded.tokenizer_path, None, model_path, "save the policy with one")
    tokenizer = Tokenizer.from_file(tok_path)
    if scorer is None:
        scorer = RewardScorer.load(cfg.reward_helpful, cfg.reward_safety, tokenizer, device=device)
    model = loaded.model.to(device).eval()
    seed = 1000 * cfg.seed + iteration
    samples = sample_responses(
        model, tokenizer, [p.dialog for p in prompts], n=cfg.k, temperature=cfg.temperature, seed=seed,
        max_new_tokens=cfg.max_new_tokens,
    )  # fmt: skip
    del model, loaded
    texts = [[s.text for s in row] for row in samples]
    finish = [[s.finish_reason for s in row] for row in samples]
    scored = score_samples(scorer, prompts, texts, iteration=iteration, seed=seed, finish_reasons=finish)
    return scored, scorer


def run_rejection(cfg: RejectionConfig, scorer: Scorer | None = None) -> RejectionResult:
    """Run `cfg.iterations` rounds of rejection sampling + SFT (see the module docstring).

    Args:
        cfg: the stage config.
        scorer: scores samples; default: the reward models `cfg.reward_helpful` / `cfg.reward_safety`.

    Raises:
        ConfigError: bad settings, a used out_dir, or no prompt's best reward reaching `min_reward`.
        CheckpointError / DialogError: unreadable checkpoints or malformed run files on resume.
    """
    resolve_device(cfg.loop.device)
    parse_save_dtype(cfg.save_dtype)
    out_dir = _prepare_out_dir(cfg)
    write_run_files(out_dir, cfg)
    prompts = build_prompts(cfg.n_per_task, cfg.n_harmful, cfg.n_benign, cfg.seed)
    pool: dict[str, Candidate] = {}
    records: list[dict[str, Any]] = []
    current = Path(cfg.model)
    for i in range(cfg.iterations):
        it_dir = out_dir / f"iter_{i}"
        samples_path = it_dir / "samples.jsonl"
        if cfg.resume and _iteration_complete(it_dir):
            pool = pool_best(pool, best_per_prompt(read_samples(samples_path)))
            records.append(json.loads((it_dir / "iteration.json").read_text(encoding="utf-8")))
            current = it_dir / "sft" / "model"
            print(f"rejection: iteration {i} complete, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        timing_path = it_dir / "sampling_time.json"  # sampling + scoring, kept for a resumed iteration
        if cfg.resume and samples_path.is_file():
            candidates = read_samples(samples_path)
            sampling_s = _read_seconds(timing_path)
        else:
            candidates, scorer = _sample_and_score(cfg, current, prompts, scorer, i)
            write_samples(samples_path, candidates)
            sampling_s = time.perf_counter() - t0
            write_json(timing_path, {"wall_time_s": sampling_s})
        t0 = time.perf_counter() - (sampling_s or 0.0)  # the iteration's time includes its sampling
        new_best = best_per_prompt(candidates)
        pool = pool_best(pool, new_best)
        gold = gold_dialogs(prompts, pool, cfg.min_reward)
        if not gold:
            raise ConfigError(
                f"iteration {i}: no prompt's best reward reaches min_reward {cfg.min_reward}; "
                "expected a lower min_reward (rewards are probabilities in (0, 1)) or more samples (k)"
            )
        write_gold(it_dir / "best.jsonl", gold)
        print(f"rejection: iteration {i}: {len(gold)}/{len(prompts)} gold dialogs, fine-tuning", flush=True)
        sft = run_sft(_sft_config(cfg, current, it_dir / "best.jsonl", it_dir / "sft"))
        if sft.model_dir is None:
            raise ConfigError("rejection sampling needs full fine-tuning models; the SFT saved no model")
        record = {
            "iteration": i,
            **reward_stats(pool, i),
            "kept": len(gold),
            "samples": len(candidates),
            "mean_new_best_reward": statistics.fmean(c.r_c for c in new_best.values()) if new_best else None,
            "sft_steps": sft.train.step,
            "sft_train_loss": sft.train.train_loss,
            "sft_val_loss": sft.train.val_loss,
            "wall_time_s": time.perf_counter() - t0,
            "model": str(sft.model_dir),
        }
        write_json(it_dir / "iteration.json", record)
        records.append(record)
        current = sft.model_dir
    final = out_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(current, final)
    total = sum(float(r.get("wall_time_s") or 0.0) for r in records)
    write_json(out_dir / "summary.json", {"iterations": records, "model": str(final), "wall_time_s": total})
    return RejectionResult(model_dir=final, iterations=records, out_dir=out_dir, best=pool)
