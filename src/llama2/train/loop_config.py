"""`LoopConfig`: the optimisation and bookkeeping settings every training stage shares (read by
`llama2.train.trainer.fit`; stage configs carry one as their `loop` table or inherit its fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from llama2.errors import ConfigError


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings shared by every training stage."""

    lr: float = field(
        default=3e-4, metadata={"help": "peak learning rate (paper: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B)"}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "cosine decays to min_lr_ratio * lr (paper: 10% of the peak)"}
    )
    warmup_steps: int = field(
        default=100, metadata={"help": "linear warmup from lr/warmup_steps to lr (paper: 2000 steps)"}
    )
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences per micro-batch (read by the data builders)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "applied to matrices (ndim >= 2) only, see `param_groups`"}
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (paper: 0.9)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)"})
    eps: float = field(default=1e-5, metadata={"help": "AdamW epsilon (paper: 1e-5)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables clipping"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "autocast dtype: auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda | cuda:N | mps"}
    )
    compile: bool = field(
        default=False, metadata={"help": "wrap the model in torch.compile for the forward/backward"}
    )
    eval_every: int = field(
        default=100,
        metadata={"help": "evaluate on the validation batches every N steps (0: only at the end)"},
    )
    eval_batches: int = field(default=20, metadata={"help": "validation micro-batches per evaluation"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "how many step checkpoints to keep (older ones are deleted)"}
    )
    log_every: int = field(
        default=10, metadata={"help": "write a train-loss record to metrics.jsonl every N steps"}
    )
    seed: int = field(default=1337, metadata={"help": "seed of the weights init and the batch order"})
    out_dir: Path = field(
        default=Path("runs/train"), metadata={"help": "run folder: checkpoints, metrics, config, model"}
    )
    threads: int = field(
        default=0, metadata={"help": "CPU threads for torch (0: torch's default, one per core)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a tqdm bar"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "start a new run in an out_dir that already holds one (its checkpoints and metrics "
            "are deleted); without it such an out_dir is refused unless resuming"
        },
    )

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        positive = ("max_steps", "batch_size", "grad_accum")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"LoopConfig.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"LoopConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"LoopConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lr > 0:
            raise ConfigError(f"LoopConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"LoopConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"LoopConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )

    def loop_config(self) -> LoopConfig:
        """The plain `LoopConfig` part of a stage's config (which subclasses it with more fields)."""
        names = {f.name for f in dataclasses.fields(LoopConfig)}
        return LoopConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
