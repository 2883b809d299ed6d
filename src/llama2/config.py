"""Model hyperparameters: the `ModelArgs` dataclass, named presets, and readers for Meta's
`params.json` and Hugging Face's `config.json`.

Presets are chosen explicitly by name (`PRESETS["7b"]`); nothing here guesses a shape from a file
or folder name. Checkpoint loaders read the shape from the checkpoint's own metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama2.errors import ConfigError
from llama2.limits import BOUNDS, check_float, check_int, loads_json

RopeScalingType = Literal["linear", "dynamic"]


@dataclass(frozen=True)
class RopeScaling:
    """Context-length scaling of the rotary embedding.

    `linear` divides positions by `factor` (position interpolation); `dynamic` is NTK-aware scaling
    that raises the rotary base once the sequence grows past the trained context, exactly as
    transformers' `dynamic` rope type does.
    """

    type: RopeScalingType
    factor: float

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or self.type not in ("linear", "dynamic"):
            raise ConfigError(f"rope_scaling type must be 'linear' or 'dynamic', got {self.type!r:.40}")
        check_float(self.factor, "rope_scaling_factor", "rope_scaling factor")

    @classmethod
    def from_dict(cls, scaling: Any, where: str) -> RopeScaling | None:
        """Read `{"type" or "rope_type": ..., "factor": ...}`; None for the `default` type (no scaling).

        Raises:
            ConfigError: naming `where`: not an object, an unknown type, a missing or bad factor.
        """
        if not isinstance(scaling, dict):
            raise ConfigError(f"{where} must be an object with 'type' and 'factor', got {scaling!r:.40}")
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind in (None, "default"):
            return None
        if "factor" not in scaling:
            raise ConfigError(f"{where} of type {kind!r:.40} has no 'factor'")
        factor = check_float(scaling["factor"], "rope_scaling_factor", f"{where} factor")
        return cls(kind, factor)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama 2 decoder. Field names follow Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention); 70B/34B use 8
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # 70B: 1.3; Code Llama 34B: 1.0
    hidden_dim: int | None = None  # explicit FFN width (HF `intermediate_size`); None: Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # 1e6 for Code Llama
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096  # trained context window (HF `max_position_embeddings`)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Types and bounds first (see llama2.limits.BOUNDS), so no arithmetic below can blow up.
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            check_int(getattr(self, name), name, f"ModelArgs.{name}")
        for name in ("n_kv_heads", "hidden_dim"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, f"ModelArgs.{name}")
        if self.ffn_dim_multiplier is not None:
            check_float(self.ffn_dim_multiplier, "ffn_dim_multiplier", "ModelArgs.ffn_dim_multiplier")
        check_float(self.norm_eps, "norm_eps", "ModelArgs.norm_eps")
        check_float(self.rope_theta, "rope_theta", "ModelArgs.rope_theta")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(
                f"ModelArgs.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r:.40}"
            )
        if not isinstance(self.extra, dict):
            raise ConfigError(f"ModelArgs.extra must be a dict, got {type(self.extra).__name__}")
        if self.dim % self.n_heads != 0:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head dimension must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.kv_heads != 0:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )
        if self.ffn_hidden_dim not in BOUNDS["hidden_dim"]:
            raise ConfigError(
                f"the FFN width from dim {self.dim}, ffn_dim_multiplier {self.ffn_dim_multiplier} and "
                f"multiple_of {self.multiple_of} is {self.ffn_hidden_dim}; expected {BOUNDS['hidden_dim']}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width. Meta's rule: 4*dim, times 2/3, times `ffn_dim_multiplier`, rounded up to
        `multiple_of` (7B: 4096 -> 11008; 13B: 5120 -> 13824; 70B: 8192 -> 28672)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count (embeddings and output head counted separately: they are untied)."""
        d, h, kv = self.dim, self.ffn_hidden_dim, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def to_params_json(self) -> dict[str, Any]:
        """Meta's `params.json` layout (plus our optional fields when they are set)."""
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "multiple_of": self.multiple_of,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
        }
        if self.n_kv_heads is not None:
            out["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.hidden_dim is not None:
            out["hidden_dim"] = self.hidden_dim
        if self.rope_theta != 10000.0:
            out["rope_theta"] = self.rope_theta
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": self.rope_scaling.type, "factor": self.rope_scaling.factor}
        out["max_seq_len"] = self.max_seq_len
        return out

    @classmethod
    def from_params_json(cls, params: dict[str, Any], *, vocab_size: int | None = None) -> ModelArgs:
        """Read Meta's `params.json`. Meta stores `vocab_size: -1`; pass the real size (from the
        checkpoint's embedding tensor) as `vocab_size`.

        Raises:
            ConfigError: naming the field: a value of the wrong type (a string, null, list or bool
                where a number belongs) or outside `llama2.limits.BOUNDS`, or an inconsistent shape.
        """
        if not isinstance(params, dict):
            raise ConfigError(f"params.json must hold a JSON object, got {type(params).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling"}
        kwargs: dict[str, Any] = {k: v for k, v in params.items() if k in known}
        extra = {k: v for k, v in params.items() if k not in known and k != "rope_scaling"}
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        elif kwargs.get("vocab_size", 0) is None or _is_int(kwargs.get("vocab_size"), -1):
            raise ConfigError("params.json has vocab_size -1 and no vocabulary size was supplied")
        for name, value in kwargs.items():
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if name in _FLOAT_FIELDS:
                kwargs[name] = check_float(value, name)
            else:
                check_int(value, name)
        scaling = params.get("rope_scaling")
        if scaling is not None:
            kwargs["rope_scaling"] = RopeScaling.from_dict(scaling, "rope_scaling")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a Hugging Face `LlamaConfig` dict (`config.json`). Accepts both the classic
        `rope_theta`/`rope_scaling` keys and transformers 5's `rope_parameters`.

        Raises:
            ConfigError: naming the config.json key: missing, of the wrong type, out of bounds, or a
                Llama variant this model does not implement.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"config.json model_type must be 'llama', got {model_type!r:.40}")

        def get(key: str, default: Any = _REQUIRED) -> Any:
            if key in config and config[key] is not None:
                return config[key]
            if default is _REQUIRED:
                raise ConfigError(f"config.json is missing required key {key!r}")
            return default

        def integer(key: str, field_name: str, default: Any = _REQUIRED) -> int:
            return check_int(get(key, default), field_name, key)

        dim = integer("hidden_size", "dim")
        n_heads = integer("num_attention_heads", "n_heads")
        args: dict[str, Any] = {
            "dim": dim,
            "n_layers": integer("num_hidden_layers", "n_layers"),
            "n_heads": n_heads,
            "n_kv_heads": integer("num_key_value_heads", "n_kv_heads", n_heads),
            "vocab_size": integer("vocab_size", "vocab_size"),
            "hidden_dim": integer("intermediate_size", "hidden_dim"),
            "norm_eps": check_float(get("rms_norm_eps", 1e-6), "norm_eps", "rms_norm_eps"),
            "max_seq_len": integer("max_position_embeddings", "max_seq_len", 4096),
        }
        if args["n_kv_heads"] == n_heads:
            args["n_kv_heads"] = None
        head_dim = config.get("head_dim")
        if head_dim is not None and check_int(head_dim, "dim", "head_dim") * n_heads != dim:
            raise ConfigError(f"config.json head_dim {head_dim} != hidden_size/num_attention_heads")
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r:.40}")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        args["rope_theta"] = check_float(theta, "rope_theta", "rope_theta")
        scaling = config.get("rope_scaling") or None
        rope_type = rope.get("rope_type") or rope.get("type")
        if scaling is None and rope_type not in (None, "default"):
            scaling = rope
        if scaling is not None:
            args["rope_scaling"] = RopeScaling.from_dict(scaling, "rope_scaling")
        for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(config.get(key, False), (bool, type(None))):
                raise ConfigError(f"{key} must be true or false, got {config[key]!r:.40}")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ConfigError("Llama checkpoints with attention_bias/mlp_bias are not supported")
        if config.get("tie_word_embeddings"):
            raise ConfigError("Llama 2 has an untied output head; tie_word_embeddings=true is not supported")
        return cls(**args)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers `LlamaConfig` dict for this shape."""
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {
                "rope_type": self.rope_scaling.type,
                "type": self.rope_scaling.type,
                "factor": self.rope_scaling.factor,
            }
        return cfg


_REQUIRED: Any = object()  # sentinel: a config key without a default
_FLOAT_FIELDS = frozenset({"norm_eps", "rope_theta", "ffn_dim_multiplier"})
_OPTIONAL_FIELDS = frozenset({"n_kv_heads", "ffn_dim_multiplier", "hidden_dim"})


def _is_int(value: Any, target: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == target


# Named presets (Meta's published shapes). vocab 32016 for Code Llama 7B/13B: 16 extra pieces for infilling.
PRESETS: dict[str, ModelArgs] = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    "code-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384
    ),
    "code-13b": ModelArgs(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384
    ),
    "code-34b": ModelArgs(
        dim=8192,
        n_layers=48,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        rope_theta=1e6,
        max_seq_len=16384,
    ),
    # TinyLlama-1.1B shape: the speed benchmarks' reference shape (dim 2048, 22 layers, GQA 32/4).
    "tinyllama-1.1b": ModelArgs(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048
    ),
    # llama2.c's 110M shape.
    "110m": ModelArgs(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
}


def preset(name: str) -> ModelArgs:
    """Look up a named preset; raises `ConfigError` listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}") from None


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, raising `ConfigError` naming the file on failure (missing,
    unreadable, too large, not JSON, nested too deeply, or not an object)."""
    limit = BOUNDS["json_bytes"].max
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read file ({e.strerror or e})") from None
    data = loads_json(raw, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
