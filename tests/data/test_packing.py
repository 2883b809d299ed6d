"""Packing into fixed-length windows, the by-document split, and the resumable sampler."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from llama2.data.corpus import InMemoryTokens, build_token_file
from llama2.data.packing import PackedBatches, PackedSequences, SequentialBatches, split_documents
from llama2.errors import ConfigError

if TYPE_CHECKING:
    from conftest import PtCorpus


def _docs() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, 50, size=int(n)).tolist(), 2] for n in rng.integers(5, 40, size=10)]


def test_windows_are_the_shifted_stream_of_the_chosen_docs() -> None:
    docs = _docs()
    toks = InMemoryTokens(docs, vocab_size=50)
    chosen = [0, 1, 4, 7, 8, 9]  # three contiguous runs
    ds = PackedSequences(toks, seq_len=16, docs=chosen)
    stream = np.concatenate([docs[d] for d in chosen])
    assert ds.n_stream_tokens == len(stream)
    assert len(ds) == (len(stream) - 1) // 16
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.int64 and x.shape == (16,)
        assert x.tolist() == stream[i * 16 : i * 16 + 16].tolist()
        assert y.tolist() == stream[i * 16 + 1 : i * 16 + 17].tolist()
    xb, yb = ds.batch([2, 0])
    assert xb.shape == (2, 16) and xb[1].tolist() == ds[0][0].tolist() and yb[0].tolist() == ds[2][1].tolist()
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert targets.tolist() == stream[1 : 1 + 16 * len(ds)].tolist()  # each target exactly once


def test_split_is_deterministic_disjoint_and_sized() -> None:
    train, val = split_documents(100, 0.05, seed=3)
    assert len(val) == 5 and sorted(train + val) == list(range(100))
    assert split_documents(100, 0.05, seed=3) == (train, val)
    assert split_documents(100, 0.05, seed=4)[1] != val
    assert split_documents(10, 0.01, seed=0)[1].__len__() == 1  # at least one held out
    assert split_documents(10, 0.0) == (list(range(10)), [])
    with pytest.raises(ConfigError):
        split_documents(1, 0.5)
    with pytest.raises(ConfigError):
        split_documents(10, 1.0)


def test_batches_resume_exactly_and_cover_each_epoch() -> None:
    ds = PackedSequences(InMemoryTokens(_docs(), 50), seq_len=8)
    a = PackedBatches(ds, batch_size=4, seed=7)
    per_epoch = len(ds) // 4
    first_epoch = [next(a) for _ in range(per_epoch)]
    seen = torch.cat([x for x, _ in first_epoch])
    windows = {tuple(ds[i][0].tolist()) for i in range(len(ds))}
    assert (
        len({tuple(r) for r in seen.tolist()}) == 4 * per_epoch
        and {tuple(r) for r in seen.tolist()} <= windows
    )
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(per_epoch + 2)]  # crosses into the next epoch
    b = PackedBatches(ds, batch_size=4, seed=7)
    b.load_state_dict(state)
    got = [next(b) for _ in range(per_epoch + 2)]
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ConfigError, match="same data"):
        PackedBatches(ds, batch_size=4, seed=8).load_state_dict(state)


def test_sequential_batches_reiterate(pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path) -> None:
    tf = build_token_file([str(pt_corpus.folder)], pt_tokenizer, tmp_path / "t.bin")
    ds = PackedSequences(tf, seq_len=32, docs=[0, 1, 2])
    val = SequentialBatches(ds, batch_size=3)
    once = [x for x, _ in val]
    twice = [x for x, _ in val]
    assert len(once) == len(val) == -(-len(ds) // 3)
    assert all(torch.equal(a, b) for a, b in zip(once, twice, strict=True))
    assert sum(x.shape[0] for x in once) == len(ds)
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        PackedBatches(PackedSequences(tf, seq_len=10_000), batch_size=2)
