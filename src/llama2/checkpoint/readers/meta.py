"""Reader of Meta's layout: `params.json` + model-parallel shards `consolidated.NN.pth`.

Each shard holds a slice of every split tensor (fairscale's split dims, `keymaps.META_SPLIT_DIM`) and a
full copy of every replicated one (the norms). Checked here, before any weight is converted: every
shard holds the same tensors, with the same dtype, the same shape outside the split dimension, and
identical replicated tensors (a disagreement means the shards come from different models).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint, sniff
from llama2.checkpoint.pickles import torch_load
from llama2.checkpoint.readers.common import config_error, config_file
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.config import ModelArgs, read_json
from llama2.errors import CheckpointError, ConfigError


def read_meta(found: DetectedCheckpoint) -> CheckpointContents:
    params_file = config_file(found, "params.json")
    params = read_json(params_file)
    _check_shard_files(found)
    shards = [torch_load(f) for f in found.weight_files]
    files = found.weight_files
    first = shards[0]
    sources: list[TensorSource] = []
    for name in first:
        if keymaps.is_ignored(name, keymaps.META_IGNORED):
            continue
        try:
            dim = keymaps.split_dim(name)
        except KeyError:
            raise CheckpointError(
                f"{files[0]}: unexpected tensor {name!r}; not a Llama 2 parameter"
            ) from None
        parts: list[Tensor] = []
        for f, shard in zip(files, shards, strict=True):
            if name not in shard:
                raise CheckpointError(f"{f}: missing tensor {name!r} (present in shard {files[0].name})")
            parts.append(shard[name])
        shape = _merged_shape(name, parts, files, dim)
        sources.append(TensorSource(name, files[0], shape, parts[0].dtype, _merge_loader(parts, dim)))
    for f, shard in zip(files[1:], shards[1:], strict=True):
        for name in shard:
            if name not in first and not keymaps.is_ignored(name, keymaps.META_IGNORED):
                raise CheckpointError(f"{f}: unexpected tensor {name!r} (absent from shard {files[0].name})")
    emb = next((s for s in sources if s.name == "tok_embeddings.weight"), None)
    vocab = emb.shape[0] if emb is not None and params.get("vocab_size", -1) in (-1, None) else None
    if vocab is None and params.get("vocab_size", -1) in (-1, None):
        raise CheckpointError(
            f"{files[0]}: missing tensor 'tok_embeddings.weight' (needed for vocab_size -1)"
        )
    try:
        args = ModelArgs.from_params_json(params, vocab_size=vocab)
    except ConfigError as e:
        raise config_error(params_file, e) from None
    return CheckpointContents(CheckpointFormat.META, args, sources, files, found.root)


def _check_shard_files(found: DetectedCheckpoint) -> None:
    """Meta's layout names its shards `consolidated.NN.pth`: one the detection skipped (its bytes are not
    a PyTorch file) is damaged, and loading the others would fail later with a misleading shape error.
    Several shards named like Meta's must be ranks 0..N-1 in order (detection checks the names; this
    holds for any caller); unnumbered ones are in sorted order, as Meta's loader takes them."""
    if len(found.weight_files) == 1 and found.weight_files[0].parent != found.root:
        return
    for f in sorted(found.root.glob("consolidated.*.pth")):
        if f.is_file() and f not in found.weight_files:
            raise CheckpointError(
                f"{f}: not a PyTorch file (it looks like {sniff(f)}); expected a Meta model-parallel "
                "shard written by torch.save, like the other consolidated.*.pth files"
            )
    numbered = any(f.name.startswith("consolidated.") for f in found.weight_files)
    if len(found.weight_files) > 1 and numbered:  # Meta's names: rank r is consolidated.{r:02d}.pth
        for rank, f in enumerate(found.weight_files):
            if f.name != f"consolidated.{rank:02d}.pth":
                raise CheckpointError(
                    f"{f}: shard {rank} of {len(found.weight_files)} is named {f.name}; expected "
                    f"consolidated.{rank:02d}.pth (Meta's shards are consolidated.00.pth .. "
                    f"consolidated.{len(found.weight_files) - 1:02d}.pth, with no gap)"
                )


def _merged_shape(
    name: str, parts: list[Tensor], files: tuple[Path, ...], dim: int | None
) -> tuple[int, ...]:
    """The shape of `name` once its shards are merged; refuses shards that do not fit together."""
    ref, ref_file = parts[0], files[0].name
    for f, p in zip(files, parts, strict=True):
        if p.dtype != ref.dtype:
            raise CheckpointError(
                f"{f}: tensor {name!r} has dtype {p.dtype}, but {ref.dtype} in shard {ref_file}; "
                "expected the same dtype in every shard"
            )
    if dim is None:  # replicated: every shard must hold the same tensor
        for f, p in zip(files[1:], parts[1:], strict=True):
            if not _identical(ref, p):
                raise CheckpointError(
                    f"{f}: tensor {name!r} differs from its copy in shard {ref_file} "
                    f"(shapes {list(p.shape)} and {list(ref.shape)}); Meta replicates it on every "
                    "model-parallel shard, so expected identical copies (are the shards from one model?)"
                )
        return tuple(ref.shape)
    shape = list(ref.shape)
    for f, p in zip(files, parts, strict=True):
        if p.dim() != 2 or any(p.shape[i] != shape[i] for i in range(2) if i != dim):
            raise CheckpointError(
                f"{f}: tensor {name!r} has shape {list(p.shape)}; expected a matrix matching shard "
                f"{ref_file}'s {shape} outside split dim {dim}"
            )
    shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)


def _identical(a: Tensor, b: Tensor) -> bool:
    """`torch.equal`, except that NaNs in the same places count as equal (so that a NaN norm carried by
    every shard is reported as NaN by the loader, not as a disagreement between shards)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _merge_loader(parts: list[Tensor], dim: int | None) -> Callable[[], Tensor]:
    def load() -> Tensor:
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)  # one merged copy; the shards stay memory-mapped

    return load
