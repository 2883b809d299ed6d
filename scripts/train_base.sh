#!/usr/bin/env bash
# Reproduce the embedded `base` model end to end (data, tokenizer, pretraining, bf16 copy).
# Runs on CPU; re-running resumes from runs/base/checkpoints/latest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .cache/shakespeare/train ] || scripts/get_shakespeare.sh
[ -f runs/base/tokenizer.model ] || python scripts/run_stage.py tokenizer scripts/configs/base_tokenizer.toml
python scripts/run_stage.py pretrain scripts/configs/base.toml resume=true save_dtype=\"bfloat16\" "$@"
# Install the bf16 copy as the embedded model and print the model card's numbers.
mkdir -p src/llama2/assets/models/base
cp runs/base/model/params.json runs/base/model/model.safetensors runs/base/model/tokenizer.model src/llama2/assets/models/base/
python scripts/eval_base.py runs/base .cache/shakespeare/val
