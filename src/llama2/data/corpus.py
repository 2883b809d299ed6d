"""Corpora -> one memory-mapped token file.

Inputs are text files, folders (searched recursively for `*.txt`, `*.md`, `*.jsonl`), glob patterns,
and JSONL files (one JSON object per line; its `text` field is one document). A text file is one
document. Every document is stored as `[BOS] tokens [EOS]`, documents back to back.

File layout (little-endian), version 1::

    offset 0    8s   magic b"LL2TOKS\\0"
           8    u32  version (1)
           12   u32  bytes per token (2: uint16 when vocab_size < 65536, else 4: uint32)
           16   u32  vocab_size
           20   u32  reserved (0)
           24   u64  n_tokens
           32   u64  n_docs
           40   32s  sha256 of the tokenizer file
           72   32s  sha256 of the sources (paths relative to their root, sizes, bytes) and options
           104  ...  zero padding up to HEADER_SIZE (256)
    256              n_tokens tokens
    256 + n_tokens*w (n_docs + 1) u64 document start offsets (the last one is n_tokens)

Building streams: files are tokenized one at a time and appended to a temporary file, so a corpus
larger than RAM needs only one document in memory; the temporary file is renamed into place at the
end. `build_token_file` reuses an existing file when its header's tokenizer and source hashes match,
and re-tokenizes when either changed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from llama2.errors import ConfigError, TokenizerError

MAGIC = b"LL2TOKS\0"
VERSION = 1
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIIIQQ32s32s")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


class TextEncoder(Protocol):
    """What the corpus needs from a tokenizer (`llama2.tokenizer.Tokenizer` satisfies it)."""

    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def load_encoder(path: Path | str) -> TextEncoder:
    """Read a tokenizer file with `llama2.tokenizer.Tokenizer.from_file`."""
    from llama2.tokenizer import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found")
    return Tokenizer.from_file(path)


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


# ------------------------------------------------------------------------------------- sources
def resolve_sources(sources: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Expand files, folders and glob patterns into `(path, display_name)` pairs, in a stable order
    (each source's matches sorted by path; sources in the given order; duplicates dropped)."""
    if isinstance(sources, str | Path):
        sources = [sources]
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for src in sources:
        p = Path(src)
        matches: list[tuple[Path, str]]
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            matches = [(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            matches = [(p, p.name)]
        else:
            found = sorted(Path(f) for f in glob.glob(str(src), recursive=True))
            matches = [(f, f.name) for f in found if f.is_file()]
        if not matches:
            raise ConfigError(f"data source {src!s} matched no files; expected a file, folder or glob")
        for f, name in matches:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append((f, name))
    return out


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: the whole file for text, the `text_field` of each line for JSONL."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise ConfigError(
                        f"{path}:{lineno}: expected a JSON object with a string {text_field!r} field"
                    )
                yield obj[text_field]
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def iter_corpus(sources: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """All documents of all sources, in order."""
    for path, _ in resolve_sources(sources):
        yield from iter_documents(path, text_field)


def sources_hash(files: Iterable[tuple[Path, str]], text_field: str) -> bytes:
    h = hashlib.sha256(f"llama2-corpus-v{VERSION}|{text_field}".encode())
    for path, name in files:
        h.update(f"|{name}|{path.stat().st_size}|".encode())
        h.update(sha256_file(path))
    return h.digest()


# ----------------------------------------------------------------------------------- token file
@dataclass(frozen=True)
class TokenFileHeader:
    version: int
    itemsize: int
    vocab_size: int
    n_tokens: int
    n_docs: int
    tokenizer_sha256: bytes
    source_sha256: bytes

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(np.uint16) if self.itemsize == 2 else np.dtype(np.uint32)

    def pack(self) -> bytes:
        raw = _HEADER.pack(
            MAGIC,
            self.version,
            self.itemsize,
            self.vocab_size,
            0,
            self.n_tokens,
            self.n_docs,
            self.tokenizer_sha256,
            self.source_sha256,
        )
        return raw + b"\0" * (HEADER_SIZE - len(raw))

    @classmethod
    def read(cls, path: Path) -> TokenFileHeader:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise ConfigError(f"{path}: not a llama2 token file (missing magic {MAGIC!r})")
        _magic, version, itemsize, vocab, _, n_tok, n_docs, tok_h, src_h = _HEADER.unpack(raw[: _HEADER.size])
        if version != VERSION:
            raise ConfigError(f"{path}: token file version {version}, expected {VERSION}")
        if itemsize not in (2, 4):
            raise ConfigError(f"{path}: token width {itemsize} bytes, expected 2 or 4")
        expected = HEADER_SIZE + n_tok * itemsize + (n_docs + 1) * 8
        actual = path.stat().st_size
        if actual != expected:
            raise ConfigError(f"{path}: file is {actual} bytes, header says {expected} (truncated?)")
        return cls(version, itemsize, vocab, n_tok, n_docs, tok_h, src_h)


def is_token_file(path: Path) -> bool:
    """True when `path` starts with our token-file magic."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


class TokenFile:
    """A memory-mapped token file: `tokens` (n_tokens,) uint16/uint32, `doc_offsets` (n_docs+1,) int64."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.header = TokenFileHeader.read(self.path)
        h = self.header
        self.tokens: np.ndarray = np.memmap(
            self.path, dtype=h.dtype, mode="r", offset=HEADER_SIZE, shape=(h.n_tokens,)
        )
        offsets_at = HEADER_SIZE + h.n_tokens * h.itemsize
        self.doc_offsets: np.ndarray = np.array(
            np.memmap(self.path, dtype=np.uint64, mode="r", offset=offsets_at, shape=(h.n_docs + 1,)),
            dtype=np.int64,
        )

    @property
    def n_docs(self) -> int:
        return self.header.n_docs

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def __len__(self) -> int:
        return self.header.n_tokens

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i`, including its BOS and EOS."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range (0..{self.n_docs - 1})")
        return np.asarray(self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]])


class InMemoryTokens:
    """Tokens and document offsets held in RAM, with `TokenFile`'s reading interface."""

    def __init__(self, docs: Iterable[Sequence[int]], vocab_size: int) -> None:
        arrays = [np.asarray(d, dtype=np.int64) for d in docs]
        self.tokens: np.ndarray = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self.doc_offsets: np.ndarray = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(
            np.int64
        )
        self.vocab_size = vocab_size

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_documents(
    sources: Sequence[str | Path], encoder: TextEncoder, text_field: str = "text"
) -> InMemoryTokens:
    """Tokenize `sources` in RAM exactly as `build_token_file` does (each document `[BOS] ... [EOS]`)."""
    docs = (encoder.encode(doc, bos=True, eos=True) for doc in iter_corpus(sources, text_field))
    return InMemoryTokens(docs, encoder.vocab_size)


def build_token_file(
    sources: Sequence[str | Path],
    tokenizer_path: Path | str,
    out_path: Path | str,
    *,
    text_field: str = "text",
    force: bool = False,
    progress: bool = False,
) -> TokenFile:
    """Tokenize `sources` into `out_path` (or reuse it when tokenizer and sources are unchanged).

    Args:
        sources: files, folders or glob patterns (see module docstring).
        tokenizer_path: SentencePiece `tokenizer.model` (or anything `Tokenizer.from_file` reads).
        out_path: the token file to write.
        text_field: JSONL field holding the document text.
        force: re-tokenize even when the existing file matches.
        progress: show a tqdm bar over files.

    Returns:
        The opened `TokenFile`.
    """
    out_path = Path(out_path)
    tokenizer_path = Path(tokenizer_path)
    files = resolve_sources(sources)
    tok_hash = sha256_file(tokenizer_path) if tokenizer_path.is_file() else b""
    if not tok_hash:
        raise TokenizerError(f"tokenizer file {tokenizer_path} not found")
    src_hash = sources_hash(files, text_field)
    if out_path.is_file() and not force:
        try:
            h = TokenFileHeader.read(out_path)
            if h.tokenizer_sha256 == tok_hash and h.source_sha256 == src_hash:
                return TokenFile(out_path)
        except ConfigError:
            pass  # unreadable or truncated: rebuild
    enc = load_encoder(tokenizer_path)
    itemsize = 2 if enc.vocab_size < 65536 else 4
    dtype = np.uint16 if itemsize == 2 else np.uint32
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    offsets = [0]
    n_tokens = 0
    iterator: Iterable[tuple[Path, str]] = files
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="tokenize", unit="file")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            for path, _ in iterator:
                for doc in iter_documents(path, text_field):
                    ids = np.asarray(enc.encode(doc, bos=True, eos=True), dtype=dtype)
                    f.write(ids.tobytes())
                    n_tokens += len(ids)
                    offsets.append(n_tokens)
            f.write(np.asarray(offsets, dtype=np.uint64).tobytes())
            header = TokenFileHeader(
                VERSION, itemsize, enc.vocab_size, n_tokens, len(offsets) - 1, tok_hash, src_hash
            )
            f.seek(0)
            f.write(header.pack())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return TokenFile(out_path)
