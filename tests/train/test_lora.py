"""LoRA: only adapters train (through the shared training loop), merging matches the unmerged
model, the update equals W + (alpha/r) B A computed by hand, adapters save/load alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.train.loop import LoopConfig, train
from llama2.train.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
)

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS)


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class _Batches:
    """A tiny resumable batch source for the loop."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, ARGS.vocab_size, (8, 17), generator=g)
        self.i = 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        row = self.data[self.i % 4 * 2 : self.i % 4 * 2 + 2]
        self.i += 1
        return row[:, :-1], row[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


def _lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def test_starts_equal_to_base() -> None:
    base = _model()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
    want = base(tokens)
    wrapped = apply_lora(base, LoRAConfig(rank=4, alpha=8, target_modules=["wq", "wv", "w2"]))
    assert len(wrapped) == 3 * ARGS.n_layers
    assert "layers.0.attention.wq" in wrapped and "layers.1.feed_forward.w2" in wrapped
    assert torch.equal(base(tokens), want)  # B = 0 at init


def test_only_adapters_train_in_the_loop(tmp_path: Path) -> None:
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["wq", "wv"]))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert len(lora_before) == 2 * 2 * ARGS.n_layers
    cfg = LoopConfig(
        lr=1e-2, warmup_steps=0, max_steps=4, batch_size=2, eval_every=0, ckpt_every=0, log_every=1,
        progress=False, out_dir=tmp_path / "run", weight_decay=0.0, device="cpu",
    )  # fmt: skip
    train(model, _lm_loss, _Batches(), None, cfg, trainable=lora_parameters(model))
    after = dict(model.named_parameters())
    for n, p in base_before.items():
        assert torch.equal(after[n], p), n  # base weights untouched
        assert after[n].grad is None
    assert all(not torch.equal(after[n], p) for n, p in lora_before.items() if n.endswith("lora_B"))


def test_only_adapter_grads() -> None:
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=["wq", "wk", "wv", "wo"]))
    _randomize_adapters(model)
    _lm_loss(model, next(_Batches())).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_merge_matches_unmerged_and_hand_formula() -> None:
    model = _model()
    w_before = model.layers[0].attention.wq.weight.detach().clone()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.1, target_modules=["wq", "wv", "w1", "output"]))
    _randomize_adapters(model)
    model.eval()  # dropout off
    tokens = torch.randint(0, ARGS.vocab_size, (2, 11))
    with torch.no_grad():
        want = model(tokens)
        wq = model.layers[0].attention.wq
        assert isinstance(wq, LoRALinear)
        by_hand = w_before + (16 / 4) * wq.lora_B @ wq.lora_A
        assert merge_lora(model) == 3 * ARGS.n_layers + 1
        got = model(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.layers[0].attention.wq, nn.Linear)
    torch.testing.assert_close(model.layers[0].attention.wq.weight, by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(_model().state_dict())  # plain Meta names again


def test_merge_count() -> None:
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, target_modules=["wq", "output"]))
    assert merge_lora(model) == ARGS.n_layers + 1


def test_save_and_load_adapter(tmp_path: Path) -> None:
    model = _model()
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=["wq", "wv"])
    apply_lora(model, cfg)
    _randomize_adapters(model)
    model.eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 7))
    with torch.no_grad():
        want = model(tokens)
    out = save_adapter(model, cfg, tmp_path / "adapter", base="tiny")
    tensors = load_file(str(out / "adapter.safetensors"))
    want_names = {
        f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv") for ab in "AB"
    }
    assert set(tensors) == want_names
    assert tensors["layers.0.attention.wq.lora_A"].shape == (4, ARGS.dim)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["target_modules"] == ["wq", "wv"]
    assert meta["base"] == "tiny"
    fresh = _model()  # same base weights (same seed)
    load_adapter(fresh, out)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), want, rtol=0, atol=0)
    merged = _model()
    load_adapter(merged, out, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), want, rtol=0, atol=1e-5)


class _FakeQuantLinear(nn.Module):
    """Stands in for a quantized linear: int8 weight + scale, `dequantize()`, no float `.weight`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scale  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.dequantize().t()


def test_wraps_any_linear_like_module() -> None:
    torch.manual_seed(0)
    q = _FakeQuantLinear(nn.Linear(16, 8, bias=False))
    lora = LoRALinear(q, rank=2, alpha=4)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 16)
    merged = lora.merge()
    torch.testing.assert_close(merged(x), lora(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.weight, q.dequantize() + 2 * lora.lora_B @ lora.lora_A)
    with pytest.raises(ConfigError, match="in_features"):
        LoRALinear(nn.ReLU(), rank=2, alpha=4)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="target_modules"):
        LoRAConfig(target_modules=["attention"])
    with pytest.raises(ConfigError, match="dropout"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="no module named"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), LoRAConfig(target_modules=["wq"]))
