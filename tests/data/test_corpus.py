"""Token files: round trip against SentencePiece, header fields, reuse and rebuild, uint32 ids."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import sentencepiece as spm

import llama2.data.corpus as corpus
from llama2.data.corpus import (
    HEADER_SIZE,
    MAGIC,
    TokenFile,
    build_token_file,
    resolve_sources,
    tokenize_documents,
)
from llama2.errors import ConfigError

if TYPE_CHECKING:
    from conftest import PtCorpus


def _all_docs(pt_corpus: PtCorpus) -> list[str]:
    return list(pt_corpus.texts)


def test_round_trip_and_ids_match_sentencepiece(
    pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path
) -> None:
    sources = [str(pt_corpus.folder), str(pt_corpus.jsonl)]
    tf = build_token_file(sources, pt_tokenizer, tmp_path / "tok.bin")
    docs = _all_docs(pt_corpus) + list(pt_corpus.jsonl_texts)
    sp = spm.SentencePieceProcessor(model_file=str(pt_tokenizer))
    assert tf.n_docs == len(docs) == 16
    assert tf.tokens.dtype == np.uint16
    for i, doc in enumerate(docs):
        ids = tf.document(i).tolist()
        assert ids == [sp.bos_id(), *sp.encode(doc), sp.eos_id()]
        assert sp.decode(ids[1:-1]) == doc
    assert len(tf) == sum(len(sp.encode(d)) + 2 for d in docs)


def test_header_layout(pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path) -> None:
    path = tmp_path / "tok.bin"
    tf = build_token_file([str(pt_corpus.folder)], pt_tokenizer, path)
    raw = path.read_bytes()
    magic, version, width, vocab, _, n_tok, n_docs = struct.unpack("<8sIIIIQQ", raw[:40])
    assert (magic, version, width, vocab) == (MAGIC, 1, 2, 320)
    assert (n_tok, n_docs) == (len(tf), 12)
    assert len(raw) == HEADER_SIZE + 2 * n_tok + 8 * (n_docs + 1)
    offsets = np.frombuffer(raw[HEADER_SIZE + 2 * n_tok :], dtype="<u8")
    assert offsets[0] == 0 and offsets[-1] == n_tok
    toks = np.frombuffer(raw[HEADER_SIZE : HEADER_SIZE + 2 * n_tok], dtype="<u2")
    assert (toks[offsets[:-1]] == 1).all() and (toks[offsets[1:] - 1] == 2).all()  # BOS ... EOS


def test_reuse_and_rebuild(pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(_all_docs(pt_corpus)[:3]):
        (src / f"{i}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "tok.bin"
    build_token_file([str(src)], pt_tokenizer, out)
    first = out.stat()
    build_token_file([str(src)], pt_tokenizer, out)
    assert out.stat().st_mtime_ns == first.st_mtime_ns and out.stat().st_ino == first.st_ino  # reused

    (src / "1.txt").write_text("a changed document\n", encoding="utf-8")
    tf = build_token_file([str(src)], pt_tokenizer, out)
    assert out.stat().st_ino != first.st_ino  # rebuilt
    sp = spm.SentencePieceProcessor(model_file=str(pt_tokenizer))
    assert sp.decode(tf.document(1).tolist()[1:-1]) == "a changed document\n"

    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(pt_tokenizer.read_bytes() + b"")  # same bytes: still reused
    second = out.stat()
    build_token_file([str(src)], other_tok, out)
    assert out.stat().st_ino == second.st_ino


def test_tokenizer_change_rebuilds(
    pt_corpus: PtCorpus, pt_tokenizer: Path, llama2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tok.bin"
    a = build_token_file([str(pt_corpus.jsonl)], pt_tokenizer, out)
    assert a.vocab_size == 320
    b = build_token_file([str(pt_corpus.jsonl)], llama2_tokenizer_dir / "tokenizer.model", out)
    assert b.vocab_size == 32000
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))
    first = pt_corpus.jsonl_texts[0]
    assert b.document(0).tolist() == [1, *sp.encode(first), 2]


def test_truncated_file_is_rejected_then_rebuilt(
    pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tok.bin"
    build_token_file([str(pt_corpus.jsonl)], pt_tokenizer, out)
    data = out.read_bytes()
    out.write_bytes(data[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        TokenFile(out)
    tf = build_token_file([str(pt_corpus.jsonl)], pt_tokenizer, out)
    assert out.read_bytes() == data and tf.n_docs == 4


class _BigVocab:
    """A stand-in tokenizer with ids above 65535 (forces uint32 storage)."""

    bos_id, eos_id, vocab_size = 1, 2, 70000

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = [65536 + ord(c) for c in text]
        return ([1] if bos else []) + ids + ([2] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 65536) for i in ids)


def test_uint32_when_vocab_is_large(
    pt_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "load_encoder", lambda path: _BigVocab())
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    tf = build_token_file([str(tmp_path / "a.txt")], pt_tokenizer, tmp_path / "big.bin")
    assert tf.tokens.dtype == np.uint32 and tf.header.itemsize == 4
    assert tf.document(0).tolist() == [1, *[65536 + ord(c) for c in "héllo"], 2]


def test_sources_order_globs_and_errors(pt_corpus: PtCorpus, pt_tokenizer: Path, tmp_path: Path) -> None:
    folder = pt_corpus.folder
    assert isinstance(folder, Path)
    names = [n for _, n in resolve_sources([folder])]
    assert names == sorted(names) and "sub/doc05.txt" in names and len(names) == 12
    globbed = resolve_sources([str(folder / "doc0*.txt")])
    assert [p.name for p, _ in globbed] == [f"doc0{i}.txt" for i in range(10) if i != 5]
    with pytest.raises(ConfigError, match="matched no files"):
        resolve_sources([str(tmp_path / "missing*.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'text' field"):
        build_token_file([str(bad)], pt_tokenizer, tmp_path / "x.bin")
    in_memory = tokenize_documents([str(pt_corpus.jsonl)], corpus.load_encoder(pt_tokenizer))
    on_disk = build_token_file([str(pt_corpus.jsonl)], pt_tokenizer, tmp_path / "y.bin")
    assert in_memory.tokens.tolist() == on_disk.tokens.tolist()
    assert in_memory.doc_offsets.tolist() == on_disk.doc_offsets.tolist()
