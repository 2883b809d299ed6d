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
    "Llama",
    "Llama2Error",
    "ModelArgs",
    "RopeScaling",
    "TokenizerError",
    "UnsafeCheckpointError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `from llama2 import Llama` without importing torch for `import llama2` alone.
    if name == "Llama":
        from llama2.api import Llama

        return Llama
    raise AttributeError(f"module 'llama2' has no attribute {name!r}")
