"""Save and load reward models (`llama2.model.reward.RewardModel`).

A reward-model folder is an ordinary model folder plus two files:
  - `params.json`, `model.safetensors`, `tokenizer.model`: the trunk, written by `save_checkpoint`,
    so `load_model(folder)` still loads it as a plain `Transformer` (its vocabulary head included);
  - `reward_head/head.safetensors`: the head's `weight` (1, dim) and `bias` (1,). It lives in a
    subfolder because our reader takes every safetensors file at the top of a `params.json` folder
    as trunk weights (and would refuse the head's tensors); subfolders are never read by `load_model`;
  - `reward.json`: `{"kind": "reward", "objective": ..., **info}` (e.g. margin, threshold, data).
Every file is written under a temporary name and renamed into place (`atomic_write`); any stale
`reward.json` is removed first and the new one is written last, so an interrupted save never leaves a
folder that loads as a complete reward model. On load, the shape comes from `params.json` and the
head's header and the objective from `reward.json`, never from file or folder names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2.checkpoint.load import load_model
from llama2.checkpoint.save import atomic_write, save_checkpoint
from llama2.errors import CheckpointError, ConfigError
from llama2.model.reward import RewardModel

HEAD_NAME = "reward_head/head.safetensors"  # relative to the folder; see the module docstring
INFO_NAME = "reward.json"
KIND = "reward"
OBJECTIVES = ("helpfulness", "safety")


def save_reward_model(
    model: RewardModel,
    folder: Path,
    tokenizer_path: Path | None,
    info: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` to `folder` (created if needed) in `dtype`; returns the folder.

    Args:
        model: the reward model.
        folder: where to write.
        tokenizer_path: a `tokenizer.model` to copy beside the weights (None: none copied).
        info: JSON-serialisable fields for `reward.json`; must hold `"objective"`
            ("helpfulness" or "safety").
        dtype: floating dtype of the saved weights.

    Raises:
        ConfigError: no valid objective in `info`, a non-float dtype, or `info` not JSON-serialisable.
        CheckpointError: the folder cannot be written.
    """
    objective = info.get("objective")
    if objective not in OBJECTIVES:
        raise ConfigError(f"reward model info needs objective 'helpfulness' or 'safety', got {objective!r}")
    if not dtype.is_floating_point:
        raise ConfigError(f"reward models are saved in a floating dtype, got {dtype}")
    data = {"kind": KIND, **info, "objective": objective}
    try:
        text = json.dumps(data, indent=2) + "\n"
    except (TypeError, ValueError) as err:
        raise ConfigError(f"reward model info must be JSON-serialisable: {err}") from None
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; expected a folder to write into")
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_NAME).unlink(missing_ok=True)  # the folder is not a complete reward model until the end
    trunk_sd = {k: v.detach().to("cpu", dtype) for k, v in model.trunk.state_dict().items()}
    save_checkpoint(trunk_sd, model.args, out, tokenizer_path=tokenizer_path)
    head = {
        "weight": model.head.weight.detach().to("cpu", dtype).contiguous().clone(),  # (1, dim)
        "bias": model.head.bias.detach().to("cpu", dtype).contiguous().clone(),  # (1,)
    }

    def write_head(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(head, str(tmp), metadata={"format": "llama2-reward"})

    def write_info(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    (out / HEAD_NAME).parent.mkdir(exist_ok=True)
    atomic_write(out / HEAD_NAME, write_head)
    atomic_write(out / INFO_NAME, write_info)
    return out


def read_reward_info(folder: Path | str) -> dict[str, Any]:
    """The `reward.json` of a reward-model folder, checked.

    Raises:
        CheckpointError: the file is missing, not JSON, not an object, not of kind "reward", or
            without a valid objective.
    """
    path = Path(folder) / INFO_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; expected a reward-model folder written by save_reward_model"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err}); expected a reward.json object") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}; expected a JSON object")
    if data.get("kind") != KIND:
        raise CheckpointError(f"{path}: kind is {data.get('kind')!r}; expected {KIND!r}")
    if data.get("objective") not in OBJECTIVES:
        raise CheckpointError(
            f"{path}: objective is {data.get('objective')!r}; expected 'helpfulness' or 'safety'"
        )
    return data


def _read_head(path: Path, dim: int) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; expected the reward head beside the trunk")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    expected = {"weight": (1, dim), "bias": (1,)}
    if set(tensors) != set(expected):
        raise CheckpointError(f"{path}: holds tensors {sorted(tensors)}; expected exactly ['bias', 'weight']")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}; expected {list(shape)} for dim {dim}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected floating point")
        if not bool(torch.isfinite(t.float()).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or inf values")
    return tensors


def load_reward_model(
    path: Path | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[RewardModel, dict[str, Any], Path | None]:
    """Load a folder written by `save_reward_model`.

    Returns:
        (the model in eval mode on `device` in `dtype`, the contents of `reward.json`, the
        folder's tokenizer path or None).

    Raises:
        CheckpointError: not a folder, `reward.json` or the head missing or malformed, or the trunk
            unreadable (see `load_model`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected a reward-model folder")
    info = read_reward_info(folder)
    loaded = load_model(folder, device=device, dtype=dtype, progress=False)
    head = _read_head(folder / HEAD_NAME, loaded.args.dim)
    model = RewardModel(loaded.model)
    with torch.no_grad():
        model.head.weight.copy_(head["weight"].to(model.head.weight.dtype))
        model.head.bias.copy_(head["bias"].to(model.head.bias.dtype))
    model.eval()
    return model, info, loaded.tokenizer_path


__all__ = ["HEAD_NAME", "INFO_NAME", "load_reward_model", "read_reward_info", "save_reward_model"]
