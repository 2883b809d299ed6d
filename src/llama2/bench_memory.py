"""`llama2 bench`'s memory measurements: the process's resident memory, a model's weight bytes and the
bytes a decode step reads, and the machine's memory read bandwidth (for the decode ceiling)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llama2.errors import ConfigError
from llama2.model import Transformer
from llama2.model.kv_cache import KVCache


def peak_rss_bytes() -> int:
    """The process's peak resident set size (`VmHWM` in /proc/self/status), 0 where unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss_bytes() -> int:
    """The process's current resident set size (`VmRSS`), 0 where unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset `VmHWM` to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _is_cache_tensor(module: nn.Module) -> bool:
    return isinstance(module, KVCache)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, KV caches excluded (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if _is_cache_tensor(module):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def bytes_per_token(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything except the embedding table, plus one row of it."""
    emb = model.tok_embeddings.weight
    emb_bytes = emb.numel() * emb.element_size()
    row = emb.shape[1] * emb.element_size()
    return weight_bytes(model) - emb_bytes + row


# --------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(
    size_bytes: int = 1 << 30, reps: int = 7, threads: int | None = None
) -> tuple[float, list[float]]:
    """Memory read bandwidth in GB/s (1e9 bytes/s): median over `reps` `torch.sum` passes of a buffer.

    The buffer (float32, default 1 GiB) is far larger than the caches, so each sum streams it from
    DRAM; one untimed pass first faults the pages in.

    Args:
        size_bytes: buffer size.
        reps: timed passes.
        threads: torch intra-op threads to use (default: the current setting); restored afterwards.

    Returns:
        (median GB/s, every pass's GB/s).
    """
    if size_bytes < 4 or reps < 1:
        raise ConfigError(f"bandwidth needs size_bytes >= 4 and reps >= 1, got {size_bytes}, {reps}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_bytes // 4, dtype=torch.float32)
        torch.sum(buf)
        rates: list[float] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.sum(buf)
            rates.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        del buf
    finally:
        torch.set_num_threads(old)
    return statistics.median(rates), rates


__all__ = [
    "bytes_per_token",
    "current_rss_bytes",
    "measure_bandwidth",
    "peak_rss_bytes",
    "reset_peak_rss",
    "weight_bytes",
]
