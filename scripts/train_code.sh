#!/bin/sh
# The embedded `code` model: FIM pretraining on the CPython stdlib (see src/llama2/assets/models/code/MODEL_CARD.md).
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -u -c '
from pathlib import Path
from llama2.train.code import CodePretrainConfig, run_code_pretrain
cfg = CodePretrainConfig(
    out_dir=Path("runs/code2"), dim=192, n_layers=4, n_heads=6, hidden_dim=512, vocab_size=2048,
    seq_len=256, max_chars=640, batch_size=8, max_steps=1800, lr=2e-3, warmup_steps=100,
    eval_every=200, eval_batches=16, ckpt_every=100, log_every=20, progress=False, seed=1337, threads=1,
    resume=True)
r = run_code_pretrain(cfg)
print("DONE", r.train.step, r.train.tokens_seen, r.train.val_loss, r.train.wall_time_s, flush=True)
'
