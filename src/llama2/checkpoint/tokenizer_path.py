"""Where a checkpoint's tokenizer is: the one rule every loader, exporter, evaluator and server uses.

In order:
1. a tokenizer the caller names explicitly wins (it must exist);
2. a GGUF checkpoint carries its own vocabulary: the GGUF file itself is the tokenizer;
3. `tokenizer.model` in the checkpoint's folder (ours, Hugging Face, llama2.c, embedded models);
4. for Meta's layout only, `tokenizer.model` in the parent folder: Meta's download puts it beside the
   model folders (`llama/tokenizer.model`, `llama/llama-2-7b/params.json`).

A checkpoint that is not on disk (a model in memory: no files) has no tokenizer beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llama2.checkpoint.formats import CheckpointFormat
from llama2.errors import ConfigError, TokenizerError
from llama2.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


def tokenizer_candidates(root: Path, files: Sequence[Path], fmt: CheckpointFormat | str) -> list[Path]:
    """The places looked at, in order (rules 2-4 of the module docstring); empty when not on disk."""
    if not files:
        return []
    if fmt == CheckpointFormat.GGUF:  # the vocabulary travels inside the file
        return [Path(files[0])]
    candidates = [root / TOKENIZER_FILE]
    if fmt == CheckpointFormat.META:  # Meta's download puts it beside the model folders
        candidates.append(root.parent / TOKENIZER_FILE)
    return candidates


def find_tokenizer(
    root: Path,
    files: Sequence[Path],
    fmt: CheckpointFormat | str,
    explicit: Path | str | None = None,
) -> Path | None:
    """The tokenizer of a checkpoint, by the module's rules.

    Args:
        root: the checkpoint's folder (`CheckpointContents.root`).
        files: its weight files (`CheckpointContents.files`); empty for a model held in memory.
        fmt: its format.
        explicit: a tokenizer the caller named (`--tokenizer`, `tokenizer_path`); it wins.

    Returns:
        The tokenizer file (a `tokenizer.model` or the GGUF file), or None when none is found.

    Raises:
        TokenizerError: `explicit` is given but is not a file.
    """
    if explicit is not None:
        return _existing(explicit)
    return next((c for c in tokenizer_candidates(root, files, fmt) if c.is_file()), None)


def require_tokenizer(found: Path | None, explicit: Path | str | None, model: object, hint: str) -> Path:
    """`explicit` if given, else the tokenizer found with the checkpoint, else a clear error.

    Args:
        found: what `find_tokenizer` gave for the checkpoint (`LoadedModel.tokenizer_path`).
        explicit: a tokenizer the caller named; it wins over `found`.
        model: the checkpoint (path or embedded name), for the message.
        hint: how this caller's user passes a tokenizer, e.g. "pass --tokenizer PATH".

    Returns:
        The tokenizer file.

    Raises:
        TokenizerError: `explicit` is not a file, or it is None and nothing was found.
    """
    if explicit is not None:
        return _existing(explicit)
    if found is None:
        raise TokenizerError(
            f"no {TOKENIZER_FILE} found with the checkpoint {model} (looked beside the weights, and "
            f"for Meta's layout in the parent folder; a GGUF file carries its own); {hint}"
        )
    return found


def model_tokenizer(
    found: Path | None, explicit: Path | str | None, model: object, hint: str, vocab_size: int
) -> tuple[Tokenizer, Path]:
    """The tokenizer of a model to train or sample (`require_tokenizer`), loaded, with its size checked.

    Raises:
        TokenizerError: as `require_tokenizer`.
        ConfigError: the tokenizer's pieces are not the model's vocabulary (another model's tokenizer).
    """
    path = require_tokenizer(found, explicit, model, hint)
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(
            f"tokenizer {path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
            f"{vocab_size}; expected the model's own tokenizer"
        )
    return tokenizer, path


def _existing(path: Path | str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(
            f"tokenizer file {p} does not exist; expected a SentencePiece {TOKENIZER_FILE} or a GGUF file"
        )
    return p
