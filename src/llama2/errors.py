"""Exceptions users can cause. Each message says what was wrong and what was expected."""

from __future__ import annotations


class Llama2Error(Exception):
    """Base class of every error this package raises on bad user input."""


class ConfigError(Llama2Error, ValueError):
    """A model configuration or preset is invalid."""


class CheckpointError(Llama2Error):
    """A checkpoint cannot be read: unknown format, missing/truncated file, missing tensor, bad shape."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file tried to unpickle something other than plain tensors."""


class TokenizerError(Llama2Error):
    """A tokenizer file is missing or malformed, or a token id is out of range."""


class DialogError(Llama2Error, ValueError):
    """A chat dialog is malformed (role order, empty content, injected special tags)."""


class GenerationError(Llama2Error, ValueError):
    """Generation parameters are invalid (e.g. prompt longer than the context window)."""


class OutOfMemoryError(Llama2Error):
    """A model, its KV cache and activations will not fit in the memory available on the device."""


class GGUFFormatError(Llama2Error, ValueError):
    """A file is not a readable GGUF file (bad magic, unsupported version, truncated, corrupt)."""


class EngineOverloadedError(Llama2Error):
    """The engine's waiting queue is full; the client should retry later (the server answers 429)."""


class EngineClosedError(Llama2Error):
    """The engine is shutting down and takes no new sequences (the server answers 503)."""
