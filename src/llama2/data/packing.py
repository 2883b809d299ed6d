"""Fixed-length training sequences from a token file, a by-document train/validation split, and a
resumable shuffled batch sampler.

Packing: the documents of a split (each `[BOS] ... [EOS]`) are read as one stream; window `i` is the
`seq_len + 1` tokens starting at `i * seq_len`, giving `inputs = window[:-1]`, `targets = window[1:]`.
Consecutive windows overlap by one token so every stream token except the first is a target exactly
once; the tail shorter than a full window is dropped. Windows may span document boundaries
(the BOS/EOS tokens mark them), as in Llama 2's pretraining.

Split: `split_documents(n_docs, val_fraction, seed)` holds out `max(1, round(val_fraction * n_docs))`
documents chosen by a seeded permutation (0 when `val_fraction` is 0) — deterministic for a given
file and seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llama2.data.corpus import InMemoryTokens, TokenFile
from llama2.errors import ConfigError


def split_documents(n_docs: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Return sorted (train_doc_ids, val_doc_ids)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_val >= n_docs and n_docs > 0:
        raise ConfigError(
            f"val_fraction {val_fraction} holds out all {n_docs} documents; expected some left for training"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    val = sorted(int(i) for i in perm[:n_val])
    val_set = set(val)
    return [i for i in range(n_docs) if i not in val_set], val


class PackedSequences:
    """Fixed-length (inputs, targets) windows over a subset of a token file's documents.

    `dataset[i]` -> (inputs (seq_len,), targets (seq_len,)) int64 tensors.
    """

    def __init__(
        self, token_file: TokenFile | InMemoryTokens, seq_len: int, docs: Sequence[int] | None = None
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len must be positive, got {seq_len}")
        self.token_file = token_file
        self.seq_len = seq_len
        doc_ids = list(range(token_file.n_docs)) if docs is None else sorted(docs)
        offs = token_file.doc_offsets
        runs: list[list[int]] = []  # merged contiguous [start, end) token ranges
        for d in doc_ids:
            a, b = int(offs[d]), int(offs[d + 1])
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        self.runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)  # (R, 2)
        lengths = self.runs[:, 1] - self.runs[:, 0]
        self.run_starts = np.concatenate([[0], np.cumsum(lengths)])  # (R+1,) stream offsets
        self.n_stream_tokens = int(self.run_starts[-1])
        self.n_windows = max(0, (self.n_stream_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        """The `seq_len + 1` stream tokens of window `i` as int64."""
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range (0..{self.n_windows - 1})")
        start, end = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        r = int(np.searchsorted(self.run_starts, start, side="right")) - 1
        parts = []
        pos = start
        while pos < end:
            run_off = pos - int(self.run_starts[r])
            a = int(self.runs[r, 0]) + run_off
            take = min(end - pos, int(self.runs[r, 1]) - a)
            parts.append(self.token_file.tokens[a : a + take])
            pos += take
            r += 1
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        w = torch.from_numpy(self.window(i))  # (seq_len + 1,)
        return w[:-1], w[1:]

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))  # (B, seq_len + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class PackedBatches:
    """Endless shuffled batches of windows; resumable (`state_dict`/`load_state_dict`).

    Each epoch visits every window once in the order of `np.random.default_rng([seed, epoch])`'s
    permutation; batches never straddle epochs (the last incomplete batch of an epoch is skipped).
    """

    def __init__(
        self, dataset: PackedSequences, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) < batch_size:
            raise ConfigError(
                f"the training split has {len(dataset)} windows of {dataset.seq_len + 1} tokens, fewer than "
                f"batch_size {batch_size}; expected more data or a smaller batch/seq_len"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # batches taken in this epoch
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.dataset)
            self._order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
        return self._order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
            self._order = None
        order = self._epoch_order()
        idx = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return self.dataset.batch(idx.tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_windows": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n_windows"]) != len(self.dataset) or int(state["seed"]) != self.seed:
            raise ConfigError(
                f"saved data position is for {state['n_windows']} windows / seed {state['seed']}, but the "
                f"data now has {len(self.dataset)} windows / seed {self.seed}; expected the same data"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = None


class SequentialBatches:
    """Re-iterable batches of windows in order (validation); the last batch may be smaller."""

    def __init__(self, dataset: PackedSequences, batch_size: int) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.dataset)
        for a in range(0, n, self.batch_size):
            yield self.dataset.batch(range(a, min(n, a + self.batch_size)))
