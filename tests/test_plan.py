"""`llama2.plan`: the memory plan against what the modules really hold and what torch allocates.

Oracles: the byte size of every buffer of a model quantized by `llama2.quant` (exact), the KV
cache `Transformer.setup_caches` allocates (exact), the peak of tensor storages a real prefill
forward allocates (counted op by op, within 3%), and the base model card's parameter count.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn

from llama2.config import ModelArgs
from llama2.errors import ConfigError, OutOfMemoryError
from llama2.model import Transformer
from llama2.plan import (
    MemoryPlan,
    available_memory,
    check_fits,
    default_linear_cost,
    estimate_memory,
    measure_linear_cost,
    peak_allocated,
)
from llama2.plan_cli import add_arguments, run
from llama2.quant import QuantConfig, QuantizedLinear, quantize_model

# dim 256 and ffn 512: every scheme applies to every layer (q4_k needs multiples of 256)
ARGS = ModelArgs(
    dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, hidden_dim=512, max_seq_len=128
)
CONFIGS = [
    QuantConfig("int8"),
    QuantConfig("int4", groupsize=32),
    QuantConfig("int4", groupsize=64),
    QuantConfig("int4", groupsize=128),
    QuantConfig("nf4", double_quant=False),
    QuantConfig("nf4", double_quant=True),
    QuantConfig("q8_0"),
    QuantConfig("q4_0"),
    QuantConfig("q4_k"),
    QuantConfig("nf4", include_output=True),
    QuantConfig("q8_0", include_output=True),
]


def _model(dtype: torch.dtype, config: QuantConfig | None, args: ModelArgs = ARGS) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args).to(dtype).eval()
    if config is not None:
        quantize_model(model, config)
    return model


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.to_metadata().values()))
def test_weight_bytes_equal_the_quantized_modules_buffers(config: QuantConfig) -> None:
    model = _model(torch.bfloat16, config)
    plan = estimate_memory(ARGS, scheme=config, dtype=torch.bfloat16, max_seq_len=16, batch_size=1)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * ARGS.n_layers + int(config.include_output)
    block = sum(_nbytes(m) for name, m in model.named_modules() if name.split(".")[-1] in {
        "wq", "wk", "wv", "wo", "w1", "w2", "w3"})  # fmt: skip
    assert plan.linear_bytes == block
    assert plan.output_bytes == _nbytes(model.output)
    assert plan.embedding_bytes == _nbytes(model.tok_embeddings)
    assert plan.weight_bytes == _nbytes(model)


def test_float_weights_match_the_base_model_card() -> None:
    from llama2.assets import resolve_model
    from llama2.checkpoint.load import read_checkpoint

    args = read_checkpoint(resolve_model("base")).args
    plan = estimate_memory(args, scheme=None, dtype=torch.bfloat16, max_seq_len=256, batch_size=1)
    assert plan.weight_bytes == 5_310_720 * 2  # MODEL_CARD.md: 5,310,720 parameters, bfloat16


@pytest.mark.parametrize("config", [None, QuantConfig("nf4", include_output=True)], ids=["float", "nf4-head"])
def test_kv_cache_bytes_equal_setup_caches(config: QuantConfig | None) -> None:
    model = _model(torch.bfloat16, config)
    model.setup_caches(3, 40)
    allocated = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cache" in n)
    plan = estimate_memory(ARGS, scheme=config, dtype=torch.bfloat16, max_seq_len=40, batch_size=3)
    assert allocated > 0 and plan.kv_cache_bytes == allocated


def test_peak_allocated_counts_live_storages() -> None:
    def fn() -> torch.Tensor:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B, both alive: 8000
        del a, b
        c = torch.empty(100, dtype=torch.bfloat16)  # 200 B
        return c[:10]  # a view: no new storage

    assert peak_allocated(fn) == 8000


PREFILL_CASES = [
    (torch.float32, None, 2, 64),
    (torch.bfloat16, None, 1, 128),
    (torch.bfloat16, QuantConfig("nf4"), 2, 64),
    (torch.float32, QuantConfig("int8"), 1, 128),
    (torch.bfloat16, QuantConfig("q4_k"), 1, 96),
]


@pytest.mark.parametrize(("dtype", "config", "batch", "seq"), PREFILL_CASES)
def test_activation_estimate_matches_a_prefill(
    dtype: torch.dtype, config: QuantConfig | None, batch: int, seq: int
) -> None:
    """The generator's prefill (`Generator._forward(last_only=True)`: hidden states, last position
    through the head, float32 logits) on a fresh model with its cache allocated."""
    model = _model(dtype, config)
    model.setup_caches(batch, seq)
    tokens = torch.randint(0, ARGS.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def prefill() -> torch.Tensor:
        with torch.no_grad():
            h = model.hidden_states(tokens, 0)[:, -1:]  # (B, 1, dim)
            return model.output(h).float()  # (B, 1, V)

    measured = peak_allocated(prefill)
    plan = estimate_memory(ARGS, scheme=config, dtype=dtype, max_seq_len=seq, batch_size=batch)
    assert measured > 0
    assert abs(plan.activation_bytes - measured) <= 0.03 * measured, (plan.activation_bytes, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_logits_estimate_matches_a_scoring_forward(dtype: torch.dtype) -> None:
    """`eval perplexity`'s forward: logits at every position, as float32."""
    args = ARGS.replace(vocab_size=4096)
    model = _model(dtype, None, args)
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def score() -> torch.Tensor:
        with torch.no_grad():
            return model(tokens).float()  # (B, T, V)

    measured = peak_allocated(score)
    plan = estimate_memory(args, scheme=None, dtype=dtype, max_seq_len=64, batch_size=2, full_logits=True)
    last = estimate_memory(args, scheme=None, dtype=dtype, max_seq_len=64, batch_size=2)
    assert measured >= 2 * 64 * 4096 * 4 > last.activation_bytes
    assert abs(plan.activation_bytes - measured) <= 0.03 * measured, (plan.activation_bytes, measured)


@pytest.mark.parametrize("scheme", ["nf4", "q4_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_linear_cost_is_what_the_kernels_allocate(scheme: str, dtype: torch.dtype) -> None:
    measured = measure_linear_cost(QuantConfig(scheme), dtype)
    expected = default_linear_cost(QuantConfig(scheme), dtype)
    for field in ("peak_per_weight", "held_per_weight", "per_output", "per_input"):
        assert getattr(measured, field) == pytest.approx(getattr(expected, field), abs=0.05), field


def test_available_memory_cpu_is_meminfo() -> None:
    with open("/proc/meminfo", encoding="ascii") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    avail = available_memory("cpu")
    assert 0 < avail <= info["MemTotal"]
    assert abs(avail - info["MemAvailable"]) < 0.2 * info["MemTotal"]


def _plan_70b() -> MemoryPlan:
    from llama2.config import preset

    return estimate_memory(preset("70b"), scheme=None, dtype=torch.float32, max_seq_len=4096, batch_size=8)


def test_check_fits_refuses_with_what_to_change() -> None:
    plan = _plan_70b()
    with pytest.raises(OutOfMemoryError) as err:
        check_fits(plan, "cpu")
    msg = str(err.value)
    assert re.search(r"needs about [\d.]+ [GT]iB", msg) and "available" in msg
    assert "--quantize nf4" in msg and "bfloat16" in msg
    small = estimate_memory(ARGS, scheme="nf4", dtype=torch.bfloat16, max_seq_len=128, batch_size=1)
    check_fits(small, "cpu")  # a few MB: fits
    with pytest.raises(ConfigError):
        check_fits(small, "cpu", margin=1.5)


def test_estimate_rejects_bad_sizes_and_inapplicable_schemes() -> None:
    with pytest.raises(ConfigError):
        estimate_memory(ARGS, scheme="nf4", dtype=torch.bfloat16, max_seq_len=0, batch_size=1)
    odd = ARGS.replace(hidden_dim=704)
    with pytest.raises(ConfigError, match="w2"):
        estimate_memory(odd, scheme="q4_k", dtype=torch.bfloat16, max_seq_len=8, batch_size=1)


def test_cli_prints_the_table_from_headers_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import llama2.checkpoint.load as load

    def no_tensors(*a: object, **k: object) -> None:
        raise AssertionError("llama2 plan must not load tensors")

    monkeypatch.setattr(load, "load_model", no_tensors)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--model", "base", "--dtype", "bfloat16"])) == 0
    out = capsys.readouterr().out
    assert "10,621,440" in out  # 5,310,720 bf16 parameters
    assert "KV cache" in out and "activations" in out and "fits" in out
    code = run(parser.parse_args(["--preset", "70b", "--dtype", "float32", "--batch-size", "8"]))
    out = capsys.readouterr().out
    assert code == 1 and re.search(r"fits.*no", out)
    run(parser.parse_args(["--preset", "7b", "--quantize", "nf4", "--max-seq-len", "4096"]))
    out = capsys.readouterr().out
    weights = re.search(r"weights: block linears \(nf4\)\s+([\d.]+) GiB", out)
    assert weights is not None and 3.0 < float(weights.group(1)) < 3.5  # 6.5B weights at ~4.13 bits
