"""Models embedded in the package (`assets/models/<name>/`) and how the CLI finds them.

The folders are produced by the project's training stages: `base` (pretrained), `chat` (fine-tuned
for the Llama 2-Chat format) and `code` (Code Llama-style, with infilling pieces). Each is a checkpoint
folder in our format (`params.json`, `model.safetensors`, `tokenizer.model`).
"""

from __future__ import annotations

from pathlib import Path

from llama2.errors import CheckpointError

MODELS_DIR = Path(__file__).resolve().parent / "models"
EMBEDDED_MODELS: tuple[str, ...] = ("base", "chat", "code")


def embedded_model_dir(name: str) -> Path:
    """The folder an embedded model lives in (it may not exist yet)."""
    return MODELS_DIR / name


def resolve_model(name_or_path: str | Path) -> Path:
    """Turn a `--model` value into a checkpoint path.

    An existing file or folder wins; otherwise a name from `EMBEDDED_MODELS` means that embedded
    model's folder.

    Args:
        name_or_path: a checkpoint path or the name of an embedded model (`base`, `chat`, `code`).

    Returns:
        The checkpoint path.

    Raises:
        CheckpointError: the path does not exist and is not an embedded model's name, or the named
            embedded model is not installed.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        folder = embedded_model_dir(name)
        if folder.is_dir() and any(folder.iterdir()):
            return folder
        raise CheckpointError(
            f"embedded model {name!r} is not installed (expected a checkpoint in {folder}); "
            "train it first or pass --model PATH to a checkpoint"
        )
    raise CheckpointError(
        f"model {name!r} not found: no such file or folder, and not an embedded model "
        f"(expected a checkpoint path or one of {', '.join(EMBEDDED_MODELS)})"
    )
