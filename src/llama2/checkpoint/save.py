"""Write checkpoints: our format, and exports to Hugging Face, Meta and llama2.c layouts.

Every writer takes a `Transformer` or a state dict with our (Meta) names plus its `ModelArgs`. Files
are written under a temporary name and renamed into place, weights first and the JSON config last,
so an interrupted save never leaves a folder that loads as a complete checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import LLAMA2C_MAGIC, LLAMA2C_V1_HEADER_BYTES
from llama2.config import ModelArgs
from llama2.errors import CheckpointError, ConfigError

FORMAT_MARKER = "llama2"
WEIGHTS_NAME = "model.safetensors"


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict()
    else:
        sd = dict(model_or_state_dict)
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"state dict entry {name!r} is a {type(t).__name__}; expected a tensor")
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device (no data); load weights first")
        out[name] = t.detach().to("cpu")
    return out


def _check_complete(sd: Mapping[str, Tensor], args: ModelArgs) -> None:
    expected = keymaps.meta_names(args.n_layers)
    missing = [n for n in expected if n not in sd]
    if missing:
        raise CheckpointError(
            f"cannot export: missing tensor {missing[0]!r} for a {args.n_layers}-layer model"
        )
    unexpected = [n for n in sd if n not in set(expected)]
    if unexpected:
        raise CheckpointError(f"cannot export: unexpected tensor {unexpected[0]!r}; not a Llama 2 parameter")


def _unshare(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses aliasing tensors)."""
    seen: set[tuple[int, int]] = set()  # (storage pointer, element offset)
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)` to a temporary file in the same folder, then rename onto `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode a plain open() would
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    atomic_write(path, write)


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _copy_tokenizer(tokenizer_path: Path | str | None, out_dir: Path) -> None:
    if tokenizer_path is None:
        return
    src = Path(tokenizer_path)
    if not src.is_file():
        raise CheckpointError(f"{src}: tokenizer file not found; expected a tokenizer.model to copy")
    dst = out_dir / "tokenizer.model"
    if src.resolve() != dst.resolve():

        def write(tmp: Path) -> None:
            shutil.copyfile(src, tmp)

        atomic_write(dst, write)


def _prepare_dir(out_dir: Path | str) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; expected a folder to write into")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ============================================================================== our format
def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    args: ModelArgs,
    out_dir: Path | str,
    tokenizer_path: Path | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save in our format: `params.json` (Meta fields + `"format": "llama2"`) and `model.safetensors`.

    Args:
        model_or_state_dict: a `Transformer` or a state dict with Meta names.
        args: the model's shape (written to `params.json`).
        out_dir: folder to write (created if needed; existing files of the same names are replaced).
        tokenizer_path: a `tokenizer.model` to copy beside the weights.
        metadata: strings stored in the safetensors header (e.g. dtype/quantization notes).

    Returns:
        The folder written.
    """
    out = _prepare_dir(out_dir)
    sd = _unshare(_state_dict(model_or_state_dict))
    meta = {"format": FORMAT_MARKER}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    _write_safetensors(out / WEIGHTS_NAME, sd, meta)
    _copy_tokenizer(tokenizer_path, out)
    params = {"format": FORMAT_MARKER, **args.to_params_json()}
    _write_json(out / "params.json", params)
    return out


# ============================================================================ Hugging Face
def export_hf(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    args: ModelArgs,
    out_dir: Path | str,
    tokenizer_path: Path | str | None = None,
) -> Path:
    """Export a folder `transformers.LlamaForCausalLM.from_pretrained` loads.

    Writes `config.json` and `model.safetensors` with HF names, applying transformers' q/k rotary
    permutation (Meta's adjacent-pair rows -> rotate-half rows).

    Returns:
        The folder written.
    """
    out = _prepare_dir(out_dir)
    sd = _state_dict(model_or_state_dict)
    _check_complete(sd, args)
    hf: dict[str, Tensor] = {}
    for name, t in sd.items():
        hf_name = keymaps.rename(name, keymaps.META_TO_HF)
        if hf_name is None:  # unreachable after _check_complete; kept for clarity
            raise CheckpointError(f"cannot export tensor {name!r}: no Hugging Face name")
        if name.endswith("attention.wq.weight"):
            t = keymaps.meta_to_hf_qk(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = keymaps.meta_to_hf_qk(t, args.kv_heads)
        hf[hf_name] = t
    hf = _unshare(hf)
    _write_safetensors(out / "model.safetensors", hf, {"format": "pt"})
    _copy_tokenizer(tokenizer_path, out)
    config = args.to_hf_config()
    config["torch_dtype"] = str(sd["tok_embeddings.weight"].dtype).removeprefix("torch.")
    _write_json(out / "config.json", config)
    return out


# ==================================================================================== Meta
def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width Meta's `FeedForward` computes from `params.json` (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_fields(args: ModelArgs) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's rule gives exactly `args.ffn_hidden_dim`.

    The model's own fields when they do (every Meta shape); otherwise the first match of a small
    search: multipliers None, the width ratio rounded to 1..6 decimals, the exact ratio and the
    ratio half a unit up (with multiple_of 1 the last always matches), each with multiple_of
    `args.multiple_of`, then powers of two from 4096 down to 1, then the width itself.

    Raises:
        ConfigError: no pair within the bounds checkpoint readers accept (multiple_of <= 65536,
            0 < ffn_dim_multiplier <= 16) reproduces the width.
    """
    target = args.ffn_hidden_dim
    base = int(2 * (4 * args.dim) / 3)  # Meta's width before the multiplier and the rounding
    ratio = target / base
    multipliers: list[float | None] = [args.ffn_dim_multiplier, None]
    multipliers += [round(ratio, k) for k in range(1, 7)] + [ratio, (target + 0.5) / base]
    steps = [args.multiple_of, *(2**k for k in range(12, -1, -1)), target]
    for mult in multipliers:
        if mult is not None and not 0.0 < mult <= 16.0:
            continue
        for step in steps:
            if step <= 65536 and target % step == 0 and meta_ffn_hidden_dim(args.dim, step, mult) == target:
                return step, mult
    raise ConfigError(
        f"cannot write FFN width {target} (dim {args.dim}) as Meta's multiple_of/ffn_dim_multiplier; "
        "expected a width Meta's rule can produce"
    )


def meta_params(args: ModelArgs) -> dict[str, Any]:
    """The `params.json` Meta's code loads: only fields of its `ModelArgs` (llama/model.py: dim,
    n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier, norm_eps; Code
    Llama's adds rope_theta, written only when not 10000). Never max_seq_len / max_batch_size (Meta's
    `Llama.build` passes them itself: `ModelArgs(max_seq_len=..., max_batch_size=..., **params)`)
    nor hidden_dim: an explicit width is written as the multiple_of/ffn_dim_multiplier giving it.

    Raises:
        ConfigError: rope scaling (Meta's ModelArgs has no field for it), or an FFN width Meta's
            rule cannot express.
    """
    if args.rope_scaling is not None:
        raise ConfigError(
            f"Meta's params.json cannot express rope scaling ({args.rope_scaling.type}, factor "
            f"{args.rope_scaling.factor}); expected no rope_scaling, or export with export_hf/save_checkpoint"
        )
    multiple_of, multiplier = _meta_ffn_fields(args)
    params: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    params["vocab_size"] = args.vocab_size
    params["multiple_of"] = multiple_of
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = args.norm_eps
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    return params


def export_meta(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    args: ModelArgs,
    out_dir: Path | str,
    n_shards: int = 1,
    tokenizer_path: Path | str | None = None,
) -> Path:
    """Export Meta's layout: `params.json` + `consolidated.NN.pth`, split into `n_shards`
    model-parallel shards on Meta's dimensions (norms replicated in every shard).

    `params.json` holds only what Meta's `ModelArgs` accepts (see `meta_params`), so Meta's own
    `Llama.build` loads the folder; the context length is not stored (Meta passes it at build time,
    our loader then uses its default unless given `max_seq_len`).

    Raises:
        ConfigError: a split dimension (heads, KV heads, FFN width, vocabulary, dim) is not divisible
            by `n_shards`, rope scaling, or an FFN width Meta's rule cannot express.
    """
    params = meta_params(args)  # refuse before writing anything
    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}")
    for what, value in (
        ("n_heads", args.n_heads),
        ("n_kv_heads", args.kv_heads),
        ("FFN hidden size", args.ffn_hidden_dim),
        ("vocab_size", args.vocab_size),
        ("dim", args.dim),
    ):
        if value % n_shards != 0:
            raise ConfigError(f"cannot split into {n_shards} shards: {what} ({value}) is not divisible by it")
    out = _prepare_dir(out_dir)
    sd = _state_dict(model_or_state_dict)
    _check_complete(sd, args)
    shards: list[dict[str, Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        dim = keymaps.split_dim(name)
        pieces = [t] * n_shards if dim is None else list(torch.chunk(t, n_shards, dim=dim))
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.contiguous().clone()  # own storage: torch.save would save the whole base
    for i, shard in enumerate(shards):
        atomic_write(out / f"consolidated.{i:02d}.pth", functools.partial(_torch_save, shard))
    _copy_tokenizer(tokenizer_path, out)
    _write_json(out / "params.json", params)
    return out


def _torch_save(obj: dict[str, Tensor], path: Path) -> None:
    torch.save(obj, path)


# ================================================================================ llama2.c
def _serialize_fp32(f: IO[bytes], t: Tensor) -> None:
    f.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())


def export_llama2c(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    args: ModelArgs,
    out_path: Path | str,
    version: int = 1,
) -> Path:
    """Export a karpathy/llama2.c `.bin` file (float32), legacy `version=0` or `version=1`.

    llama2.c stores no norm_eps (it uses 1e-5) and no rope settings (theta 10000, no scaling).

    Raises:
        ConfigError: unknown version, or a shape llama2.c cannot represent (norm_eps != 1e-5,
            rope_theta != 10000, rope scaling).
    """
    if version not in (0, 1):
        raise ConfigError(f"llama2.c export version must be 0 or 1, got {version}")
    if args.norm_eps != 1e-5 or args.rope_theta != 10000.0 or args.rope_scaling is not None:
        raise ConfigError(
            "llama2.c files cannot store norm_eps/rope settings; expected norm_eps 1e-5, rope_theta 10000 "
            f"and no rope scaling, got norm_eps {args.norm_eps}, rope_theta {args.rope_theta}, "
            f"rope_scaling {args.rope_scaling}"
        )
    sd = _state_dict(model_or_state_dict)
    _check_complete(sd, args)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shared = torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    hd = args.head_dim
    # Rotary tables as llama2.c's model.py precomputes them: angle[t, j] = t * theta^(-2j/hd).
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))  # (hd/2,)
    angles = torch.outer(torch.arange(args.max_seq_len).float(), inv)  # (max_seq_len, hd/2)
    tables = {"freq_cis_real": torch.cos(angles), "freq_cis_imag": torch.sin(angles)}
    ints = (
        args.dim,
        args.ffn_hidden_dim,
        args.n_layers,
        args.n_heads,
        args.kv_heads,
        args.vocab_size if (shared or version == 1) else -args.vocab_size,
        args.max_seq_len,
    )
    order = keymaps.LLAMA2C_V0_ORDER if version == 0 else keymaps.LLAMA2C_V1_ORDER

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            if version == 0:
                f.write(struct.pack("<7i", *ints))
            else:
                f.write(struct.pack("<I", LLAMA2C_MAGIC))
                f.write(struct.pack("<i", 1))
                f.write(struct.pack("<7i", *ints))
                f.write(struct.pack("<B", int(shared)))
                f.write(b"\0" * (LLAMA2C_V1_HEADER_BYTES - f.tell()))
            for name in keymaps.expand(order, args.n_layers):
                if name == "output.weight" and shared:
                    continue
                _serialize_fp32(f, tables[name] if name in tables else sd[name])

    atomic_write(out, write)
    return out


__all__ = [
    "export_hf",
    "export_llama2c",
    "export_meta",
    "meta_ffn_hidden_dim",
    "meta_params",
    "save_checkpoint",
]
