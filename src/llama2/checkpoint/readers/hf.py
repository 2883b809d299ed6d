"""Reader of Hugging Face `LlamaForCausalLM` checkpoints: `config.json` + `*.safetensors` or
`pytorch_model*.bin` (loaded by `llama2.checkpoint.pickles.torch_load`), HF names, permuted q/k."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from llama2.checkpoint import keymaps
from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint, FileKind, sniff
from llama2.checkpoint.pickles import torch_load
from llama2.checkpoint.readers.common import SafetensorsFile, config_error, config_file
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.config import ModelArgs, read_json
from llama2.errors import CheckpointError, ConfigError

_RawTensor = tuple[Path, str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]


def _tensor_iter(found: DetectedCheckpoint) -> Iterator[_RawTensor]:
    """(file, stored name, shape, dtype, loader) of every tensor in the checkpoint's weight files."""
    for f in found.weight_files:
        if sniff(f) is FileKind.SAFETENSORS:
            st = SafetensorsFile(f)
            for name in st.names():
                yield f, name, st.shape(name), st.dtype(name), functools.partial(st.get, name)
        else:
            sd = torch_load(f)
            for name, t in sd.items():
                yield f, name, tuple(t.shape), t.dtype, functools.partial(_identity, t)


def _identity(t: Tensor) -> Tensor:
    return t


def read_hf(found: DetectedCheckpoint) -> CheckpointContents:
    config_path = config_file(found, "config.json")
    config = read_json(config_path)
    try:
        args = ModelArgs.from_hf_config(config)
    except ConfigError as e:
        raise config_error(config_path, e) from None
    sources: list[TensorSource] = []
    metadata: dict[str, str] = {}
    if found.file_kind is FileKind.SAFETENSORS:
        metadata = SafetensorsFile(found.weight_files[0]).metadata
    for f, hf_name, shape, dtype, loader in _tensor_iter(found):
        if keymaps.is_ignored(hf_name, keymaps.HF_IGNORED):
            continue
        name = keymaps.rename(hf_name, keymaps.HF_TO_META)
        if name is None:
            raise CheckpointError(f"{f}: unexpected tensor {hf_name!r}; not a LlamaForCausalLM parameter")
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args.n_heads if name.endswith("wq.weight") else args.kv_heads
            loader = _permuted(loader, heads)
        sources.append(TensorSource(name, f, shape, dtype, loader))
    return CheckpointContents(CheckpointFormat.HF, args, sources, found.weight_files, found.root, metadata)


def _permuted(loader: Callable[[], Tensor], n_heads: int) -> Callable[[], Tensor]:
    def load() -> Tensor:
        return keymaps.hf_to_meta_qk(loader(), n_heads).contiguous()

    return load
