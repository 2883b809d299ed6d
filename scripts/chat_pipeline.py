"""The recipe's SFT stage: full SFT of the embedded `base` model on the instruction suite, then held-out
exact match of base and the SFT model. Run from the repo root: python scripts/chat_pipeline.py [STEPS] [RUN]
(`python scripts/chat_pipeline.py 600 sft2` writes runs/chat/sft2/model, where the alignment configs in
scripts/configs/recipe/ start; the embedded chat model is the end of that recipe, see its card)."""

import json
import sys
import time
from pathlib import Path

from llama2.data.instruct_suite import generate_items, write_jsonl
from llama2.eval.exact_match import ExactMatchConfig, run_exact_match
from llama2.train.loop_config import LoopConfig
from llama2.train.sft import SFTConfig, run_sft

BASE = Path("src/llama2/assets/models/base")
OUT = Path("runs/chat")
DEST = Path("src/llama2/assets/models/chat")
MAX_STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 180
RUN = sys.argv[2] if len(sys.argv) > 2 else "sft"
BIG = ["add", "sub", "count_letter", "reverse_words", "sort_words", "uppercase", "repeat", "refuse"]

t0 = time.time()
if RUN == "sft":
    items = generate_items("train", n_per_task=400, seed=0, system_prob=0.3, multi_turn_prob=0.2)
else:  # more data: up to 900 prompts per task (mul and count_vowels have fewer train prompts)
    kw = dict(seed=0, system_prob=0.3, multi_turn_prob=0.2)
    items = (
        generate_items("train", 900, tasks=BIG, **kw)
        + generate_items("train", 400, tasks=["mul"], **kw)
        + generate_items("train", 700, tasks=["count_vowels"], **kw)
    )
data = write_jsonl(items, OUT / f"train_{RUN}.jsonl")
heldout = write_jsonl(generate_items("heldout", n_per_task=20, seed=1), OUT / "heldout.jsonl")
if not (OUT / "base_exact_match.json").is_file():
    print("== base model, held-out exact match", flush=True)
    run_exact_match(ExactMatchConfig(model=str(BASE), data=heldout, out_json=OUT / "base_exact_match.json"))
cfg = SFTConfig(
    model=BASE,
    data=data,
    seq_len=256,
    val_fraction=0.05,
    save_dtype="bfloat16",
    resume=True,
    loop=LoopConfig(
        out_dir=OUT / RUN,
        batch_size=8,
        max_steps=MAX_STEPS,
        lr=1e-3,
        warmup_steps=10,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        eval_every=100,
        eval_batches=8,
        ckpt_every=50,
        log_every=5,
        progress=False,
        seed=1337,
        threads=1,
    ),
)
res = run_sft(cfg)
print("SFT done", res.train, flush=True)
print("== chat model, held-out exact match", flush=True)
rep = run_exact_match(
    ExactMatchConfig(model=str(res.model_dir), data=heldout, out_json=OUT / f"chat_{RUN}_exact_match.json")
)
(OUT / f"pipeline_{RUN}_done.json").write_text(
    json.dumps({"wall_s": time.time() - t0, "acc": rep.accuracy}) + "\n"
)
