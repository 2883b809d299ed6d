"""Checkpoints: detect a format from file contents, load any supported layout into a `Transformer`,
and write ours or export to Hugging Face, Meta and llama2.c layouts."""

from llama2.checkpoint.formats import CheckpointFormat, DetectedCheckpoint, detect, detect_format
from llama2.checkpoint.load import (
    CheckpointContents,
    LoadedModel,
    TensorSource,
    load_model,
    read_checkpoint,
)
from llama2.checkpoint.save import export_hf, export_llama2c, export_meta, save_checkpoint

__all__ = [
    "CheckpointContents",
    "CheckpointFormat",
    "DetectedCheckpoint",
    "LoadedModel",
    "TensorSource",
    "detect",
    "detect_format",
    "export_hf",
    "export_llama2c",
    "export_meta",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
]
