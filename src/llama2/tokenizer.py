"""Llama 2's SentencePiece tokenizer: encode/decode, Code Llama infill ids, a streaming detokenizer.

A tokenizer is read from a SentencePiece `tokenizer.model` or from the vocabulary stored inside a GGUF
file (see `llama2.gguf_vocab`); the format is told by the file's first bytes, never by its name.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from llama2.errors import TokenizerError
from llama2.gguf_vocab import GGUF_MAGIC, read_gguf_vocab, save_sentencepiece, sentencepiece_model_bytes

__all__ = ["StreamingDetokenizer", "SupportsDecode", "Tokenizer", "save_sentencepiece"]

# codellama's `encode_infilling` trick: encode "☺" + text, then drop the tokens of the "▁☺" prefix, so
# that the text gets no implicit leading space.
_INFILL_MARKER = "☺"

# Long texts are encoded in pieces of about this many characters (see `Tokenizer.encode_pieces`): one
# SentencePiece call builds its whole result list while holding the GIL (~120 ms for a 4 MB prompt on a
# busy machine, long enough to stall the server's event loop), a piece only a few milliseconds.
ENCODE_PIECE_CHARS = 64 * 1024
# Pieces are cut at a single space between two printable ASCII characters ("a b" -> "a" | "b"): the
# right piece's dummy-prefix space stands for the dropped space, so the ids are those of one call when
# no vocabulary piece spans such a space (checked once per tokenizer by `can_encode_in_pieces`).
_CUT = re.compile(r"(?<=[!-~]) (?=[!-~])")
_PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]


class Tokenizer:
    """SentencePiece tokenizer with Meta's `encode(bos, eos)` / `decode` interface.

    Attributes:
        vocab_size: number of pieces.
        bos_id: begin-of-sequence id.
        eos_id: end-of-sequence id.
        pad_id: padding id, -1 if the vocabulary has none (Llama 2 has none).
        unk_id: unknown-piece id.
        prefix_id: Code Llama's `▁<PRE>` id, None when the vocabulary lacks it (likewise the three below).
        suffix_id: `▁<SUF>` id.
        middle_id: `▁<MID>` id.
        eot_id: `▁<EOT>` id (end of an infilled middle).
        source: where the tokenizer was read from (for messages).
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        *,
        source: str = "<memory>",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        """Wraps a loaded `SentencePieceProcessor`; the special ids default to the model's own."""
        self._sp = processor
        self.source = source
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id() if bos_id is None else bos_id
        self.eos_id: int = processor.eos_id() if eos_id is None else eos_id
        self.pad_id: int = processor.pad_id() if pad_id is None else pad_id
        self.unk_id: int = processor.unk_id()
        self.prefix_id = self._optional_id("▁<PRE>")
        self.suffix_id = self._optional_id("▁<SUF>")
        self.middle_id = self._optional_id("▁<MID>")
        self.eot_id = self._optional_id("▁<EOT>")
        self._infill_marker_ids: list[int] = processor.encode(_INFILL_MARKER)
        self._cuttable: bool | None = None  # whether long texts may be encoded in pieces (computed lazily)

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        """Reads a SentencePiece `tokenizer.model` or a GGUF file, told apart by the GGUF magic bytes.

        Args:
            path: the tokenizer file (its name and extension are not looked at).

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: the file is missing, or is neither a GGUF file nor a SentencePiece model.
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file {path} does not exist; expected a SentencePiece tokenizer.model "
                "or a GGUF file"
            )
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic == GGUF_MAGIC:
            return cls.from_gguf(path)
        return cls.from_model_bytes(path.read_bytes(), source=str(path))

    @classmethod
    def from_model_bytes(cls, data: bytes, *, source: str = "<memory>") -> Tokenizer:
        """Loads a serialised SentencePiece `ModelProto`.

        Args:
            data: the bytes of a `tokenizer.model`.
            source: a name for error messages.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: the bytes are not a loadable SentencePiece model.
        """
        try:
            processor = spm.SentencePieceProcessor(model_proto=data)
            if processor.vocab_size() <= 0:
                raise RuntimeError("the model has no pieces")
        except (RuntimeError, OSError, ValueError, TypeError) as e:
            raise TokenizerError(
                f"{source} is not a SentencePiece model nor a GGUF file (expected a tokenizer.model or a "
                f"file starting with b'GGUF'): {e}"
            ) from e
        return cls(processor, source=source)

    @classmethod
    def from_gguf(cls, path: Path | str) -> Tokenizer:
        """Builds the tokenizer stored in a GGUF file (keys `tokenizer.ggml.*`).

        Args:
            path: a GGUF file whose tokenizer is SentencePiece-style (`tokenizer.ggml.model == "llama"`).

        Returns:
            The tokenizer; it encodes and decodes exactly as the original `tokenizer.model`.

        Raises:
            TokenizerError: the file is unreadable or holds no SentencePiece vocabulary.
        """
        vocab = read_gguf_vocab(path)
        tok = cls.from_model_bytes(sentencepiece_model_bytes(vocab), source=str(path))
        tok.bos_id, tok.eos_id, tok.pad_id = vocab.bos_id, vocab.eos_id, vocab.pad_id
        return tok

    def save(self, path: Path | str) -> Path:
        """Writes the SentencePiece model (`tokenizer.model`) to `path` and returns it."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self._sp.serialized_model_proto())
        return out

    # --- encoding / decoding ----------------------------------------------------------------------

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Encodes text, optionally framed by BOS and EOS.

        Args:
            text: the text; SentencePiece prepends its dummy-prefix space (`"Hi"` -> `"▁Hi"`).
            bos: prepend `bos_id`.
            eos: append `eos_id`.

        Returns:
            The token ids.

        Raises:
            TokenizerError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if len(text) <= ENCODE_PIECE_CHARS:
            ids: list[int] = self._sp.encode(text)
            return [self.bos_id] * bos + ids + [self.eos_id] * eos
        out = [self.bos_id] * bos
        for part in self.encode_pieces(text):
            out += part
        return out + [self.eos_id] * eos

    def encode_pieces(self, text: str) -> Iterator[list[int]]:
        """Encodes text (no BOS/EOS) as consecutive lists of ids whose concatenation is `encode`'s.

        A text longer than `ENCODE_PIECE_CHARS` is cut, about every `ENCODE_PIECE_CHARS` characters,
        at a single space between two printable ASCII characters and each piece is encoded on its
        own: SentencePiece releases the GIL while it tokenizes but holds it while it builds the
        result list, so pieces keep other threads (the server's event loop) running. A text with no
        such space, or a vocabulary where cutting could change the ids, is encoded in one call.

        Raises:
            TokenizerError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        n = len(text)
        if n <= ENCODE_PIECE_CHARS or not self.can_encode_in_pieces():
            yield self._sp.encode(text)
            return
        start = 0
        while start < n:
            cut = n
            pos = start + ENCODE_PIECE_CHARS
            while pos < n:  # look one window at a time, so a long text without a cut stays linear
                found = _CUT.search(text, pos, min(n, pos + ENCODE_PIECE_CHARS + 1))
                if found is not None:
                    cut = found.start()
                    break
                pos += ENCODE_PIECE_CHARS
            yield self._sp.encode(text[start:cut])
            start = cut + 1

    def can_encode_in_pieces(self) -> bool:
        """Whether long texts are cut into pieces by `encode_pieces`: true when `"a b"` encodes as
        `"a"` followed by `"b"` for every printable ASCII a, b and no piece holds a `▁` after another
        character (so no piece spans such a space), as for Llama 2's and Code Llama's vocabularies (a
        dummy prefix, whitespace escaped as `▁`). Worked out once, in ~40 ms: a server asks at
        start-up rather than on its first long prompt."""
        if self._cuttable is None:
            sp = self._sp
            spans = any(re.search("[^▁]▁", sp.id_to_piece(i)) for i in range(self.vocab_size))
            alone = {c: sp.encode(c) for c in _PRINTABLE}
            self._cuttable = not spans and all(
                sp.encode(f"{a} {b}") == alone[a] + alone[b] for a in _PRINTABLE for b in _PRINTABLE
            )
        return self._cuttable

    def encode_infilling(self, text: str) -> list[int]:
        """Encodes text without the implicit leading space (codellama's `encode_infilling`)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_infilling expects a str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(_INFILL_MARKER + text)
        return ids[len(self._infill_marker_ids) :]

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text; -1 (Meta's padding) is skipped, control ids decode to nothing.

        Raises:
            TokenizerError: an id is not an integer in [0, vocab_size).
        """
        return str(self._sp.decode(self._checked(ids)))

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Decodes ids without removing a leading space (codellama's `decode_infilling`)."""
        marker = self._sp.decode(self._infill_marker_ids)
        text: str = self._sp.decode(self._infill_marker_ids + self._checked(ids))
        return text[len(marker) :]

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of an id (e.g. 15043 -> "▁Hello").

        Raises:
            TokenizerError: the id is out of range.
        """
        return str(self._sp.id_to_piece(self._checked([token_id])[0]))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece string; `unk_id` for a string that is not a piece (as SentencePiece does)."""
        return int(self._sp.piece_to_id(piece))

    def is_control(self, token_id: int) -> bool:
        """Whether an id is a control piece (BOS, EOS, ...), which decodes to no text."""
        return bool(self._sp.is_control(self._checked([token_id])[0]))

    def _optional_id(self, piece: str) -> int | None:
        token_id: int = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    def _checked(self, ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for raw in ids:
            try:
                token_id = operator.index(raw)
            except TypeError as e:
                raise TokenizerError(f"token ids must be integers, got {raw!r}") from e
            if token_id == -1:
                continue
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"token id {token_id} is out of range; expected 0 <= id < {self.vocab_size} "
                    f"({self.source})"
                )
            out.append(token_id)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


class SupportsDecode(Protocol):
    """What the streaming detokenizer needs: SentencePiece-style `decode`."""

    def decode(self, ids: Sequence[int]) -> str: ...


class StreamingDetokenizer:
    """Turns token ids into text as they arrive.

    `add` returns only completed text: a character split over several byte-fallback pieces (`<0xF0>`
    `<0x9F>` ...) is held back until its last byte arrives, and the leading space of a word piece
    (`▁world`) is kept except where `decode` itself drops it (the first piece of the text). The
    concatenation of everything returned by `add` and `flush` equals `tokenizer.decode(all ids)`.

    Each step decodes a short window: the ids of the last emitted chunk (as context) plus the ids since,
    and returns the difference. SentencePiece only strips the leading `▁` of a decode's first piece, and
    both decodes of the window start with the same piece, so the difference is exact.
    """

    def __init__(self, tokenizer: SupportsDecode) -> None:
        """Starts an empty stream over `tokenizer` (a `Tokenizer` or anything with `decode`)."""
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] are the last emitted chunk, decoded again as context
        self._read = 0  # ids[read:] have not been emitted yet

    def add(self, token_id: int) -> str:
        """Adds one id and returns the text it completes ("" while a character is incomplete).

        Raises:
            TokenizerError: the id is out of range (the stream stays usable).
        """
        self._ids.append(token_id)
        try:
            full_text = self._tok.decode(self._ids[self._prefix :])
        except Exception:
            self._ids.pop()
            raise
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Returns the text still held back (e.g. an incomplete byte sequence, decoded as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text):
            self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]
