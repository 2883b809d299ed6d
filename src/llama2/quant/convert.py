"""Swap a Transformer's linear layers for quantized ones, and save/load the result.

`quantize_model(model, QuantConfig(...))` replaces `wq wk wv wo w1 w2 w3` in every block (and
`output` when `include_output=True`) in place; embeddings and norms keep their dtype.
`prepare_model(model, config)` swaps in *empty* quantized modules (on the layers' device, `meta`
included) so a saved quantized state dict loads with `load_state_dict(sd, assign=True)` without
re-quantizing. The scheme travels with the weights as safetensors metadata:
`{"quantization": "{\"scheme\": \"nf4\", \"blocksize\": 64, \"double_quant\": true, ...}"}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from llama2.errors import CheckpointError, ConfigError
from llama2.quant.config import QuantConfig, parse_quant_spec, parse_quant_specs
from llama2.quant.linear import QuantizedLinear
from llama2.quant.registry import get_scheme

BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and feed-forward projections
METADATA_KEY = "quantization"


def target_names(model: nn.Module, include_output: bool) -> list[str]:
    """Qualified names of the linears a scheme replaces (`layers.0.attention.wq`, ..., `output`)."""
    prefixes = {id(parent): prefix for prefix, parent in model.named_modules()}
    names = []
    for parent, name, _ in _targets(model, QuantConfig("int8", include_output=include_output)):
        prefix = prefixes[id(parent)]
        names.append(f"{prefix}.{name}" if prefix else name)
    return names


def empty_module(
    in_features: int, out_features: int, config: QuantConfig, device: torch.device | str
) -> QuantizedLinear:
    """An empty quantized module of `config`'s scheme (e.g. on `meta`), to be filled by load_state_dict."""
    try:
        return _empty(in_features, out_features, config, device)
    except ConfigError as err:
        raise ConfigError(f"cannot quantize a {out_features}x{in_features} linear: {err}") from err


@torch.no_grad()
def quantize_weight(weight: Tensor, config: QuantConfig) -> dict[str, Tensor]:
    """Quantize one (out, in) float weight: the quantized module's state dict (`weight`, `scales`, ...).

    The buffers are on `weight`'s device; nothing else is kept.
    """
    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return dict(_make(linear, config, quantize=True).state_dict())


def _make(linear: nn.Linear, config: QuantConfig, quantize: bool) -> QuantizedLinear:
    """A quantized module for `linear`: quantized from its weight, or empty (for loading)."""
    if linear.bias is not None:
        raise ConfigError("quantized linear layers support bias-free nn.Linear only (Llama has no biases)")
    if not quantize:
        return _empty(linear.in_features, linear.out_features, config, linear.weight.device)
    return get_scheme(config.scheme).quantize(linear, config)


def _empty(n_in: int, n_out: int, config: QuantConfig, dev: torch.device | str) -> QuantizedLinear:
    scheme = get_scheme(config.scheme)
    scheme.check_shape(n_out, n_in, config)
    return scheme.empty(n_in, n_out, config, dev)


def _targets(model: nn.Module, config: QuantConfig) -> list[tuple[nn.Module, str, nn.Linear]]:
    found: list[tuple[nn.Module, str, nn.Linear]] = []
    for prefix, parent in model.named_modules():
        for name, child in parent.named_children():
            is_target = name in BLOCK_LINEARS or (config.include_output and name == "output" and prefix == "")
            if is_target and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def _swap(model: nn.Module, config: QuantConfig, quantize: bool) -> nn.Module:
    targets = _targets(model, config)
    if not targets:
        raise ConfigError(
            f"no linear layers named {', '.join(BLOCK_LINEARS)} found to quantize; "
            "is this a llama2 Transformer?"
        )
    for parent, name, linear in targets:
        try:
            new = _make(linear, config, quantize)
        except ConfigError as err:
            raise ConfigError(
                f"cannot quantize layer {name!r} ({linear.out_features}x{linear.in_features}): {err}"
            ) from err
        setattr(parent, name, new)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize the model's projection layers in place (and `output` if asked); returns the model.

    Args:
        model: a `llama2.model.Transformer` (or any module with layers named wq..w3) with real weights.
        config: the scheme and its options.
    """
    return _swap(model, config, quantize=True)


def prepare_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap in empty quantized modules (same device as the float layers, `meta` works) so that a
    quantized state dict can be loaded with `model.load_state_dict(sd, assign=True)`."""
    return _swap(model, config, quantize=False)


def quantization_metadata(config: QuantConfig) -> dict[str, str]:
    """safetensors metadata recording the scheme: {"quantization": json}."""
    return {METADATA_KEY: json.dumps(config.to_metadata(), sort_keys=True)}


def config_from_metadata(metadata: dict[str, str] | None) -> QuantConfig | None:
    """The QuantConfig recorded in safetensors metadata, or None if the file is not quantized."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"quantization metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"quantization metadata must be a JSON object, got {type(meta).__name__}")
    return QuantConfig.from_metadata(meta)


def save_quantized(model: nn.Module, config: QuantConfig, path: Path | str) -> None:
    """Write the (quantized) model's state dict to one safetensors file with the scheme in metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(path)), metadata=quantization_metadata(config))


def load_quantized(path: Path | str, device: str = "cpu") -> tuple[dict[str, Tensor], QuantConfig]:
    """Read a file written by `save_quantized`: (state dict, QuantConfig)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"quantized checkpoint {p} does not exist")
    with safe_open(str(p), framework="pt", device=device) as f:
        config = config_from_metadata(f.metadata())
        if config is None:
            raise CheckpointError(
                f"{p} has no '{METADATA_KEY}' metadata; it was not written by save_quantized"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    return state, config


__all__ = [  # QuantConfig and the spec parsers live in `llama2.quant.config`; re-exported here
    "BLOCK_LINEARS",
    "METADATA_KEY",
    "QuantConfig",
    "config_from_metadata",
    "empty_module",
    "load_quantized",
    "parse_quant_spec",
    "parse_quant_specs",
    "prepare_model",
    "quantization_metadata",
    "quantize_model",
    "quantize_weight",
    "save_quantized",
    "target_names",
]
