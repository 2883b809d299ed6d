"""Every config value is type-checked and bounded before it is used: Meta's `params.json`, Hugging Face's
`config.json` and `ModelArgs` itself refuse wrong types, out-of-range and non-finite numbers with one
`ConfigError` naming the field; real Llama 2 / Code Llama / TinyLlama shapes are accepted."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from llama2.config import PRESETS, ModelArgs, RopeScaling, read_json
from llama2.errors import ConfigError
from llama2.limits import BOUNDS

# Meta's published params.json files (llama-2-70b, CodeLlama-34b), and TinyLlama's config.json, verbatim.
META_70B = {
    "dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
    "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1,
}  # fmt: skip
CODE_34B = {
    "dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000, "multiple_of": 256,
    "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000,
}  # fmt: skip
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
    "use_cache": True, "vocab_size": 32000,
}  # fmt: skip
SMALL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "norm_eps": 1e-5}
SMALL_HF = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 96, "intermediate_size": 96, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32, "rope_theta": 10000.0,
}  # fmt: skip


def test_real_shapes_are_accepted() -> None:
    a70 = ModelArgs.from_params_json(META_70B, vocab_size=32000)
    # Published HF intermediate_size values: 70B 28672, CodeLlama-34B 22016.
    assert (a70.n_layers, a70.kv_heads, a70.ffn_hidden_dim) == (80, 8, 28672)
    c34 = ModelArgs.from_params_json(CODE_34B)
    assert (c34.ffn_hidden_dim, c34.rope_theta) == (22016, 1e6)
    tiny = ModelArgs.from_hf_config(TINYLLAMA)
    assert (tiny.dim, tiny.n_layers, tiny.kv_heads, tiny.ffn_hidden_dim, tiny.max_seq_len) == (
        2048, 22, 4, 5632, 2048
    )  # fmt: skip
    assert PRESETS["code-7b"].replace(max_seq_len=100_000).max_seq_len == 100_000  # Code Llama's long context
    scaled = ModelArgs.from_hf_config({**TINYLLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert scaled.rope_scaling == RopeScaling("linear", 4.0)


def test_bounds_table_is_finite_and_admits_70b() -> None:
    for key, bounds in BOUNDS.items():
        assert math.isfinite(bounds.low) and math.isfinite(bounds.high), key
    for key, value in {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "hidden_dim": 28672,
                       "vocab_size": 32016, "max_seq_len": 100_000, "rope_theta": 1e6}.items():  # fmt: skip
        assert value in BOUNDS[key], key


def _params_text(field: str, raw: str) -> str:
    """SMALL as JSON text with `field` set to the literal JSON `raw` (so `1e400`, `NaN` stay literal)."""
    body = json.dumps({k: v for k, v in SMALL.items() if k != field})
    return body[:-1] + f', "{field}": {raw}}}'


PARAMS_CASES = [
    ("dim", '"4096"'), ("dim", "null"), ("dim", "[64]"), ("dim", "true"), ("dim", "1e400"), ("dim", "64.0"),
    ("dim", "-64"), ("dim", "0"), ("dim", str(2**30)), ("dim", "1" + "0" * 400),
    ("n_layers", "100000"), ("n_layers", "10000000"), ("n_layers", "0"), ("n_layers", '"2"'),
    ("n_heads", "0"), ("n_heads", "-4"), ("n_heads", "3"), ("n_heads", "{}"),
    ("n_kv_heads", "0"), ("n_kv_heads", "-2"), ("n_kv_heads", "3"), ("n_kv_heads", "true"),
    ("n_kv_heads", "2000"), ("vocab_size", '"96"'), ("vocab_size", str(2**21)), ("vocab_size", "0"),
    ("multiple_of", "0"), ("multiple_of", "-256"), ("multiple_of", str(2**40)),
    ("ffn_dim_multiplier", "-1.3"), ("ffn_dim_multiplier", "0"), ("ffn_dim_multiplier", "NaN"),
    ("ffn_dim_multiplier", "1e300"), ("ffn_dim_multiplier", '"1.3"'), ("hidden_dim", "-1"),
    ("hidden_dim", str(2**30)), ("hidden_dim", "96.5"), ("norm_eps", "-1"), ("norm_eps", "0"),
    ("norm_eps", "1"), ("norm_eps", "NaN"), ("norm_eps", "Infinity"), ("norm_eps", '"1e-5"'),
    ("norm_eps", "null"), ("norm_eps", "true"), ("rope_theta", "0"), ("rope_theta", "-10000"),
    ("rope_theta", "NaN"), ("rope_theta", "1e400"), ("rope_theta", '"1e6"'), ("max_seq_len", "0"),
    ("max_seq_len", str(2**30)), ("max_seq_len", "[4096]"), ("rope_scaling", "[1]"),
    ("rope_scaling", '"linear"'), ("rope_scaling", '{"type": "linear"}'),
    ("rope_scaling", '{"type": "linear", "factor": 0.5}'),
    ("rope_scaling", '{"type": "linear", "factor": "2"}'),
    ("rope_scaling", '{"type": "linear", "factor": NaN}'),
    ("rope_scaling", '{"type": "linear", "factor": 1e400}'),
    ("rope_scaling", '{"type": "yarn", "factor": 2.0}'), ("rope_scaling", '{"type": 7, "factor": 2.0}'),
]  # fmt: skip


@pytest.mark.parametrize(("field", "raw"), PARAMS_CASES)
def test_params_json_malformed_value(field: str, raw: str, tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text(_params_text(field, raw))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_params_json(read_json(path))
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    if raw != "1" + "0" * 400:  # an integer of 401 digits is refused by the JSON reader itself
        assert field.split("_")[0] in msg or "head" in msg or "FFN" in msg or "rope" in msg, msg


def test_params_json_error_names_the_field_and_expectation() -> None:
    with pytest.raises(ConfigError, match=r"dim must be an integer in \[1, 65536\], got '4096' \(str\)"):
        ModelArgs.from_params_json({**SMALL, "dim": "4096"})
    with pytest.raises(ConfigError, match=r"n_layers must be an integer in \[1, 1024\], got 10000000"):
        ModelArgs.from_params_json({**SMALL, "n_layers": 10**7})
    with pytest.raises(ConfigError, match=r"norm_eps must be a finite number in \(0, 1\), got -1"):
        ModelArgs.from_params_json({**SMALL, "norm_eps": -1})
    with pytest.raises(ConfigError, match=r"n_kv_heads must be an integer in \[1, 1024\], got 0"):
        ModelArgs.from_params_json({**SMALL, "n_kv_heads": 0})
    with pytest.raises(ConfigError, match=r"dim must be an integer .* got True \(bool\)"):
        ModelArgs.from_params_json({**SMALL, "dim": True})


HF_CASES: list[tuple[str, Any]] = [
    ("hidden_size", "4096"), ("hidden_size", None), ("hidden_size", [64]), ("hidden_size", 2**30),
    ("num_hidden_layers", 10**7), ("num_hidden_layers", True), ("num_hidden_layers", 2.0),
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("num_key_value_heads", 3),
    ("num_key_value_heads", -2), ("vocab_size", "32000"), ("vocab_size", 0), ("intermediate_size", -1),
    ("intermediate_size", 2**30), ("rms_norm_eps", 0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", "1e-6"),
    ("rms_norm_eps", math.inf), ("rope_theta", 0), ("rope_theta", math.nan), ("rope_theta", "1e4"),
    ("max_position_embeddings", 2**30), ("max_position_embeddings", "4096"), ("head_dim", "16"),
    ("head_dim", 17), ("rope_scaling", [1]), ("rope_scaling", {"rope_type": "linear", "factor": math.nan}),
    ("rope_scaling", {"rope_type": "linear"}), ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("rope_parameters", "x"), ("attention_bias", "no"), ("tie_word_embeddings", 1), ("model_type", ["llama"]),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), HF_CASES)
def test_hf_config_malformed_value(key: str, value: Any) -> None:
    config = {**SMALL_HF}
    if value is None:
        del config[key]
    else:
        config[key] = value
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_hf_config(config)
    msg = str(err.value)
    assert "\n" not in msg
    named = key in msg or "head" in msg or "ModelArgs" in msg  # cross-field checks name ModelArgs' fields
    assert named, msg


def test_hf_num_key_value_heads_null_means_multi_head() -> None:
    assert ModelArgs.from_hf_config({**SMALL_HF, "num_key_value_heads": None}).kv_heads == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"dim": True}, {"dim": 64.0}, {"n_layers": "2"}, {"n_kv_heads": 0}, {"vocab_size": None},
        {"norm_eps": math.nan}, {"norm_eps": 2.0}, {"rope_theta": -1.0}, {"rope_theta": math.inf},
        {"hidden_dim": 0}, {"ffn_dim_multiplier": math.inf}, {"max_seq_len": 2**23}, {"extra": []},
        {"dim": 65536 * 2}, {"n_heads": 1, "dim": 65536, "multiple_of": 65536, "ffn_dim_multiplier": 16.0},
    ],
)  # fmt: skip
def test_model_args_gate(changes: dict[str, Any]) -> None:
    base = {"dim": 64, "n_layers": 2, "n_heads": 4}
    with pytest.raises(ConfigError):
        ModelArgs(**{**base, **changes})


@pytest.mark.parametrize("factor", [math.inf, math.nan, 0.5, 0.0, -2.0, 1e6])
def test_rope_scaling_factor_bounds(factor: float) -> None:
    with pytest.raises(ConfigError, match="factor"):
        RopeScaling("linear", factor)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "{" + '"a":{' * 100_000,
        '{"a":' + "[" * 70 + "]" * 70 + "}",  # valid JSON, nested deeper than the 64-level bound
        '{"dim": ' + "9" * 5000 + "}",  # beyond Python's integer-string digit limit
        "{not json",
        "",
    ],
)
def test_read_json_malformed(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        read_json(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_json_refuses_non_objects_binary_directories_and_huge_files(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text('{"a":' + "[" * 60 + "]" * 60 + "}")
    assert read_json(path) == {"a": json.loads("[" * 60 + "]" * 60)}  # 61 levels: within the bound
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json(path)
    with pytest.raises(ConfigError, match="cannot read file"):
        read_json(tmp_path)
    with path.open("wb") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: 17 MiB of zeros without writing them
    with pytest.raises(ConfigError, match="too large"):
        read_json(path)
