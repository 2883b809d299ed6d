"""Direct Preference Optimization (Rafailov et al. 2023) on the reward models' preference pairs.

`run_dpo(DPOConfig(...))` is the whole stage, an alternative to reward modelling + PPO that trains the
policy on the same pairs (`llama2.data.preferences.PreferencePair` JSONL) directly:

1. load the start model (`model`, default the embedded `chat`) twice in float32: the trained
   `policy` and a frozen `reference` copy (the trainer never saves frozen models; a resume rebuilds it
   from `model`);
2. read the pairs, keep the `kinds` asked for and drop those rated below `min_rating` (by default the
   `negligibly_better` ones: the annotator had no real preference, so they carry no signal);
3. encode each response as the reward models see it, `reward_tokens(tokenizer, dialog, response)` =
   prompt + response + EOS, with a response mask that is True on the response tokens and the EOS and
   False on the prompt (the prompt is `encode_dialog(dialog)`, checked to be a prefix);
4. run the trainer (`llama2.train.trainer.fit`) on `DPOStage`: each micro-batch is the chosen rows then
   the rejected rows, right-padded; the sequence log-probability is the sum over response positions of
   `log_softmax(logits[:, :-1])` gathered at `tokens[:, 1:]`, for the policy (with grad) and the
   reference (under `no_grad`, recomputed every step: exact and simple, no cache to go stale);
   the loss is `rl_losses.dpo_loss` (eq. 7 of the paper, with optional conservative label smoothing);
5. save the policy to `<out_dir>/model` (a normal model folder) and `<out_dir>/summary.json`.

Decisions: pairs longer than the model's context are dropped (counted in the summary) rather than cut,
since a cut response loses its EOS; validation uses `val_data` only (pairs share prompts, so a random
hold-out of `data` would leak them); the batch order is a seeded shuffle per epoch and the position is
saved in every checkpoint, so on CPU in float32 a resumed run is bit-identical to an uninterrupted one.
Defaults follow the DPO paper (beta 0.1, a small learning rate) with a cosine schedule and a warmup of
3% of the default 1000 steps. The config nests::

    model = "runs/sft/model"
    data = "pairs.jsonl"
    beta = 0.1
    [loop]
    lr = 1e-5
    max_steps = 200
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from llama2.chat import Message, encode_dialog
from llama2.checkpoint.load import load_model
from llama2.checkpoint.tokenizer_path import model_tokenizer
from llama2.config import ModelArgs
from llama2.data.preferences import KINDS, PreferencePair, read_pairs, reward_tokens
from llama2.errors import ConfigError, DialogError
from llama2.runtime import resolve_device
from llama2.tokenizer import Tokenizer
from llama2.train.checkpointing import prepare_run_dir
from llama2.train.loop_config import LoopConfig
from llama2.train.pretrain import parse_save_dtype, save_model, write_json, write_run_files
from llama2.train.rl_losses import RATINGS, dpo_loss
from llama2.train.run_config import config_to_dict, flat_aliases
from llama2.train.trainer import StepOutput, TrainResult, fit, move_to

DPOBatch = dict[str, Tensor]  # {"tokens": (2B, T) int64, "mask": (2B, T) bool}: chosen rows, then rejected


def _dpo_loop() -> LoopConfig:
    """DPO's loop defaults: a small learning rate, warmup 30 = 3% of max_steps 1000, cosine decay."""
    return LoopConfig(lr=1e-5, warmup_steps=30, max_steps=1000)


@flat_aliases
@dataclass
class DPOConfig:
    """`llama2 train dpo`: start model, preference pairs, the DPO settings and a `[loop]` table."""

    model: Path = field(
        default=Path("chat"), metadata={"help": "start model (policy and frozen reference): folder or name"}
    )
    data: Path = field(default=Path("pairs.jsonl"), metadata={"help": "preference pairs JSONL"})
    val_data: Path | None = field(
        default=None, metadata={"help": "held-out pairs for validation loss/accuracy; none: no validation"}
    )
    tokenizer: Path | None = field(
        default=None, metadata={"help": "default: the tokenizer.model next to the start model"}
    )
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL to the reference"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "assumed rate of flipped labels (conservative DPO), in [0, 0.5)"}
    )
    kinds: list[str] = field(
        default_factory=lambda: list(KINDS), metadata={"help": "pair kinds to use: helpfulness, safety"}
    )
    min_rating: str = field(
        default="slightly_better",
        metadata={
            "help": "weakest rating kept: significantly_better > better > slightly_better > negligibly_better"
        },
    )
    save_dtype: str = field(
        default="float32", metadata={"help": "dtype of the saved model: float32 | bfloat16 | float16"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/checkpoints/latest"})
    loop: LoopConfig = field(default_factory=_dpo_loop, metadata={"help": "the training loop ([loop] table)"})

    ALIASES: ClassVar[dict[str, str]] = {f.name: f"loop.{f.name}" for f in dataclasses.fields(LoopConfig)}

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"DPO beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPO label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(
                f"DPO kinds {bad or '[]'} invalid; expected a non-empty subset of {list(KINDS)}"
            )
        if self.min_rating not in RATINGS:
            raise ConfigError(f"DPO min_rating must be one of {list(RATINGS)}, got {self.min_rating!r}")


@dataclass
class DPOResult:
    """What `run_dpo` produced."""

    train: TrainResult
    args: ModelArgs
    model_dir: Path
    n_train_pairs: int
    n_val_pairs: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs dropped from `data`


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class EncodedPair:
    """A pair's two token rows (prompt + response + EOS) and where each response starts."""

    chosen: list[int]
    chosen_start: int
    rejected: list[int]
    rejected_start: int


def response_row(tokenizer: Tokenizer, dialog: Sequence[Message], response: str) -> tuple[list[int], int]:
    """(`reward_tokens` row, index of the first response token); the mask is True from there to the end."""
    tokens = reward_tokens(tokenizer, dialog, response)
    prompt = encode_dialog(dialog, tokenizer, sanitize=True)  # as `reward_tokens` encodes it
    if tokens[: len(prompt)] != prompt or len(tokens) <= len(prompt):
        raise DialogError(
            f"the prompt of {dialog!r} does not tokenize to a prefix of prompt + response {response!r}; "
            "expected the chat format's prompt tokens to come first"
        )
    return tokens, len(prompt)


def select_pairs(
    pairs: Sequence[PreferencePair], kinds: Sequence[str], min_rating: str
) -> tuple[list[PreferencePair], dict[str, int]]:
    """(kept pairs, reason -> number dropped): only `kinds`, only ratings at least `min_rating`."""
    worst = RATINGS.index(min_rating)
    kept: list[PreferencePair] = []
    dropped = {"kind": 0, "rating": 0}
    for p in pairs:
        if p.kind not in kinds:
            dropped["kind"] += 1
        elif p.rating not in RATINGS or RATINGS.index(p.rating) > worst:
            dropped["rating"] += 1
        else:
            kept.append(p)
    return kept, dropped


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_len: int
) -> tuple[list[EncodedPair], int]:
    """(encoded pairs, number dropped because a row is longer than `max_len`)."""
    out: list[EncodedPair] = []
    too_long = 0
    for p in pairs:
        chosen, c0 = response_row(tokenizer, p.dialog, p.chosen)
        rejected, r0 = response_row(tokenizer, p.dialog, p.rejected)
        if max(len(chosen), len(rejected)) > max_len:
            too_long += 1
            continue
        out.append(EncodedPair(chosen, c0, rejected, r0))
    return out, too_long


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> DPOBatch:
    """Right-padded rows: the chosen responses of `pairs`, then their rejected ones."""
    rows = [(p.chosen, p.chosen_start) for p in pairs] + [(p.rejected, p.rejected_start) for p in pairs]
    width = max(len(r) for r, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (2B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (2B, T) True on response + EOS
    for i, (row, start) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start : len(row)] = True
    return {"tokens": tokens, "mask": mask}


class DPOBatches:
    """Endless, resumable micro-batches of pairs: a seeded shuffle per epoch, the position saved in
    checkpoints (the last batch of an epoch may be short). Satisfies `trainer.ResumableBatches`."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, seed: int, pad_id: int) -> None:
        if not pairs:
            raise ConfigError("no preference pairs to train on; expected at least one")
        self.pairs, self.batch_size, self.seed, self.pad_id = list(pairs), batch_size, seed, pad_id
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(len(self.pairs)))
            random.Random(f"dpo/{self.seed}/{self.epoch}").shuffle(self._order)
        return self._order

    def __iter__(self) -> DPOBatches:
        return self

    def __next__(self) -> DPOBatch:
        if self.pos >= len(self.pairs):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        ids = self._epoch_order()[self.pos : self.pos + self.batch_size]
        self.pos += len(ids)
        return collate([self.pairs[i] for i in ids], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


# ----------------------------------------------------------------------------------------- stage
def sequence_logprobs(model: nn.Module, tokens: Tensor, mask: Tensor) -> Tensor:
    """(B,) sum of log p(tokens[t] | tokens[:t]) over the positions t where `mask` is True."""
    logits = model(tokens)[:, :-1].float()  # (B, T-1, V): predicts tokens[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return torch.where(mask[:, 1:], logp, torch.zeros_like(logp)).sum(-1)  # (B,)


class DPOStage:
    """The DPO step on `fit`: trains `policy`, scores with the frozen `reference` (see module docstring)."""

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        batches: DPOBatches,
        val_batches: Sequence[DPOBatch] | None = None,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
    ) -> None:
        self.models: dict[str, nn.Module] = {"policy": policy, "reference": reference}
        self.trainable: dict[str, Sequence[nn.Parameter] | None] = {"policy": None}
        self.batches = batches
        self.val_batches = val_batches
        self.beta, self.label_smoothing = beta, label_smoothing

    def losses(self, batch: DPOBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean DPO loss, per-pair tensors) of one batch of chosen rows then rejected rows."""
        tokens, mask = batch["tokens"], batch["mask"]
        n = tokens.shape[0] // 2
        policy = sequence_logprobs(self.models["policy"], tokens, mask)  # (2B,)
        with torch.no_grad():
            ref = sequence_logprobs(self.models["reference"], tokens, mask)  # (2B,)
        loss, chosen, rejected = dpo_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], beta=self.beta, label_smoothing=self.label_smoothing
        )
        per_pair = {"chosen": chosen.detach(), "rejected": rejected.detach(), "logps": policy.detach()}
        return loss, per_pair

    @staticmethod
    def _metrics(per_pair: Mapping[str, Tensor]) -> dict[str, float]:
        chosen, rejected, logps = per_pair["chosen"], per_pair["rejected"], per_pair["logps"]
        n = chosen.shape[0]
        return {
            "reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()),
            "logps_chosen": float(logps[:n].mean()),
            "logps_rejected": float(logps[n:].mean()),
        }

    def step(self, batch: DPOBatch) -> StepOutput:
        loss, per_pair = self.losses(batch)
        return StepOutput(loss=loss, metrics=self._metrics(per_pair))

    def evaluate(self, max_batches: int, device: torch.device) -> dict[str, float]:
        """Validation loss, reward accuracy and margin, each a mean over pairs."""
        if not self.val_batches:
            return {}
        total: dict[str, float] = {}
        n_pairs = 0
        for i, batch in enumerate(self.val_batches):
            if max_batches and i >= max_batches:
                break
            loss, per_pair = self.losses(move_to(batch, device))
            n = per_pair["chosen"].shape[0]
            m = self._metrics(per_pair)
            for k, v in {"loss": float(loss), **m}.items():
                if k in ("loss", "reward_accuracy", "reward_margin"):
                    total[k] = total.get(k, 0.0) + v * n
            n_pairs += n
        return {k: v / n_pairs for k, v in total.items()}

    def tokens_in(self, batch: DPOBatch) -> int:
        return int(batch["tokens"].numel())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # nothing beyond the batches' position, which the trainer restores


# ---------------------------------------------------------------------------------------- runner
def _read_selected(path: Path, cfg: DPOConfig, what: str) -> tuple[list[PreferencePair], dict[str, int]]:
    if not Path(path).is_file():
        raise ConfigError(f"{what} pairs file {path} does not exist; expected a preference pairs JSONL")
    pairs, dropped = select_pairs(read_pairs(path), cfg.kinds, cfg.min_rating)
    if not pairs:
        raise ConfigError(
            f"no {what} pairs left in {path} after keeping kinds {cfg.kinds} rated at least "
            f"{cfg.min_rating!r} (dropped: {dropped}); expected at least one"
        )
    return pairs, dropped


def run_dpo(cfg: DPOConfig) -> DPOResult:
    """Train `cfg.model` with DPO on `cfg.data` (see the module docstring).

    Raises:
        ConfigError: bad settings, no tokenizer, no pairs left after filtering.
        DialogError: malformed pairs (bad JSONL lines, dialogs that are not a prompt).
        CheckpointError: unreadable start model or checkpoint to resume.
    """
    loop_cfg = cfg.loop
    resolve_device(loop_cfg.device)
    out_dir = prepare_run_dir(loop_cfg.out_dir, resume=cfg.resume, overwrite=loop_cfg.overwrite)
    save_dtype = parse_save_dtype(cfg.save_dtype)
    loaded = load_model(cfg.model, dtype=torch.float32, progress=False)
    policy, args = loaded.model, loaded.args
    tokenizer, tok_path = model_tokenizer(
        loaded.tokenizer_path, cfg.tokenizer, cfg.model, "set `tokenizer` in the DPO config", args.vocab_size
    )
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id

    train_pairs, dropped = _read_selected(cfg.data, cfg, "training")
    train_enc, dropped["too_long"] = encode_pairs(train_pairs, tokenizer, args.max_seq_len)
    if not train_enc:
        raise ConfigError(
            f"every pair in {cfg.data} is longer than the model's context {args.max_seq_len}; "
            "expected shorter pairs"
        )
    batches = DPOBatches(train_enc, loop_cfg.batch_size, seed=loop_cfg.seed, pad_id=pad_id)
    val_batches: list[DPOBatch] | None = None
    n_val = 0
    if cfg.val_data is not None:
        val_enc, _ = encode_pairs(
            _read_selected(cfg.val_data, cfg, "validation")[0], tokenizer, args.max_seq_len
        )
        n_val = len(val_enc)
        bs = loop_cfg.batch_size
        val_batches = [collate(val_enc[i : i + bs], pad_id) for i in range(0, n_val, bs)]

    for p in policy.parameters():
        p.requires_grad_(True)
    reference = copy.deepcopy(policy)  # frozen by `fit`; identical to the policy at step 0
    print(
        f"DPO: {len(train_enc)} train pairs (dropped {dropped}), {n_val} val pairs; beta {cfg.beta}, "
        f"label smoothing {cfg.label_smoothing}",
        flush=True,
    )
    stage = DPOStage(
        policy, reference, batches, val_batches, beta=cfg.beta, label_smoothing=cfg.label_smoothing
    )
    result = fit(stage, loop_cfg, resume=cfg.resume, on_start=lambda folder: write_run_files(folder, cfg))

    policy.cpu()
    model_dir = save_model(policy, args, out_dir / "model", tok_path, save_dtype)
    summary = {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_time_s": result.wall_time_s,
        "metrics": result.metrics,
        "train_pairs": len(train_enc),
        "val_pairs": n_val,
        "dropped": dropped,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "summary.json", summary)
    return DPOResult(
        train=result, args=args, model_dir=model_dir, n_train_pairs=len(train_enc), n_val_pairs=n_val,
        dropped=dropped,
    )  # fmt: skip
