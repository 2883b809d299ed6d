"""`run_sft` end to end on a tiny random model with the real Llama 2 tokenizer: full fine-tuning
writes a loadable model; LoRA writes adapters alone and a merged model equal to base + adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import save_checkpoint
from llama2.config import ModelArgs
from llama2.data.instruct_suite import generate_items, write_jsonl
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.train.loop_config import LoopConfig
from llama2.train.lora import LoRAConfig, load_adapter
from llama2.train.sft import SFTConfig, run_sft

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=128)
    base = save_checkpoint(
        Transformer(args), args, root / "base", tokenizer_path=FIXTURES / "tokenizer.model"
    )
    data = write_jsonl(generate_items("train", n_per_task=3, seed=0, system_prob=0.5), root / "train.jsonl")
    return base, data


def _cfg(base: Path, data: Path, out: Path, **kw: Any) -> SFTConfig:
    loop = LoopConfig(
        out_dir=out, batch_size=4, max_steps=3, lr=1e-3, warmup_steps=0, eval_every=0, eval_batches=2,
        ckpt_every=0, progress=False,
    )  # fmt: skip
    fields: dict[str, Any] = dict(model=base, data=data, seq_len=128, val_fraction=0.2, loop=loop)
    return SFTConfig(**(fields | kw))


def test_full_finetune(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    res = run_sft(_cfg(base, data, tmp_path / "full"))
    assert res.adapter_dir is None and res.model_dir is not None
    assert res.n_train_dialogs == 24 and res.n_val_dialogs == 6
    assert res.train.step == 3 and res.train.val_loss is not None
    tuned = load_model(res.model_dir, progress=False)
    before = load_model(base, progress=False).model.state_dict()
    after = tuned.model.state_dict()
    assert all(
        not torch.equal(before[k], after[k])
        for k in ("tok_embeddings.weight", "layers.0.attention.wq.weight")
    )
    assert tuned.tokenizer_path is not None
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["train_dialogs"] == 24 and summary["answer_tokens_per_epoch"] > 0


def test_lora_adapters_and_merge(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    res = run_sft(_cfg(base, data, tmp_path / "lora", lora=LoRAConfig(rank=4, alpha=8.0), merge=True))
    assert res.adapter_dir is not None and res.model_dir is not None
    assert res.n_trainable == 1 * 2 * 4 * (16 + 16)  # wq and wv of one layer: A (4, 16) + B (16, 4)
    assert {p.name for p in res.adapter_dir.iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    unmerged = load_model(base, progress=False).model
    load_adapter(unmerged, res.adapter_dir)
    merged = load_model(res.model_dir, progress=False).model
    base_model = load_model(base, progress=False).model
    tokens = torch.randint(0, 32000, (2, 12))
    with torch.no_grad():
        want = unmerged(tokens)
        torch.testing.assert_close(merged(tokens), want, rtol=0, atol=1e-5)
        assert not torch.allclose(base_model(tokens), want)  # the adapters did learn something
    # base weights other than the adapted ones are untouched
    m, b = merged.state_dict(), base_model.state_dict()
    assert torch.equal(m["layers.0.feed_forward.w1.weight"], b["layers.0.feed_forward.w1.weight"])
    assert torch.equal(m["output.weight"], b["output.weight"])


def test_errors(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    with pytest.raises(ConfigError, match="merge = true needs LoRA"):
        run_sft(_cfg(base, data, tmp_path / "x", merge=True))
    with pytest.raises(ConfigError, match="exceeds the base model's context"):
        run_sft(_cfg(base, data, tmp_path / "y", seq_len=4096))
