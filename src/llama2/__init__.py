"""llama2: the Llama 2 system end to end."""

from llama2.config import PRESETS, ModelArgs, RopeScaling
from llama2.errors import (
    CheckpointError,
    ConfigError,
    DialogError,
    GenerationError,
    Llama2Error,
    TokenizerError,
    UnsafeCheckpointError,
)

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DialogError",
    "GenerationError",
    "Llama2Error",
    "ModelArgs",
    "RopeScaling",
    "TokenizerError",
    "UnsafeCheckpointError",
]
__version__ = "0.1.0"
