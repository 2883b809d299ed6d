"""QLoRA: LoRA adapters over an NF4-quantized base.

Checks: only the adapters train and the loss falls; the 4-bit buffers are bit-identical after
optimizer steps; gradients of A/B equal those of the same LoRA over the *dequantized float*
weights with plain `nn.Linear` autograd (the independent oracle); no float copy of a base weight is
saved for backward; merging gives a float model; SFT's `quantize_base` needs LoRA.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.quant import NF4Linear, QuantConfig, QuantizedLinear, quantize_model
from llama2.train.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    dequantize_linears,
    lora_parameters,
    merge_lora,
)

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=32, max_seq_len=32)
LORA = LoRAConfig(rank=4, alpha=8.0, target_modules=["wq", "wv"])


def _nf4_model(double_quant: bool = True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    quantize_model(model, QuantConfig("nf4", blocksize=64, double_quant=double_quant))
    return model


def _float_twin(model: nn.Module) -> nn.Module:
    """The same model with every quantized layer replaced by an nn.Linear of its dequantized weight."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantize_weight(torch.float32))
                lin.weight.requires_grad_(False)
                setattr(module, name, lin)
    return twin


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, ARGS.vocab_size, (3, 17), generator=g)  # B*T = 48: no weight-shaped activations
    return data[:, :-1], data[:, 1:]


def _loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_only_adapters_train_and_base_stays_4bit() -> None:
    model = _nf4_model()
    apply_lora(model, LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * ARGS.n_layers  # A and B of wq and wv in each layer
    before = _buffers(model)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * ARGS.n_layers
    inputs, targets = _batch()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = _loss(model, inputs, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    after = _buffers(model)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert all(m.weight.dtype == torch.uint8 for m in nf4)  # still 4-bit codes
    assert all(isinstance(m, NF4Linear) for m in nf4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_adapter_gradients_match_dequantized_float_oracle(double_quant: bool) -> None:
    model = _nf4_model(double_quant)
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # B != 0 so every path carries gradient
    oracle = _float_twin(model)
    assert not any(isinstance(m, QuantizedLinear) for m in oracle.modules())
    inputs, targets = _batch()
    loss_q = _loss(model, inputs, targets)
    loss_q.backward()
    loss_f = _loss(oracle, inputs, targets)
    loss_f.backward()
    torch.testing.assert_close(loss_q, loss_f, rtol=1e-5, atol=1e-6)
    named_q = dict(model.named_parameters())
    named_f = dict(oracle.named_parameters())
    checked = 0
    for name, p in named_q.items():
        if not p.requires_grad:
            continue
        assert p.grad is not None and named_f[name].grad is not None, name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, named_f[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == 2 * 2 * ARGS.n_layers


def test_backward_saves_no_float_copy_of_base_weights() -> None:
    model = _nf4_model()
    apply_lora(model, LORA)
    weight_shapes = {
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)
    }
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    inputs, targets = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, inputs, targets)
    loss.backward()
    float_weights = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    assert saved and not float_weights, float_weights
    # the oracle (plain nn.Linear) does save its weights: the check can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(_float_twin(model), inputs, targets)
    assert any(s[0] in weight_shapes for s in saved)


def test_merge_over_quantized_base_gives_float_model() -> None:
    model = _nf4_model()
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs, _ = _batch()
    with torch.no_grad():
        expected = model(inputs)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    dequantize_linears(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    with torch.no_grad():
        got = model(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sft_quantize_base_requires_lora(tmp_path: Path) -> None:
    from llama2.train.loop_config import LoopConfig
    from llama2.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=Path("base"), quantize_base="nf4", loop=LoopConfig(out_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"add a \[lora\] table"):
        run_sft(cfg)


def test_no_peft_or_bitsandbytes_at_run_time() -> None:
    """QLoRA runs on our own modules: nothing under the model, quant and train packages imports
    peft or bitsandbytes (they are test-time oracles only)."""
    import ast

    import llama2

    root = Path(llama2.__file__).parent
    files = [f for sub in ("model", "quant", "train") for f in (root / sub).rglob("*.py")]
    assert len(files) > 10
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in ("peft", "bitsandbytes")]
            assert not bad, f"{f}: imports {bad}"


def test_sft_qlora_end_to_end(tmp_path: Path) -> None:
    """`run_sft(quantize_base="nf4")`: adapters train over an NF4 base loaded quantized; the merged
    model is a float checkpoint equal to (the same NF4 base + the saved adapters)."""
    from llama2.checkpoint.load import load_model
    from llama2.checkpoint.save import save_checkpoint
    from llama2.data.instruct_suite import generate_items, write_jsonl
    from llama2.train.loop_config import LoopConfig
    from llama2.train.lora import LoRAConfig, load_adapter
    from llama2.train.sft import SFTConfig, run_sft

    fixtures = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=128)
    base = save_checkpoint(
        Transformer(args), args, tmp_path / "base", tokenizer_path=fixtures / "tokenizer.model"
    )
    data = write_jsonl(generate_items("train", n_per_task=2, seed=0), tmp_path / "train.jsonl")
    loop = LoopConfig(
        out_dir=tmp_path / "out", batch_size=4, max_steps=2, lr=1e-2, warmup_steps=0, eval_every=0,
        eval_batches=1, ckpt_every=0, progress=False,
    )  # fmt: skip
    cfg = SFTConfig(
        model=base, data=data, seq_len=128, val_fraction=0.2, lora=LoRAConfig(rank=4, alpha=8.0),
        quantize_base="nf4", merge=True, loop=loop,
    )  # fmt: skip
    res = run_sft(cfg)
    assert res.adapter_dir is not None and res.model_dir is not None
    assert res.n_trainable == 2 * 4 * (16 + 16)  # wq, wv of one layer
    quantized = load_model(base, progress=False, quantize="nf4").model
    assert isinstance(quantized.layers[0].attention.wq, NF4Linear)
    load_adapter(quantized, res.adapter_dir)
    merged = load_model(res.model_dir, progress=False).model
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    tokens = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), quantized(tokens), rtol=1e-4, atol=1e-4)
