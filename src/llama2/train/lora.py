"""LoRA: low-rank adapters as a module swap (Hu et al. 2021, "LoRA", eq. 3).

`apply_lora(model, cfg)` replaces each targeted linear (e.g. every attention `wq`/`wv`) by a
`LoRALinear` that keeps the frozen base module and adds a trainable low-rank update:

    h = base(x) + (alpha / r) * B(A(dropout(x)))        A: (r, in), B: (out, r), B = 0 at init

so the adapted model starts exactly equal to the base. The base can be any module with
`in_features`, `out_features` and a forward (an `nn.Linear`, or a quantized linear for QLoRA): only A
and B train. Adapters are saved alone (`adapter.safetensors` + `adapter_config.json`, a few hundred
kB) and can be merged into the weights (`W + (alpha / r) B A`) to get a plain checkpoint again.

QLoRA (Dettmers et al. 2023): over a `llama2.quant.QuantizedLinear` base (e.g. NF4) the frozen
product goes through `FrozenQuantizedMatmul`, an autograd function that runs the base's own
forward (its fused kernel where there is one) and, in backward, dequantizes the weight again to
compute the input's gradient `grad_x = grad_y @ W`: no float copy of the weight is kept between
forward and backward (as bitsandbytes' `MatMul4Bit`), and the quantized buffers never change.
Merging into a quantized base dequantizes it: the merged layer is a float `nn.Linear`.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llama2.checkpoint.save import atomic_write
from llama2.errors import CheckpointError, ConfigError
from llama2.quant.linear import QuantizedLinear

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Names of the linears LoRA may target (Meta's parameter names).
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass
class LoRAConfig:
    """Which linears get adapters, and their shape.

    rank: r, the inner dimension of the update (paper: 1-64; 8 is common).
    alpha: scale numerator; the update is multiplied by alpha / rank (paper sec. 4.1).
    dropout: dropout on the adapter's input (0 disables).
    target_modules: last components of module names to adapt, e.g. ["wq", "wv"] (the paper's choice).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wv"])

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in LINEAR_NAMES]
        if bad or not self.target_modules:
            raise ConfigError(
                f"LoRA target_modules {bad or '[]'} invalid; "
                f"expected a non-empty subset of {list(LINEAR_NAMES)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LoRAConfig:
        try:
            return cls(
                rank=int(obj["rank"]),
                alpha=float(obj["alpha"]),
                dropout=float(obj.get("dropout", 0.0)),
                target_modules=[str(t) for t in obj["target_modules"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"bad LoRA adapter config ({e}); expected rank, alpha, target_modules"
            ) from None


class FrozenQuantizedMatmul(torch.autograd.Function):
    """y = base(x) for a frozen `QuantizedLinear`, differentiable in x only.

    Forward calls the base module (no autograd graph, so its CPU kernels may run); backward
    dequantizes the weight in the base's compute dtype, computes grad_y @ W and drops it, so only
    x's shape and the module are saved for backward, never a float weight.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, base: QuantizedLinear) -> Tensor:
        ctx.base = base
        ctx.x_dtype = x.dtype
        out: Tensor = base(x.detach())  # (..., out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        base: QuantizedLinear = ctx.base
        dtype = base.compute_dtype or ctx.x_dtype
        w = base.dequantize_weight(dtype)  # (out, in), recomputed, freed on return
        grad_x = (grad_out.to(dtype) @ w).to(ctx.x_dtype)  # (..., in)
        return grad_x, None


def _frozen_quantized_forward(self: QuantizedLinear, x: Tensor) -> Tensor:
    """`QuantizedLinear.forward`, but through `FrozenQuantizedMatmul` when x needs a gradient."""
    if torch.is_grad_enabled() and x.requires_grad:
        out: Tensor = FrozenQuantizedMatmul.apply(x, self)  # type: ignore[no-untyped-call]
        return out
    return type(self).forward(self, x)


def freeze_quantized(model: nn.Module) -> int:
    """Make every `QuantizedLinear` in `model` backpropagate to its input without saving a float
    weight (see `FrozenQuantizedMatmul`); returns how many. Its buffers and state dict are untouched.

    Needed for QLoRA: gradients of the adapters in early layers flow through every later frozen
    quantized layer (wk, wo, w1..w3, not only the adapted ones), and a plain dequantize + `F.linear`
    would keep each of those float weights alive until backward.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            if not getattr(module, "_frozen_backward", False):
                module.forward = types.MethodType(_frozen_quantized_forward, module)  # type: ignore[method-assign]
                setattr(module, "_frozen_backward", True)  # noqa: B010 - nn.Module attribute typing
            n += 1
    return n


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (see the module docstring).

    Args:
        base: any module with `in_features`, `out_features` and `forward(x) -> (..., out_features)`.
        rank, alpha, dropout: as in `LoRAConfig`.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_features = getattr(base, "in_features", None)
        out_features = getattr(base, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise ConfigError(
                f"LoRA can wrap only modules with integer in_features/out_features, got {type(base).__name__}"
            )
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        for p in self.base.parameters():
            p.requires_grad_(False)
        ref = next(iter(base.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        if isinstance(base, QuantizedLinear):  # QLoRA: float32 adapters next to the quantized buffers
            freeze_quantized(base)
            device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's init; B = 0 => no change
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.base(x)  # (..., out); a quantized base saves no float weight (freeze_quantized)
        a: Tensor = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()  # (..., r)
        return out + (a @ self.lora_B.t()).to(out.dtype) * self.scale  # (..., out)

    def delta_weight(self) -> Tensor:
        """The update as a dense matrix (out, in): scale * B @ A."""
        return (self.lora_B @ self.lora_A) * self.scale

    def base_weight(self) -> Tensor:
        """The base's dense weight (out, in): `.weight` of a linear, or a quantized base's weight
        dequantized (`dequantize_weight`) in its compute dtype (float32 when it has none)."""
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantize_weight(self.base.compute_dtype or torch.float32)
        deq = getattr(self.base, "dequantize", None)
        if callable(deq):
            w = deq()
            if isinstance(w, Tensor):
                return w
        weight = getattr(self.base, "weight", None)
        if isinstance(weight, Tensor) and weight.is_floating_point():
            return weight
        raise ConfigError(
            f"cannot merge LoRA into {type(self.base).__name__}: "
            "it has neither a float `.weight` nor `dequantize()`"
        )

    def merge(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is base + scale * B @ A (in the base weight's dtype).

        A quantized base is dequantized: the result is a float layer (re-quantize the merged model
        with `llama2 quantize` if wanted; adding B @ A to the codes is not possible exactly)."""
        w = self.base_weight()
        merged = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            merged.weight.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        return merged

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _targets(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if (
                child_name in target_modules
                and not isinstance(child, LoRALinear)
                and not isinstance(module, LoRALinear)
            ):
                found.append((module, child_name, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Swap every targeted linear of `model` for a `LoRALinear`, in place, and freeze everything else.

    Returns:
        The dotted names of the wrapped modules.

    Raises:
        ConfigError: no module matched `cfg.target_modules`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    freeze_quantized(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = _targets(model, cfg.target_modules)
    if not targets:
        raise ConfigError(f"no module named {cfg.target_modules} found to attach LoRA adapters to")
    wrapped = []
    for parent, child_name, child in targets:
        setattr(parent, child_name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
        prefix = names[id(parent)]
        wrapped.append(f"{prefix}.{child_name}" if prefix else child_name)
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every `lora_A`/`lora_B`) of `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, named like `layers.0.attention.wq.lora_A`."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model: nn.Module) -> int:
    """Replace every `LoRALinear` of `model` by its merged `nn.Linear`, in place; returns how many."""
    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merge())
                n += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return n


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every `QuantizedLinear` of `model` (outside LoRA wrappers too) by a float `nn.Linear`
    holding its dequantized weight, in place; returns how many. Used to save a merged QLoRA model as
    a plain float checkpoint."""
    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                w = child.dequantize_weight(dtype)  # (out, in)
                dense = nn.Linear(
                    child.in_features, child.out_features, bias=False, device=w.device, dtype=dtype
                )
                with torch.no_grad():
                    dense.weight.copy_(w)
                setattr(module, child_name, dense)
                n += 1
    return n


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: Path | str, **info: Any) -> Path:
    """Write `adapter.safetensors` (adapter tensors only, float32) and `adapter_config.json`
    (the `LoRAConfig` plus any `info`, e.g. the base checkpoint) into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ConfigError("the model has no LoRA adapters to save; call apply_lora first")
    text = json.dumps({**cfg.to_json(), **info}, indent=2, default=str) + "\n"

    def write_weights(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "llama2-lora"})

    def write_config(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(out / ADAPTER_WEIGHTS, write_weights)  # temporary file + rename: never half a file
    atomic_write(out / ADAPTER_CONFIG, write_config)
    return out


def read_adapter_config(adapter_dir: Path | str) -> LoRAConfig:
    """The `LoRAConfig` stored in an adapter folder."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected an adapter folder written by save_adapter")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return LoRAConfig.from_json(obj)


def load_adapter(model: nn.Module, adapter_dir: Path | str, *, merge: bool = False) -> LoRAConfig:
    """Attach the adapters saved in `adapter_dir` to `model` (in place); with `merge=True` fold
    them into the weights right away.

    Raises:
        CheckpointError: the folder's tensors do not match the model's adapted modules.
    """
    cfg = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected adapter weights written by save_adapter")
    tensors = load_file(str(path))
    apply_lora(model, cfg)
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: adapter tensors do not match the model "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_A.copy_(tensors[f"{name}.lora_A"])
                module.lora_B.copy_(tensors[f"{name}.lora_B"])
    if merge:
        merge_lora(model)
    return cfg
