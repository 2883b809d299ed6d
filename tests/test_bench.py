"""`llama2.bench` (the `llama2 bench` library) on a tiny random model, and the llama-bench JSON parser.

No timing assertions: only that the tests run the number of tokens asked for, that results are
positive and complete, and that byte counts match the model shape's arithmetic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from llama2 import bench
from llama2.config import ModelArgs
from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.quant import Int8Linear

REPO = Path(__file__).resolve().parents[1]
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)


def _load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _count_forwards(model: Transformer) -> list[tuple[int, ...]]:
    """Record the token shape of every forward pass (the embedding runs once per pass)."""
    shapes: list[tuple[int, ...]] = []

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        shapes.append(tuple(inputs[0].shape))

    model.tok_embeddings.register_forward_hook(hook)
    return shapes


def test_bench_model_runs_exactly_the_tokens_asked_for() -> None:
    model = bench.random_model(TINY, torch.float32, seed=1)
    shapes = _count_forwards(model)
    r = bench.bench_model(model, pp=16, tg=5, reps=2, warmup=False)
    # pp: one forward over all 16 prompt tokens per repetition; tg: 5 single-token steps per repetition
    assert shapes == [(1, 16)] * 2 + [(1, 1)] * 10
    assert len(r.pp_tps) == 2 and len(r.tg_tps) == 2
    assert all(v > 0 for v in r.pp_tps + r.tg_tps)
    assert (r.pp, r.tg, r.scheme, r.dtype) == (16, 5, None, "float32")

    shapes.clear()
    bench.bench_model(model, pp=8, tg=3, reps=1, warmup=True)
    assert shapes == [(1, 8)] * 2 + [(1, 1)] * 3 * 2  # one untimed run of each test first


def test_byte_counts_follow_the_shape() -> None:
    model = bench.random_model(TINY, torch.bfloat16)
    n = TINY.num_params()
    assert bench.weight_bytes(model) == n * 2
    # a decode step reads every weight except the embedding table, of which it reads one row
    assert bench.bytes_per_token(model) == (n - TINY.vocab_size * TINY.dim + TINY.dim) * 2
    model.setup_caches(1, 32)  # KV caches are not weights
    assert bench.weight_bytes(model) == n * 2


def test_random_model_dtype_init_and_quantization() -> None:
    model = bench.random_model(TINY, torch.bfloat16, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    w = model.layers[0].feed_forward.w1.weight.float()
    assert 0.015 < w.std().item() < 0.025
    assert not any(p.device.type == "meta" for p in model.parameters())

    q = bench.random_model(TINY, torch.float32, quantize=bench.make_quant_config("int8", include_output=True))
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every projection and the output head are quantized
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 7 * TINY.n_layers + 1
    assert bench.weight_bytes(q) < TINY.num_params() * 4 / 2
    logits = q(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, TINY.vocab_size) and torch.isfinite(logits).all()


def test_result_row_and_table_fields(tmp_path: Path) -> None:
    model = bench.random_model(TINY, torch.float32)
    r = bench.bench_model(model, pp=8, tg=4, reps=3, warmup=False, label="tiny", bandwidth_gbs=10.0)
    row = r.to_row()
    for key in ("model", "precision", "threads", "weight_bytes", "bytes_per_token", "load_s", "pp", "tg",
                "pp_tps", "tg_tps", "pp_mean", "pp_std", "tg_mean", "tg_std", "peak_rss_bytes",
                "tg_ceiling", "tg_fraction"):  # fmt: skip
        assert key in row, key
    assert row["tg_ceiling"] == pytest.approx(10e9 / r.bytes_per_token)
    assert row["tg_fraction"] == pytest.approx(r.tg_mean / row["tg_ceiling"])
    assert r.peak_rss_bytes > 0
    table = bench.format_table([r])
    assert "pp t/s" in table and "tg t/s" in table and "(pp8)" in table and "(tg4)" in table
    out = tmp_path / "rows.json"
    bench.write_json([r], out, {"bandwidth_gbs": 10.0})
    doc = json.loads(out.read_text())
    assert doc["meta"]["bandwidth_gbs"] == 10.0 and len(doc["rows"][0]["tg_tps"]) == 3


def test_mean_std_is_the_sample_deviation() -> None:
    assert bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert bench.mean_std([5.0]) == (5.0, 0.0)


def test_cli_run_on_a_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(bench.PRESETS, "tiny-test", TINY)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "b.json"
    ns = parser.parse_args(
        ["--preset", "tiny-test", "--quantize", "none,int8", "-p", "8", "-n", "3", "-r", "1",
         "--bandwidth", "20", "--json", str(out), "--quiet"]
    )  # fmt: skip
    assert bench.run(ns) == 0
    printed = capsys.readouterr().out
    assert "| tiny-test | float32 |" in printed and "| tiny-test | int8 (float32) |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["precision"] for r in rows] == ["float32", "int8"]
    assert all(r["pp"] == 8 and r["tg"] == 3 and r["tg_fraction"] > 0 for r in rows)
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]


def test_cli_needs_a_model_or_preset() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(ConfigError, match="--preset"):
        bench.run(parser.parse_args([]))


# Captured from `llama-bench -m 110m-q4_0.gguf -p 64 -n 16 -t 2 -r 2 -o json` (llama.cpp 0c1e570,
# vendored in llama-cpp-python 0.3.36), on the random-weight 110m GGUF of benchmarks/llamacpp.py.
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": ".cache/gguf-bench/110m-q4_0.gguf",
    "model_type": "llama ?B Q4_0",
    "model_size": 81836544,
    "model_n_params": 134105856,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 64,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-01T08:27:00Z",
    "avg_ns": 2472987406,
    "stddev_ns": 895702146,
    "avg_ts": 27.696297,
    "stddev_ts": 10.031443,
    "samples_ns": [ 3106344468, 1839630344 ],
    "samples_ts": [ 20.603, 34.7896 ]
  },
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": ".cache/gguf-bench/110m-q4_0.gguf",
    "model_type": "llama ?B Q4_0",
    "model_size": 81836544,
    "model_n_params": 134105856,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 0,
    "test_time": "2026-12-01T08:27:08Z",
    "avg_ns": 1653977592,
    "stddev_ns": 25683538,
    "avg_ts": 9.674816,
    "stddev_ts": 0.150234,
    "samples_ns": [ 1635816634, 1672138551 ],
    "samples_ts": [ 9.78105, 9.56859 ]
  }
]
"""


def test_llama_bench_json_parser() -> None:
    lc = _load_benchmark("llamacpp")
    rows = lc.parse_llama_bench_json(LLAMA_BENCH_JSON)
    assert [r.test for r in rows] == ["pp64", "tg16"]
    pp, tg = rows
    assert (pp.n_prompt, pp.n_gen, pp.n_threads, pp.avg_ts) == (64, 0, 2, 27.696297)
    assert tg.samples_ts == [9.78105, 9.56859] and tg.stddev_ts == 0.150234
    assert tg.model_size == 81836544 and tg.model_type == "llama ?B Q4_0" and tg.n_params == 134105856
    # -o jsonl: one object a line
    jsonl = "\n".join(json.dumps(o) for o in json.loads(LLAMA_BENCH_JSON))
    assert [r.avg_ts for r in lc.parse_llama_bench_json(jsonl)] == [27.696297, 9.674816]
    broken = json.loads(LLAMA_BENCH_JSON)
    del broken[1]["avg_ts"]
    with pytest.raises(ValueError, match="avg_ts"):
        lc.parse_llama_bench_json(json.dumps(broken))
    with pytest.raises(ValueError, match="no output"):
        lc.parse_llama_bench_json("  \n")


def test_verdict_strings() -> None:
    ds = _load_benchmark("decode_speed")
    assert ds.verdict(1.2, 1.0).startswith("1.20x (met")
    assert "missed by 20%" in ds.verdict(0.8, 1.0)
    assert "missed by 50%" in ds.verdict(1.5, 3.0)


def test_budget_caps_repetitions_and_generated_tokens() -> None:
    model = bench.random_model(TINY, torch.float32)
    shapes = _count_forwards(model)
    r = bench.bench_model(model, pp=8, tg=20, reps=3, warmup=True, budget_s=0.0)
    assert len(r.pp_tps) == 1 and len(r.tg_tps) == 1  # at least one repetition, no more
    assert (r.tg, r.extra["tg_asked"]) == (16, 20)  # tg shortened to the warm-up length
    assert shapes == [(1, 8)] * 2 + [(1, 1)] * 32


def test_preset_that_does_not_fit_is_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 1 << 30)
    monkeypatch.setattr(bench, "random_model", lambda *a, **k: pytest.fail("must not build"))
    with pytest.raises(ConfigError, match=r"needs about 25\.\d GiB"):
        bench.bench_config(preset="7b", dtype=torch.float32, pp=8, tg=2)
    q = bench.make_quant_config("int8")
    assert q is not None
    float_bytes = bench.estimate_weight_bytes(TINY, torch.float32, None)
    assert float_bytes == TINY.num_params() * 4
    assert bench.estimate_weight_bytes(TINY, torch.float32, q) < float_bytes


def test_json_path_that_cannot_be_written_is_one_line_before_any_work(tmp_path: Path) -> None:
    """`--json` under a regular file is refused before the model is built (no traceback, exit 1)."""
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    proc = subprocess.run(
        [sys.executable, "-m", "llama2", "bench", "--preset", "110m", "--json", str(blocker / "out.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("llama2: error: cannot write --json")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep"
