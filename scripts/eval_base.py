"""Numbers for the `base` model card: full validation loss of the float32 weights (the training
run's last checkpoint) and of the embedded bfloat16 copy, with the same windowing as
`llama2 eval perplexity` (non-overlapping windows of max_seq_len tokens over the held-out plays).

    python scripts/eval_base.py [RUN_DIR] [VAL_DATA]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from llama2.config import ModelArgs, read_json
from llama2.data.corpus import load_encoder, tokenize_documents
from llama2.data.packing import PackedSequences
from llama2.eval.perplexity import PerplexityConfig, run_perplexity, window_nll
from llama2.model import Transformer
from llama2.train.loop import latest_checkpoint, load_training_checkpoint


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/base")
    val = sys.argv[2] if len(sys.argv) > 2 else ".cache/shakespeare/val"
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {run}/checkpoints")
    state = load_training_checkpoint(ckpt)
    args = ModelArgs.from_params_json(read_json(run / "params.json"))
    model = Transformer(args)
    model.load_state_dict(state["model"])
    model.eval()
    windows = PackedSequences(
        tokenize_documents([val], load_encoder(run / "model" / "tokenizer.model")), args.max_seq_len
    )
    total, n = window_nll(model, windows, batch_size=8)
    nll = total / n
    print(f"float32 checkpoint {ckpt.name}: val NLL {nll:.4f} (ppl {math.exp(nll):.2f}) on {n:,} tokens")
    res = run_perplexity(PerplexityConfig(model="base", data=[val]))
    print(f"embedded bf16 copy: val NLL {res.nll:.4f}; difference {res.nll - nll:+.4f}")
    print(f"step {state['step']}, tokens seen {state['tokens_seen']:,}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
