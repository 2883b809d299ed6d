"""Build and load the C++ CPU kernels (`csrc/kernels.cpp`) on first use.

The extension is compiled with `torch.utils.cpp_extension.load` into a cache directory keyed by a
hash of the source, the torch version and the CPU's SIMD flags (default
`~/.cache/llama2/kernels/<key>`, or `$LLAMA2_KERNEL_CACHE/<key>`), so later processes only load
the shared library. It registers the torch custom ops `torch.ops.llama2_kernels.*`.
`LLAMA2_NO_KERNELS=1` in the environment at import time (or `set_kernels_disabled(True)`) disables
the kernels; a missing compiler or a failed build warns once and
the quantized layers fall back to their pure-torch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_NAMESPACE = "llama2_kernels"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _env_disabled() -> bool:
    return os.environ.get("LLAMA2_NO_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


# The per-forward check (`kernels_ready`) reads LLAMA2_NO_KERNELS once, at import: an os.environ
# lookup costs microseconds and runs for every layer of every token. `set_kernels_disabled`
# changes it at run time; `kernels_disabled()` also re-reads the environment.
_disabled = [_env_disabled()]


def set_kernels_disabled(disabled: bool) -> None:
    """Force (True) or allow (False) the pure-torch fallback for this process."""
    _disabled[0] = disabled


def kernels_disabled() -> bool:
    """True when the pure-torch fallback is forced (`LLAMA2_NO_KERNELS=1`, or
    `set_kernels_disabled(True)`)."""
    return _disabled[0] or _env_disabled()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return {"avx2", "fma", "f16c"}
    return set()


def compile_flags() -> list[str]:
    """Compiler flags for this CPU: AVX2 + FMA + F16C when all three are present."""
    flags = ["-O3", "-std=c++17", "-ffp-contract=off", *openmp_flags()]
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def openmp_flags() -> list[str]:
    """`-fopenmp` where torch's intra-op pool is OpenMP (its Linux wheels): at::parallel_for is
    inline header code whose `#pragma omp parallel` is dropped without it (the kernels then run on
    one thread). The extension then needs `libgomp.so.1`, the soname torch has already loaded, so
    both share one OpenMP runtime and thread pool."""
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def cache_dir(source: Path = _SOURCE, prefix: str = "") -> Path:
    """The build directory for `source` (default: the matmul kernels), this torch version and CPU."""
    root = os.environ.get("LLAMA2_KERNEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "llama2" / "kernels"
    key = hashlib.sha256(
        source.read_bytes() + torch.__version__.encode() + " ".join(compile_flags()).encode()
    ).hexdigest()[:16]
    return base / f"{prefix}{key}"


def build_extension(source: Path, namespace: str, prefix: str = "") -> None:
    """Compile (or load the cached build of) `source`, which registers `torch.ops.<namespace>.*`."""
    build_dir = cache_dir(source, prefix)
    name = f"{namespace}_{build_dir.name.removeprefix(prefix)}"
    built = build_dir / f"{name}.so"
    if built.is_file():  # the directory is keyed by source, torch and flags: load it directly
        torch.ops.load_library(str(built))  # type: ignore[no-untyped-call]
        return
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=compile_flags(),
        extra_ldflags=openmp_flags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def load_once(state: dict[str, bool], lock: threading.Lock, load: Callable[[], object], what: str) -> bool:
    """Run `load` once per process (thread-safe); on failure warn once and remember False.

    Returns False at once when `LLAMA2_NO_KERNELS` disables the kernels.
    """
    if kernels_disabled():
        return False
    if "ok" in state:
        return state["ok"]
    with lock:
        if "ok" not in state:
            try:
                load()
                state["ok"] = True
            except Exception as exc:  # any compiler/loader failure means "use the torch path"
                msg = str(exc).strip()
                warnings.warn(
                    f"llama2: could not build the {what} ({type(exc).__name__}: "
                    f"{msg.splitlines()[-1] if msg else ''}); using the slower pure-torch path. "
                    "Set LLAMA2_NO_KERNELS=1 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                state["ok"] = False
    return state["ok"]


def _register_fakes() -> None:
    """Shape functions so `torch.compile` (and meta tensors) can trace through the ops."""
    lib = f"{_NAMESPACE}::"

    def mv(x: torch.Tensor, w: torch.Tensor, *args: object) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    for name in (
        "q8_0_mv",
        "q4_0_mv",
        "q4_k_mv",
        "int8_mv",
        "int4_mv",
        "int8_q8_mv",
        "int4_q8_mv",
        "dense_mv",
    ):
        torch.library.register_fake(lib + name)(mv)

    def nf4_mv(x: torch.Tensor, packed: torch.Tensor, n: int, k: int, *args: object) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    torch.library.register_fake(lib + "nf4_mv")(nf4_mv)

    def gguf_dequant(w: torch.Tensor, qtype: int, row0: int, row1: int) -> torch.Tensor:
        block, nbytes = ((32, 34), (32, 18), (256, 144))[qtype]
        return w.new_empty(row1 - row0, w.shape[1] // nbytes * block, dtype=torch.float32)

    def int8_dequant(w: torch.Tensor, scales: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        return w.new_empty(row1 - row0, w.shape[1], dtype=torch.float32)

    def int4_dequant(w: torch.Tensor, sz: torch.Tensor, groupsize: int, row0: int, row1: int) -> torch.Tensor:
        return w.new_empty(row1 - row0, 2 * w.shape[1], dtype=torch.float32)

    def nf4_dequant(packed: torch.Tensor, n: int, k: int, *args: object) -> torch.Tensor:
        row0, row1 = args[-2], args[-1]
        if not isinstance(row0, int) or not isinstance(row1, int):
            raise TypeError("nf4_dequant: row0 and row1 must be ints")
        return packed.new_empty(row1 - row0, k, dtype=torch.float32)

    def dense_dequant(w: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
        return w.new_empty(row1 - row0, w.shape[1], dtype=torch.float32)

    torch.library.register_fake(lib + "gguf_dequant")(gguf_dequant)
    torch.library.register_fake(lib + "int8_dequant")(int8_dequant)
    torch.library.register_fake(lib + "int4_dequant")(int4_dequant)
    torch.library.register_fake(lib + "nf4_dequant")(nf4_dequant)
    torch.library.register_fake(lib + "dense_dequant")(dense_dequant)


def _build() -> None:
    build_extension(_SOURCE, _NAMESPACE)
    _register_fakes()


def kernels_available() -> bool:
    """Load (building on first use) the CPU kernels; False when disabled or the build failed.

    The first failure warns once per process and is remembered.
    """
    return load_once(_state, _lock, _build, "CPU quantization kernels")


def kernels_ready() -> bool:
    """The cheap per-call check: built (building on first use) and not disabled at import or by
    `set_kernels_disabled`."""
    if _disabled[0]:
        return False
    ok = _state.get("ok")
    return kernels_available() if ok is None else ok
