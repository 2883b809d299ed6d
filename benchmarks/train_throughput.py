"""Training throughput (tokens/s) of our Transformer vs transformers' LlamaForCausalLM, same shape.

Both models get the same initial weights (ours exported with the q/k permutation), the same AdamW
(our `build_optimizer`: betas 0.9/0.95, eps 1e-5, decay on matrices), the same batches and the same
loss (cross-entropy on float32 logits); one step = forward + backward + clip + AdamW step. Rounds
alternate between the two models so that load from other processes hits both alike; the first
`--warmup` steps of each model are excluded; the table shows the median round.

    python benchmarks/train_throughput.py                      # dim 256, 4 layers, float32 on CPU
    python benchmarks/train_throughput.py --dtype bfloat16     # bf16 autocast (slower on most CPUs)
    python benchmarks/train_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.model import Transformer
from llama2.train.loop import LoopConfig, build_optimizer
from llama2.train.pretrain import init_weights


def hf_model(model: Transformer, args: ModelArgs) -> nn.Module:
    """transformers' LlamaForCausalLM with `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint import keymaps

    cfg = LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k != "architectures"})
    hf = LlamaForCausalLM(cfg)
    sd = {}
    for name, t in model.state_dict().items():
        hf_name = keymaps.rename(name, keymaps.META_TO_HF)
        assert hf_name is not None
        if name.endswith("attention.wq.weight"):
            t = keymaps.meta_to_hf_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = keymaps.meta_to_hf_qk(t, args.kv_heads)
        sd[hf_name] = t.clone()
    hf.load_state_dict(sd, strict=True)
    return hf


def make_step(
    model: nn.Module, logits_of: Callable[[Tensor], Tensor], cfg: LoopConfig, amp: torch.dtype, device: str
) -> Callable[[Tensor], float]:
    opt = build_optimizer(model, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]

    def ctx() -> AbstractContextManager[Any]:
        return nullcontext() if amp == torch.float32 else torch.autocast(device_type=device, dtype=amp)

    def step(batch: Tensor) -> float:
        with ctx():
            logits = logits_of(batch[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    args = ModelArgs(
        dim=a.dim,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        vocab_size=a.vocab_size,
        multiple_of=32,
        max_seq_len=a.seq_len,
    )
    amp = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    ours = Transformer(args)
    init_weights(ours)
    theirs = hf_model(ours, args)
    ours.to(a.device).train()
    theirs.to(a.device).train()
    cfg = LoopConfig(lr=1e-3)
    steps = {
        "llama2 (ours)": make_step(ours, lambda x: ours(x), cfg, amp, a.device),
        "transformers LlamaForCausalLM": make_step(
            theirs, lambda x: theirs(input_ids=x).logits, cfg, amp, a.device
        ),
    }
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1), generator=g).to(a.device)
        for _ in range(4)
    ]
    tokens_per_step = a.batch_size * a.seq_len

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    first_loss = {name: step(batches[0]) for name, step in steps.items()}  # identical weights -> same loss
    for step in steps.values():
        for i in range(a.warmup - 1):
            step(batches[(i + 1) % len(batches)])
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for i in range(a.steps):
                step(batches[i % len(batches)])
            sync()
            rates[name].append(tokens_per_step * a.steps / (time.perf_counter() - t0))

    med = {name: statistics.median(r) for name, r in rates.items()}
    ours_rate = med["llama2 (ours)"]
    print(
        f"\ntraining throughput: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, vocab {a.vocab_size}, "
        f"batch {a.batch_size} x {a.seq_len}, {a.dtype}, {a.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<32} {'tokens/s':>10} {'min':>10} {'max':>10} {'ours / this':>12} {'step-1 loss':>12}")
    for name, r in rates.items():
        print(
            f"{name:<32} {med[name]:>10,.0f} {min(r):>10,.0f} {max(r):>10,.0f} "
            f"{ours_rate / med[name]:>12.2f} {first_loss[name]:>12.5f}"
        )
    if a.json is not None:
        out = {
            "config": vars(a) | {"json": str(a.json)},
            "tokens_per_step": tokens_per_step,
            "tokens_per_s_median": med,
            "tokens_per_s_rounds": rates,
            "first_step_loss": first_loss,
            "ratio_ours_over_transformers": ours_rate / med["transformers LlamaForCausalLM"],
            "torch": torch.__version__,
        }
        a.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
