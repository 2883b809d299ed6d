"""Process-wide runtime settings for inference: CPU threads.

PyTorch's default intra-op thread count is the number of logical CPUs. For memory-bound decode
on CPUs with simultaneous multithreading, two hyperthreads of one core share its load/store units
and caches, so one thread per physical core is as fast or faster and leaves the siblings idle.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from llama2.errors import ConfigError

# Environment variables through which a user chooses the thread count themselves.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LLAMA2_NUM_THREADS")

_configured = False  # set by the first configure_threads call that chose a count


def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyperthread siblings counted once).

    Reads Linux's sysfs topology for the CPUs in the process's affinity mask; elsewhere (or when
    it cannot be read) falls back to the logical CPU count.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count for inference and return it.

    Args:
        n: threads to use. None: one per physical core (`physical_cores()`), unless the user
            already chose: one of `THREAD_ENV_VARS` is set (LLAMA2_NUM_THREADS is applied; OMP/MKL
            ones are left to torch, which read them at start-up), or `torch.set_num_threads` was
            called with a count other than torch's default.

    Returns:
        The intra-op thread count now in effect.

    Raises:
        ConfigError: `n` (or LLAMA2_NUM_THREADS) is not a positive integer.
    """
    global _configured
    if n is None:
        env = os.environ.get("LLAMA2_NUM_THREADS")
        if env is not None:
            try:
                n = int(env)
            except ValueError:
                raise ConfigError(f"LLAMA2_NUM_THREADS must be a positive integer, got {env!r}") from None
        elif any(os.environ.get(v) for v in THREAD_ENV_VARS) or _user_set_threads():
            return torch.get_num_threads()
        else:
            n = physical_cores()
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"thread count must be a positive integer, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _configured = True
    return n


def _user_set_threads() -> bool:
    """True when someone other than `configure_threads` changed torch's default thread count.

    Torch's default is the logical CPU count (OpenMP) or, in some builds, the physical one; any
    other value was chosen by the user.
    """
    if _configured:
        return False
    logical = os.cpu_count() or 1
    with contextlib.suppress(AttributeError, OSError):
        logical = len(os.sched_getaffinity(0))
    return torch.get_num_threads() not in (logical, physical_cores())


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str) -> torch.device:
    """The torch device `name` names, checked to exist in this torch build and on this machine.

    Args:
        name: `auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`, `mps`, `xpu`, `xpu:N`.

    Raises:
        ConfigError: `name` is not a device, or this build/machine lacks it (e.g. `cuda` on a
            CPU-only torch, `cuda:3` with two GPUs, `mps` off Apple silicon) — one line, never a
            failure later inside torch.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {name!r}; {expected}") from None
    if device.type not in _DEVICE_TYPES:
        raise ConfigError(f"device {name!r} cannot run a model; {expected}")
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ConfigError(
                f"device {name!r} is not available: this torch build ({torch.__version__}) has no CUDA "
                "support; use --device cpu or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r} is not available: no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name!r} is not available: this machine has {count} CUDA GPU(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, "xpu", None)
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise ConfigError(
            f"device {name!r} is not available in this torch build or on this machine; use --device cpu"
        )
    return device
