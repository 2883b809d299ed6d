"""Every exception class the package defines is a `Llama2Error` defined in `llama2.errors`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import llama2
from llama2 import errors
from llama2.errors import Llama2Error

# Pure internal control flow: raised and caught inside one function, never seen by a caller.
INTERNAL = {
    # raised by the JSON object hook to stop parsing an oversized header; caught by the same reader
    "llama2.checkpoint.safetensors_header._TooMany",
    # raised by the opcode scan on a malformed pickle; turned into an UnsafeCheckpointError there
    "llama2.checkpoint.pickles._CorruptPickle",
    # the HTTP layer's carrier of an OpenAI error body and status; answered by the app's handler,
    # never raised to library callers. As a Llama2Error, the `except Llama2Error -> 400` wrappers
    # around request preparation would catch it and answer 400 instead of its own status.
    "llama2.serve.http_errors.APIError",
}
# Names a caller may import from the module they used to live in (aliases of the errors.py class).
MOVED = {
    ("llama2.gguf_header", "GGUFFormatError"),
    ("llama2.gguf_vocab", "GGUFFormatError"),
    ("llama2.serve.async_engine", "EngineOverloadedError"),
    ("llama2.serve.async_engine", "EngineClosedError"),
    ("llama2.serve.scheduler", "EngineOverloadedError"),
    ("llama2.serve.scheduler", "EngineClosedError"),
}


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(llama2.__path__, "llama2."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            ours = inspect.isclass(obj) and obj.__module__.startswith("llama2")
            if ours and issubclass(obj, BaseException):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_library_error_is_a_llama2_error_defined_in_errors() -> None:
    found = _exception_classes()
    assert "llama2.errors.ConfigError" in found and len(found) > 8  # the walk reached the package
    wrong = {
        name: [b.__name__ for b in cls.__mro__]
        for name, cls in found.items()
        if name not in INTERNAL and not (cls.__module__ == "llama2.errors" and issubclass(cls, Llama2Error))
    }
    assert not wrong, f"define these in llama2/errors.py as Llama2Error subclasses: {wrong}"
    assert set(found) >= INTERNAL, "an INTERNAL entry no longer exists: drop it from the list"


def test_moved_errors_stay_importable_from_their_old_modules() -> None:
    for module, name in sorted(MOVED):
        assert getattr(importlib.import_module(module), name) is getattr(errors, name), (module, name)
    assert issubclass(errors.GGUFFormatError, ValueError)  # `except ValueError` callers keep working
