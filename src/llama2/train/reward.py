"""Reward-model training (Llama 2 paper, sec. 3.2.2): a binary ranking loss over preference pairs.

`run_reward(RewardConfig(...))` is the whole stage:

1. load the chat model's checkpoint (`model`) in float32 as the trunk of a `RewardModel` (a fresh
   `Linear(dim, 1)` head seeded by `loop.seed`; the trunk's vocabulary head is kept, untrained);
2. read the pairs (`data.preferences.read_pairs`), encode each side with `reward_tokens` (prompt +
   response + EOS); hold out `val_fraction` of them unless `val_data` is given. Pairs with a side
   longer than the context window are skipped (counted in `summary.json`);
3. train with `train.trainer.fit` on `RewardStage`: each micro-batch stacks `batch_size` chosen rows
   then the same pairs' rejected rows, right padded, scored at their EOS; the loss is
   `margin_ranking_loss(r_c, r_r, margin_for(ratings, margin))` = mean -log sigmoid(r_c - r_r - m(r))
   (paper eq. 2, with the margin of Table 27's "small"/"large" tables, or "none" for eq. 1);
   metrics `accuracy` (r_c > r_r) and `margin` (mean r_c - r_r); evaluation: val loss and accuracy;
4. save `out_dir/model` (`save_reward_model`, reward.json with objective, margin, threshold 0.15,
   data), `out_dir/summary.json` and the held-out report (`eval.reward_eval`) in `out_dir/eval.json`.

Defaults follow the paper's reward-model recipe where a small model allows it: one epoch (more
over-fits, sec. 3.2.2), AdamW as in pretraining, cosine decay to 10 % of the peak, warm-up 3 % of
the steps (at least 5). The peak LR is 1e-4, not the paper's 5e-6/1e-5: those are for 7B-70B
trunks and ~1M pairs; our trunks are a few million parameters with a freshly initialised head and a
few thousand pairs, i.e. one epoch is tens to hundreds of steps, and (as in our SFT and pretraining
runs, which also use about 10x the paper's LR) the small model needs the larger steps to move at
all in one epoch. Sentinels in the `[loop]` table: `max_steps = 0` means one epoch, i.e.
ceil(train pairs / (batch_size * grad_accum)) optimizer steps; `warmup_steps = -1` means
max(5, round(0.03 * max_steps)) (capped at max_steps). `batch_size` counts pairs per micro-batch
(each micro-batch holds 2 * batch_size rows).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from llama2.checkpoint.load import load_model
from llama2.checkpoint.reward_io import save_reward_model
from llama2.checkpoint.tokenizer_path import model_tokenizer
from llama2.data.preferences import PreferencePair, read_pairs, reward_tokens
from llama2.errors import ConfigError
from llama2.model.reward import RewardModel, pad_rows
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir
from llama2.train.loop_config import LoopConfig
from llama2.train.pretrain import parse_save_dtype, write_json, write_run_files
from llama2.train.reward_calibration import calibrate_safety
from llama2.train.reward_report import RewardEvalReport, evaluate_reward_model
from llama2.train.rl_losses import MARGINS, SAFETY_THRESHOLD, margin_for, margin_ranking_loss
from llama2.train.run_config import config_to_dict, flat_aliases
from llama2.train.trainer import StepOutput, TrainResult, fit

OBJECTIVES = ("helpfulness", "safety")
EPOCH = 0  # max_steps sentinel: one epoch over the training pairs
AUTO_WARMUP = -1  # warmup_steps sentinel: 3 % of the steps, at least 5


@dataclass
class RewardLoopConfig(LoopConfig):
    """`LoopConfig` with the reward stage's defaults and two sentinels (see the module docstring)."""

    lr: float = field(default=1e-4, metadata={"help": "peak LR (paper: 5e-6 for 70B, 1e-5 otherwise)"})
    max_steps: int = field(default=EPOCH, metadata={"help": "optimizer steps; 0: one epoch (the paper's)"})
    warmup_steps: int = field(
        default=AUTO_WARMUP, metadata={"help": "linear warm-up steps; -1: 3% of max_steps, at least 5"}
    )
    batch_size: int = field(default=8, metadata={"help": "preference pairs per micro-batch (2x rows)"})
    out_dir: Path = field(default=Path("runs/reward"), metadata={"help": "run folder"})

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ConfigError(f"loop.max_steps must be >= 0 (0: one epoch), got {self.max_steps}")
        if self.warmup_steps < AUTO_WARMUP:
            raise ConfigError(
                f"loop.warmup_steps must be >= -1 (-1: 3% of the steps), got {self.warmup_steps}"
            )
        steps, warmup = self.max_steps, self.warmup_steps
        self.max_steps, self.warmup_steps = max(steps, 1), max(warmup, 0)  # let LoopConfig check the rest
        super().__post_init__()
        self.max_steps, self.warmup_steps = steps, warmup

    def resolved(self, n_pairs: int) -> LoopConfig:
        """The plain `LoopConfig` for `n_pairs` training pairs, sentinels replaced."""
        steps = self.max_steps or math.ceil(n_pairs / (self.batch_size * self.grad_accum))
        warmup = self.warmup_steps if self.warmup_steps != AUTO_WARMUP else max(5, round(0.03 * steps))
        warmup = min(warmup, steps)
        return dataclasses.replace(self, max_steps=steps, warmup_steps=warmup).loop_config()


@flat_aliases
@dataclass
class RewardConfig:
    """`llama2 train reward`: train a helpfulness or safety reward model on preference pairs."""

    model: Path = field(default=Path("chat"), metadata={"help": "trunk checkpoint (the chat model)"})
    data: Path = field(default=Path("pairs.jsonl"), metadata={"help": "preference pairs (JSONL)"})
    val_data: Path | None = field(
        default=None, metadata={"help": "held-out pairs; none: hold out val_fraction of `data`"}
    )
    val_fraction: float = field(default=0.05, metadata={"help": "share of `data` held out without val_data"})
    objective: str = field(default="helpfulness", metadata={"help": "helpfulness | safety"})
    margin: str = field(default="small", metadata={"help": "rating margin table: small | large | none"})
    calibrate: bool | None = field(
        default=None,
        metadata={"help": "Platt-calibrate sigmoid(score) on safety pairs (default: safety RM, if possible)"},
    )
    tokenizer: Path | None = field(default=None, metadata={"help": "default: the one beside `model`"})
    save_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/checkpoints/latest"})
    loop: RewardLoopConfig = field(default_factory=RewardLoopConfig, metadata={"help": "[loop] table"})

    ALIASES: ClassVar[dict[str, str]] = {
        f.name: f"loop.{f.name}" for f in dataclasses.fields(RewardLoopConfig)
    }


@dataclass
class RewardResult:
    """What `run_reward` produced."""

    train: TrainResult
    model_dir: Path
    n_train_pairs: int
    n_val_pairs: int
    report: RewardEvalReport | None  # held-out report (None without held-out pairs)
    loop: LoopConfig  # the resolved loop settings (steps, warm-up)


@dataclass(frozen=True)
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, margin: str, max_len: int
) -> tuple[list[EncodedPair], int]:
    """(encoded pairs whose sides both fit in `max_len` tokens, number skipped as too long)."""
    margins = margin_for([p.rating for p in pairs], margin).tolist() if pairs else []
    out, skipped = [], 0
    for p, m in zip(pairs, margins, strict=True):
        c = reward_tokens(tokenizer, p.dialog, p.chosen)
        r = reward_tokens(tokenizer, p.dialog, p.rejected)
        if len(c) > max_len or len(r) > max_len:
            skipped += 1
            continue
        out.append(EncodedPair(c, r, float(m)))
    return out, skipped


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, Tensor]:
    """A micro-batch: tokens (2B, T) (chosen rows first), index (2B,) of each EOS, margin (B,)."""
    tokens, index = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
    return {"tokens": tokens, "index": index, "margin": margin}


class PairBatches:
    """Endless micro-batches of `batch_size` pairs in a seeded shuffled order per epoch (the last
    micro-batch of an epoch may be smaller). `state_dict` holds the epoch, its order and the position,
    so a resumed run sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, seed: int, pad_id: int) -> None:
        if not pairs:
            raise ConfigError("no training pairs left; expected at least one pair that fits the context")
        self.pairs, self.batch_size, self.seed, self.pad_id = list(pairs), batch_size, seed, pad_id
        self.epoch, self.position = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"reward/{self.seed}/{epoch}").shuffle(order)
        return order

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.position >= len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        ids = self.order[self.position : self.position + self.batch_size]
        self.position += len(ids)
        return collate([self.pairs[i] for i in ids], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "order": list(self.order)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        order = [int(i) for i in state["order"]]
        if sorted(order) != list(range(len(self.pairs))):
            raise ConfigError(
                f"resume: the saved batch order covers {len(order)} pairs, this run has {len(self.pairs)}; "
                "expected the same training pairs"
            )
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), order


def pair_scores(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen (B,), rejected (B,)) raw scores of a `collate` batch."""
    scores: Tensor = model(batch["tokens"], batch["index"])  # (2B,)
    n = batch["margin"].shape[0]
    return scores[:n], scores[n:]


class RewardStage:
    """The `fit` stage of reward-model training (see the module docstring)."""

    def __init__(
        self, model: RewardModel, batches: PairBatches, val_batches: Sequence[dict[str, Tensor]]
    ) -> None:
        self.models: dict[str, nn.Module] = {"reward": model}
        # The trunk's vocabulary head is unused: kept (the trunk stays a loadable model), not trained.
        trained = [p for n, p in model.named_parameters() if not n.startswith("trunk.output.")]
        self.trainable: dict[str, Sequence[nn.Parameter] | None] = {"reward": trained}
        self.batches = batches
        self.val_batches = list(val_batches)

    def step(self, batch: dict[str, Tensor]) -> StepOutput:
        chosen, rejected = pair_scores(self.models["reward"], batch)
        loss = margin_ranking_loss(chosen, rejected, batch["margin"])
        diff = (chosen - rejected).detach()  # (B,)
        return StepOutput(loss, {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())})

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        if not self.val_batches:
            return {}
        loss_sum, correct, n = 0.0, 0.0, 0
        for i, batch in enumerate(self.val_batches):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            chosen, rejected = pair_scores(self.models["reward"], batch)
            b = chosen.shape[0]
            loss_sum += float(margin_ranking_loss(chosen, rejected, batch["margin"])) * b
            correct += float((chosen > rejected).float().sum())
            n += b
        return {"loss": loss_sum / n, "accuracy": correct / n}

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return int((batch["index"] + 1).sum())  # real tokens, padding excluded

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def split_pairs(
    pairs: list[PreferencePair], val_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out): `val_fraction` of the pairs chosen by a seeded shuffle."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(pairs)))
    if n_val >= len(pairs):
        raise ConfigError(f"val_fraction {val_fraction} leaves no training pairs out of {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(f"reward-split/{seed}").shuffle(order)
    held = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def run_reward(cfg: RewardConfig) -> RewardResult:
    """Train a reward model as `cfg` says (see the module docstring).

    Raises:
        ConfigError: bad settings, no tokenizer, or no pair that fits the context.
        CheckpointError / DialogError: an unreadable trunk or pairs file.
    """
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be 'helpfulness' or 'safety', got {cfg.objective!r}")
    if cfg.margin not in MARGINS:
        raise ConfigError(f"margin must be one of {sorted(MARGINS)}, got {cfg.margin!r}")
    save_dtype = parse_save_dtype(cfg.save_dtype)
    resolve_device(cfg.loop.device)  # a device this machine lacks fails now, not after data preparation
    out_dir = prepare_run_dir(cfg.loop.out_dir, resume=cfg.resume, overwrite=cfg.loop.overwrite)
    loaded = load_model(cfg.model, dtype=torch.float32, progress=False)
    tokenizer, tok_path = model_tokenizer(
        loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer`", loaded.args.vocab_size
    )
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    seed = cfg.loop.seed
    pairs = read_pairs(cfg.data)
    if cfg.val_data is not None:
        train_pairs, val_pairs = pairs, read_pairs(cfg.val_data)
    else:
        train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, seed)
    max_len = loaded.args.max_seq_len
    train_enc, skipped = encode_pairs(train_pairs, tokenizer, cfg.margin, max_len)
    val_enc, val_skipped = encode_pairs(val_pairs, tokenizer, cfg.margin, max_len)
    bs = cfg.loop.batch_size
    batches = PairBatches(train_enc, bs, seed, pad_id)
    val_batches = [collate(val_enc[i : i + bs], pad_id) for i in range(0, len(val_enc), bs)]
    loop = cfg.loop.resolved(len(train_enc))

    torch.manual_seed(seed)  # the head's init
    model = RewardModel(loaded.model)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("trunk.output."))
    print(
        f"reward ({cfg.objective}, margin {cfg.margin}): {len(train_enc)} train pairs, {len(val_enc)} "
        f"held out, {skipped + val_skipped} skipped as longer than {max_len} tokens; {loop.max_steps} "
        f"steps, warm-up {loop.warmup_steps}",
        flush=True,
    )
    stage = RewardStage(model, batches, val_batches)
    result = fit(stage, loop, resume=cfg.resume, on_start=lambda folder: write_run_files(folder, cfg))

    model.cpu().eval()
    info: dict[str, Any] = {
        "objective": cfg.objective, "margin": cfg.margin, "threshold": SAFETY_THRESHOLD,
        "data": str(cfg.data), "base": str(cfg.model), "steps": result.step,
    }  # fmt: skip
    if cfg.calibrate if cfg.calibrate is not None else cfg.objective == "safety":
        kept_train = [p for p in train_pairs if _fits(p, tokenizer, max_len)]
        try:
            calibration = calibrate_safety(model, tokenizer, kept_train, bs)
        except ConfigError as e:
            if cfg.calibrate:  # asked for explicitly: the run must not end uncalibrated
                raise
            calibration = None  # by default: say so, and leave the raw scores
            print(f"warning: not calibrated ({e}); sigmoid(score) has no absolute level", flush=True)
        info["calibration"] = calibration.to_json() if calibration is not None else None
        if calibration is not None:
            print(f"calibrated: scale {calibration.scale:.3f}, shift {calibration.shift:+.3f}", flush=True)
    model_dir = save_reward_model(model, out_dir / "model", tok_path, info, save_dtype)
    report = None
    if val_enc:
        kept = [p for p in val_pairs if _fits(p, tokenizer, max_len)]
        report = evaluate_reward_model(model, tokenizer, kept, bs)
        write_json(out_dir / "eval.json", report.to_json())
    summary = {
        "step": result.step, "max_steps": loop.max_steps, "warmup_steps": loop.warmup_steps,
        "train_loss": result.train_loss, "val_loss": result.val_loss, "train_metrics": result.metrics,
        "tokens_seen": result.tokens_seen, "wall_time_s": result.wall_time_s,
        "train_pairs": len(train_enc), "val_pairs": len(val_enc), "skipped_too_long": skipped + val_skipped,
        "val_accuracy": report.accuracy() if report is not None else None,
        "config": config_to_dict(cfg),
    }  # fmt: skip
    write_json(out_dir / "summary.json", summary)
    return RewardResult(result, model_dir, len(train_enc), len(val_enc), report, loop)


def _fits(pair: PreferencePair, tokenizer: Tokenizer, max_len: int) -> bool:
    return all(len(reward_tokens(tokenizer, pair.dialog, r)) <= max_len for r in (pair.chosen, pair.rejected))


__all__ = [
    "PairBatches",
    "RewardConfig",
    "RewardLoopConfig",
    "RewardResult",
    "RewardStage",
    "collate",
    "encode_pairs",
    "run_reward",
]
