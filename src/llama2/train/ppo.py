"""PPO against the helpfulness and safety reward models (Llama 2 paper, sec. 3.2.3).

`run_ppo(PPOConfig(...))` is the whole stage, on the one trainer (`llama2.train.trainer.fit`):

- models: "policy" (the chat model, trained), "value" (a `RewardModel` initialised from the
  helpfulness reward model, trained; `values(tokens)` are V), "reference" (the initial policy,
  frozen), "reward_helpful" and "reward_safety" (frozen). Policy and value share ONE AdamW optimizer
  (weight decay 0.1, clip 1.0, constant LR: warmup 0, min_lr_ratio 1) and one loss,
  `pg + vf_coef * vf`; one gradient step per mini-batch (`grad_accum` must be 1).
- batches: `PPOBatches` (`llama2.train.ppo_rollout`): rollouts on the engine, R_c, whitened
  logit scores on the EOS token, KL penalty -beta * k1 per token, GAE, `ppo_epochs` shuffled passes.
- loss: the clipped policy loss (`clip`) and the clipped value loss (`value_clip`) of
  `llama2.train.rl_losses`. Old logprobs come from the same forward the step runs, so the first
  mini-batch of every rollout has ratio exactly 1.
- evaluation: greedy responses to held-out prompts (the suite's `heldout` split, plus held-out
  safety prompts) -> mean R_h, mean R_c and exact match. The stage keeps the best held-out R_c; on
  each improvement the policy is written to `<out_dir>/model` (so the best survives a crash; a resume
  that replays an evaluation rewrites it identically). `should_stop()` is true after `patience`
  evaluations without improvement (0: never), for `fit` to check after each evaluation.
- outputs: `<out_dir>/model` (best policy), `<out_dir>/last` (last policy), `summary.json`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from llama2.checkpoint.load import load_model
from llama2.checkpoint.reward_io import load_reward_model
from llama2.checkpoint.tokenizer_path import require_tokenizer
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel
from llama2.model.transformer import Transformer
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir
from llama2.train.loop_config import LoopConfig
from llama2.train.ppo_rollout import (
    ROLLOUT_STATS,
    PPOBatches,
    PPOPrompt,
    RolloutSettings,
    prompt_pool,
    response_logprobs,
    response_values,
)
from llama2.train.pretrain import parse_save_dtype, save_model, write_json, write_run_files
from llama2.train.reward_scoring import RewardScorer
from llama2.train.rl_losses import SAFETY_THRESHOLD, ppo_policy_loss, ppo_value_loss
from llama2.train.rollout import sample_responses
from llama2.train.run_config import config_to_dict, flat_aliases
from llama2.train.trainer import StepOutput, TrainResult, fit, resolve_dtype


def _ppo_loop() -> LoopConfig:
    """PPO's loop defaults: lr 1e-5 constant (no warmup, no decay), weight decay 0.1, clip 1.0."""
    return LoopConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1, grad_clip=1.0)


@flat_aliases
@dataclass
class PPOConfig:
    """`llama2 train ppo`: policy and reward-model fields, rollout/PPO settings and a `[loop]` table
    (`loop.batch_size` is unused: PPO's micro-batch is `mini_batch`)."""

    model: Path = field(default=Path("chat"), metadata={"help": "policy to train (folder or embedded name)"})
    reward_helpful: Path = field(
        default=Path("runs/reward_helpful/model"), metadata={"help": "helpfulness reward model folder"}
    )
    reward_safety: Path = field(
        default=Path("runs/reward_safety/model"), metadata={"help": "safety reward model folder"}
    )
    value_init: Path | None = field(
        default=None, metadata={"help": "reward model the value model starts from (default: reward_helpful)"}
    )
    tokenizer: Path | None = field(default=None, metadata={"help": "default: the one next to the policy"})
    n_prompts_per_task: int = field(default=64, metadata={"help": "instruct-suite train prompts per task"})
    safety_fraction: float = field(default=0.1, metadata={"help": "share of safety prompts in the pool"})
    safety_threshold: float = field(default=SAFETY_THRESHOLD, metadata={"help": "R_s below it: R_c = R_s"})
    rollout_batch: int = field(default=64, metadata={"help": "prompts per rollout"})
    mini_batch: int = field(default=16, metadata={"help": "sequences per gradient step"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    max_new_tokens: int = 24
    max_slots: int = field(default=32, metadata={"help": "sequences the engine decodes together"})
    beta: float = field(default=0.01, metadata={"help": "KL penalty per token (paper: 0.01 for 7B/13B)"})
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip around the old values"})
    vf_coef: float = field(default=0.1, metadata={"help": "loss = pg + vf_coef * value loss"})
    no_eos_score: float = field(
        default=-1.0,
        metadata={"help": "score of a response that hit max_new_tokens (replaces its whitened score)"},
    )
    heldout_n_per_task: int = field(default=8, metadata={"help": "held-out prompts per task for evaluation"})
    patience: int = field(
        default=3, metadata={"help": "evaluations without a better R_c before stopping (0: never)"}
    )
    save_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/checkpoints/latest"})
    loop: LoopConfig = field(default_factory=_ppo_loop, metadata={"help": "the training loop ([loop] table)"})

    ALIASES: ClassVar[dict[str, str]] = {f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig)}

    def rollout_settings(self) -> RolloutSettings:
        return RolloutSettings(
            rollout_batch=self.rollout_batch, mini_batch=self.mini_batch, ppo_epochs=self.ppo_epochs,
            max_new_tokens=self.max_new_tokens, beta=self.beta, gamma=self.gamma, lam=self.lam,
            no_eos_score=self.no_eos_score, max_slots=self.max_slots, seed=self.loop.seed,
        )  # fmt: skip


@dataclass
class PPOResult:
    """What `run_ppo` produced."""

    train: TrainResult
    args: ModelArgs
    model_dir: Path  # the best policy (by held-out R_c)
    last_dir: Path
    best_step: int
    best_r_c: float
    heldout: dict[str, float] = field(default_factory=dict)  # the last evaluation


class PPOStage:
    """The PPO step contract for `fit` (see the module docstring)."""

    def __init__(
        self,
        policy: Transformer,
        value: RewardModel,
        reference: Transformer,
        reward_helpful: RewardModel,
        reward_safety: RewardModel,
        batches: PPOBatches,
        heldout: Sequence[PPOPrompt],
        tokenizer: Tokenizer,
        cfg: PPOConfig,
        on_best: Callable[[], object] | None = None,
    ) -> None:
        self.policy, self.value = policy, value  # typed handles on the two trained models
        self.models: dict[str, nn.Module] = {
            "policy": policy, "value": value, "reference": reference,
            "reward_helpful": reward_helpful, "reward_safety": reward_safety,
        }  # fmt: skip
        self.trainable: dict[str, Sequence[nn.Parameter] | None] = {"policy": None, "value": None}
        self.batches = batches
        self.heldout = list(heldout)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.scorer = RewardScorer(reward_helpful, reward_safety, tokenizer, threshold=cfg.safety_threshold)
        self.on_best = on_best
        self.steps = 0  # step() calls = optimizer steps (grad_accum is 1)
        self.best_r_c = float("-inf")
        self.best_step = 0
        self.bad_evals = 0  # evaluations since the best
        self.last_eval: dict[str, float] = {}

    def step(self, batch: dict[str, Tensor]) -> StepOutput:
        policy, value = self.policy, self.value
        tokens, start, mask = batch["tokens"], batch["start"], batch["mask"]
        width = mask.shape[1]
        logprobs = response_logprobs(policy, tokens, start, width)  # (mb, R)
        values = response_values(value, tokens, start, width)  # (mb, R)
        pg, pg_stats = ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, self.cfg.clip
        )
        vf, vf_stats = ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, self.cfg.value_clip
        )
        self.steps += 1
        metrics = {name: float(v) for name, v in zip(ROLLOUT_STATS, batch["stats"].tolist(), strict=True)}
        metrics.update(policy_loss=float(pg.detach()), value_loss=float(vf.detach()), **pg_stats, **vf_stats)
        return StepOutput(loss=pg + self.cfg.vf_coef * vf, metrics=metrics)

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        """Greedy responses to the held-out prompts: mean R_h, mean R_c, exact match (see module doc)."""
        if not self.heldout:
            return {}
        policy = self.policy
        dialogs = [p.dialog for p in self.heldout]
        rows = sample_responses(
            policy, self.tokenizer, dialogs, n=1, temperature=0.0, seed=0,
            max_new_tokens=self.cfg.max_new_tokens, max_slots=self.cfg.max_slots,
        )  # fmt: skip
        texts = [r[0].text for r in rows]
        scores = self.scorer.score(dialogs, texts, [p.is_safety for p in self.heldout])
        exact = sum(p.correct(t) for p, t in zip(self.heldout, texts, strict=True)) / len(texts)
        r_c = float(scores.r_c.mean())
        if r_c > self.best_r_c:
            self.best_r_c, self.best_step, self.bad_evals = r_c, self.steps, 0
            if self.on_best is not None:
                self.on_best()
        else:
            self.bad_evals += 1
        self.last_eval = {
            "heldout_r_h": float(scores.r_h.mean()),
            "heldout_r_c": r_c,
            "exact_match": exact,
            "best_r_c": self.best_r_c,
        }
        return dict(self.last_eval)

    def should_stop(self) -> bool:
        """True after `patience` evaluations in a row without a better held-out R_c (never for 0)."""
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return int(batch["tokens"].numel())

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "best_r_c": self.best_r_c, "best_step": self.best_step,
            "bad_evals": self.bad_evals, "last_eval": dict(self.last_eval),
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.steps = int(state["steps"])
        self.best_r_c = float(state["best_r_c"])
        self.best_step = int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])
        self.last_eval = {str(k): float(v) for k, v in dict(state.get("last_eval", {})).items()}


def _check_vocab(name: str, args: ModelArgs, vocab: int) -> None:
    if args.vocab_size != vocab:
        raise ConfigError(f"{name} has a vocabulary of {args.vocab_size}, the policy's tokenizer {vocab}")


def run_ppo(cfg: PPOConfig) -> PPOResult:
    """Train `cfg.model` with PPO against the two reward models (see the module docstring).

    Raises:
        ConfigError: bad settings (grad_accum != 1, rollout_batch not a multiple of mini_batch, ...),
            no tokenizer, or vocabularies that differ.
        CheckpointError: an unreadable policy or reward-model folder.
    """
    loop_cfg = cfg.loop
    if loop_cfg.grad_accum != 1:
        raise ConfigError(
            "PPO takes one gradient step per mini-batch; expected loop.grad_accum 1, "
            f"got {loop_cfg.grad_accum}"
        )
    settings = cfg.rollout_settings()
    device = resolve_device(loop_cfg.device)
    out_dir = prepare_run_dir(loop_cfg.out_dir, resume=cfg.resume, overwrite=loop_cfg.overwrite)
    save_dtype = parse_save_dtype(cfg.save_dtype)

    loaded = load_model(cfg.model, dtype=torch.float32, progress=False)
    policy, args = loaded.model, loaded.args
    reference = load_model(cfg.model, dtype=torch.float32, progress=False).model
    tok_path = require_tokenizer(
        loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer` in the PPO config"
    )
    tokenizer = Tokenizer.from_file(tok_path)
    _check_vocab(f"policy {cfg.model}", args, tokenizer.vocab_size)
    r_help, _, _ = load_reward_model(cfg.reward_helpful)
    r_safe, _, _ = load_reward_model(cfg.reward_safety)
    value, _, _ = load_reward_model(cfg.value_init or cfg.reward_helpful)
    for name, rm in (("reward_helpful", r_help), ("reward_safety", r_safe), ("value_init", value)):
        _check_vocab(name, rm.args, tokenizer.vocab_size)
    policy.requires_grad_(True)
    value.requires_grad_(True)

    pool = prompt_pool("train", cfg.n_prompts_per_task, cfg.safety_fraction, loop_cfg.seed)
    heldout = prompt_pool("heldout", cfg.heldout_n_per_task, cfg.safety_fraction, loop_cfg.seed + 1)
    scorer = RewardScorer(r_help, r_safe, tokenizer, threshold=cfg.safety_threshold)
    amp = resolve_dtype(loop_cfg.dtype, device)
    batches = PPOBatches(policy, value, reference, scorer, tokenizer, pool, settings, amp)
    model_dir = out_dir / "model"
    stage = PPOStage(
        policy, value, reference, r_help, r_safe, batches, heldout, tokenizer, cfg,
        on_best=lambda: save_model(policy, args, model_dir, tok_path, save_dtype),
    )  # fmt: skip
    print(
        f"PPO: {len(pool)} train prompts ({sum(p.is_safety for p in pool)} safety), {len(heldout)} held-out; "
        f"rollouts of {cfg.rollout_batch}, mini-batches of {cfg.mini_batch}, {cfg.ppo_epochs} epoch(s)",
        flush=True,
    )
    result = fit(stage, loop_cfg, resume=cfg.resume, on_start=lambda folder: write_run_files(folder, cfg))
    policy.cpu()
    last_dir = save_model(policy, args, out_dir / "last", tok_path, save_dtype)
    if not (model_dir / "params.json").exists():  # no evaluation improved (cannot happen with one eval)
        save_model(policy, args, model_dir, tok_path, save_dtype)
    summary = {
        "step": result.step,
        "best_step": stage.best_step,
        "best_heldout_r_c": stage.best_r_c,
        "heldout": stage.last_eval,
        "wall_time_s": result.wall_time_s,
        "train_metrics": result.metrics,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return PPOResult(
        train=result, args=args, model_dir=model_dir, last_dir=last_dir, best_step=stage.best_step,
        best_r_c=stage.best_r_c, heldout=dict(stage.last_eval),
    )  # fmt: skip


__all__ = ["PPOConfig", "PPOResult", "PPOStage", "run_ppo"]
