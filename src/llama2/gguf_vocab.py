"""The SentencePiece vocabulary stored in a GGUF file, and the `tokenizer.model` bytes built from it.

llama.cpp stores a Llama tokenizer as three parallel arrays (`tokenizer.ggml.tokens`, `.scores`,
`.token_type`) plus the special ids. That is everything a SentencePiece BPE model needs: this module
reads the arrays with `gguf.GGUFReader` and hand-encodes a SentencePiece `ModelProto` (so the `protobuf`
package is not needed) that `sentencepiece` loads from bytes. The encoding writes the fields in the
order protobuf does, so the bytes are the canonical serialisation of that message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from llama2.errors import TokenizerError

GGUF_MAGIC = b"GGUF"

# SentencePiece `TrainerSpec` defaults for the special pieces' names; written only when they differ.
_DEFAULT_PIECE_NAMES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


class PieceType(IntEnum):
    """A piece's type; GGUF's `tokenizer.ggml.token_type` and SentencePiece's enum share these values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFVocab:
    """A SentencePiece (`tokenizer.ggml.model == "llama"`) vocabulary read from a GGUF file.

    Attributes:
        pieces: the piece strings, indexed by token id.
        scores: one float per piece (BPE merge priority: higher merges first).
        types: one `PieceType` value per piece.
        unk_id: id of the unknown piece.
        bos_id: begin-of-sequence id, -1 if none.
        eos_id: end-of-sequence id, -1 if none.
        pad_id: padding id, -1 if none.
        add_dummy_prefix: whether encoding prepends a space (`▁`) to the text.
        remove_extra_whitespaces: whether encoding collapses runs of whitespace.
    """

    pieces: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False


def is_gguf(path: Path | str) -> bool:
    """Tells whether a file starts with the GGUF magic bytes (the file's name is not looked at)."""
    with Path(path).open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf_vocab(path: Path | str) -> GGUFVocab:
    """Reads the SentencePiece vocabulary stored in a GGUF file.

    Args:
        path: a GGUF file (a full model or a vocabulary-only file).

    Returns:
        The vocabulary arrays and special ids.

    Raises:
        TokenizerError: the file is not a readable GGUF file, holds no tokenizer, holds a tokenizer that
            is not SentencePiece-style (`tokenizer.ggml.model` other than "llama"), or its arrays disagree.
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/OSError/struct errors on bad files
        raise TokenizerError(f"cannot read GGUF file {path}: {e}") from e
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"GGUF file {path} has no tokenizer (key 'tokenizer.ggml.model' is missing)")
    if model != "llama":
        raise TokenizerError(
            f"GGUF file {path} holds a {model!r} tokenizer; expected 'llama' (SentencePiece BPE)"
        )
    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    if not pieces:
        raise TokenizerError(f"GGUF file {path} has no 'tokenizer.ggml.tokens' array")
    if scores is None or len(scores) != len(pieces):
        raise TokenizerError(
            f"GGUF file {path}: 'tokenizer.ggml.scores' must hold one score per token "
            f"({len(pieces)}), got {None if scores is None else len(scores)}"
        )
    n = len(pieces)

    def special(name: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is None:
            return None
        if not 0 <= int(value) < n:
            raise TokenizerError(
                f"GGUF file {path}: {name} token id {value} is outside the {n}-token vocabulary"
            )
        return int(value)

    unk, bos, eos, pad = special("unknown"), special("bos"), special("eos"), special("padding")
    types = _field(reader, "tokenizer.ggml.token_type")
    if types is None:  # infer what SentencePiece needs: unk, control bos/eos, byte pieces
        types = [PieceType.BYTE if _is_byte_piece(p) else PieceType.NORMAL for p in pieces]
        for i in (bos, eos):
            if i is not None:
                types[i] = PieceType.CONTROL
        if unk is not None:
            types[unk] = PieceType.UNKNOWN
    types = [int(t) for t in types]
    if len(types) != n:
        raise TokenizerError(
            f"GGUF file {path}: 'tokenizer.ggml.token_type' must hold one type per token ({n}), "
            f"got {len(types)}"
        )
    unknown = [i for i, t in enumerate(types) if t == PieceType.UNKNOWN]
    if unk is None and len(unknown) == 1:
        unk = unknown[0]
    if unk is None or unknown != [unk]:
        raise TokenizerError(
            f"GGUF file {path}: expected exactly one unknown-type token matching "
            f"'tokenizer.ggml.unknown_token_id' ({unk}), found {unknown[:5]}"
        )
    add_prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    remove_ws = _field(reader, "tokenizer.ggml.remove_extra_whitespaces")
    return GGUFVocab(
        pieces=[str(p) for p in pieces],
        scores=[float(s) for s in scores],
        types=types,
        unk_id=unk,
        bos_id=-1 if bos is None else bos,
        eos_id=-1 if eos is None else eos,
        pad_id=-1 if pad is None else pad,
        add_dummy_prefix=True if add_prefix is None else bool(add_prefix),
        remove_extra_whitespaces=False if remove_ws is None else bool(remove_ws),
    )


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


# --- minimal protobuf (proto2) wire encoding -------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are sign-extended to 10 bytes, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(value)) + value


def _float_field(number: int, value: float) -> bytes:
    return _varint((number << 3) | 5) + struct.pack("<f", value)


def _piece_message(piece: str, score: float, piece_type: int) -> bytes:
    # SentencePiece message: 1 piece, 2 score, 3 type (NORMAL is the default and is left out).
    body = _bytes_field(1, piece.encode("utf-8")) + _float_field(2, score)
    if piece_type != PieceType.NORMAL:
        body += _int_field(3, piece_type)
    return body


def sentencepiece_model_bytes(vocab: GGUFVocab) -> bytes:
    """Serialises a vocabulary as a SentencePiece BPE `ModelProto` with byte fallback.

    Normalisation is identity (no NFKC, no whitespace collapsing unless the GGUF asks for it), with the
    dummy-prefix space as stored in the GGUF (default on), as Llama's tokenizer does.

    Args:
        vocab: the vocabulary, e.g. from `read_gguf_vocab`.

    Returns:
        Bytes that `sentencepiece.SentencePieceProcessor(model_proto=...)` loads.
    """
    out = bytearray()
    for piece, score, piece_type in zip(vocab.pieces, vocab.scores, vocab.types, strict=True):
        out += _bytes_field(1, _piece_message(piece, score, piece_type))
    # TrainerSpec: 3 model_type (2 = BPE), 4 vocab_size, 20 max_sentencepiece_length,
    # 21/22/23 split_by_unicode_script/whitespace/number, 25 split_digits,
    # 26 allow_whitespace_only_pieces, 35 byte_fallback, 40-43 unk/bos/eos/pad ids, 45-48 their names.
    trainer = bytearray()
    flags = ((3, 2), (4, len(vocab.pieces)), (20, 16), (21, 1), (22, 1), (23, 1), (25, 1), (26, 1), (35, 1))
    for number, value in flags:
        trainer += _int_field(number, value)
    ids = {"unk": vocab.unk_id, "bos": vocab.bos_id, "eos": vocab.eos_id, "pad": vocab.pad_id}
    for number, key in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad")):
        trainer += _int_field(number, ids[key])
    for number, key in ((45, "unk"), (46, "bos"), (47, "eos"), (48, "pad")):
        if ids[key] >= 0 and vocab.pieces[ids[key]] != _DEFAULT_PIECE_NAMES[key]:
            trainer += _bytes_field(number, vocab.pieces[ids[key]].encode("utf-8"))
    out += _bytes_field(2, bytes(trainer))
    # NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces.
    normalizer = (
        _bytes_field(1, b"identity")
        + _int_field(3, int(vocab.add_dummy_prefix))
        + _int_field(4, int(vocab.remove_extra_whitespaces))
        + _int_field(5, 1)
    )
    out += _bytes_field(3, normalizer)
    return bytes(out)


def save_sentencepiece(gguf_path: Path | str, out_path: Path | str) -> Path:
    """Writes a SentencePiece `tokenizer.model` rebuilt from the vocabulary inside a GGUF file.

    Args:
        gguf_path: the GGUF file to read.
        out_path: where to write the model (parent folders are created).

    Returns:
        The path written.

    Raises:
        TokenizerError: the GGUF file holds no usable SentencePiece vocabulary.
    """
    out = Path(out_path)
    data = sentencepiece_model_bytes(read_gguf_vocab(gguf_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out
