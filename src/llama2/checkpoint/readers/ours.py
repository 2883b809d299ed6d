"""Reader of our own layout: `params.json` (with "format": "llama2") + `model*.safetensors`, Meta names."""

from __future__ import annotations

import functools

from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint
from llama2.checkpoint.readers.common import SafetensorsFile, config_error, config_file
from llama2.checkpoint.source import CheckpointContents, TensorSource
from llama2.config import ModelArgs, read_json
from llama2.errors import ConfigError


def read_ours(found: DetectedCheckpoint) -> CheckpointContents:
    params_file = config_file(found, "params.json")
    params = read_json(params_file)
    try:
        args = ModelArgs.from_params_json(params)
    except ConfigError as e:
        raise config_error(params_file, e) from None
    sources: list[TensorSource] = []
    metadata: dict[str, str] = {}
    for f in found.weight_files:
        st = SafetensorsFile(f)
        metadata.update(st.metadata)
        for name in st.names():
            loader = functools.partial(st.get, name)
            sources.append(TensorSource(name, f, st.shape(name), st.dtype(name), loader))
    return CheckpointContents(
        CheckpointFormat.LLAMA2, args, sources, found.weight_files, found.root, metadata
    )
