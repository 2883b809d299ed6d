"""Read the SentencePiece vocabulary stored in a GGUF file, and build one from a SentencePiece model.

The GGUF header parser lives in `llama2.gguf_header` (re-exported here under its old names).

llama.cpp stores a Llama tokenizer as three parallel arrays (`tokenizer.ggml.tokens`, `.scores`,
`.token_type`) plus the special ids. That is everything a SentencePiece BPE model needs: this module
reads the arrays and hand-encodes a SentencePiece `ModelProto` (so the `protobuf` package is not
needed) that `sentencepiece` loads from bytes. The encoding writes the fields in the order protobuf
does, so the bytes are the canonical serialisation of that message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from llama2.errors import TokenizerError
from llama2.gguf_header import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUFFormatError,
    GGUFHeader,
    GGUFTensorInfo,
    is_gguf,
    read_gguf_architecture,
    read_gguf_header,
)
from llama2.limits import BOUNDS

__all__ = [
    "GGUF_DEFAULT_ALIGNMENT",
    "GGUF_MAGIC",
    "GGUFFormatError",
    "GGUFHeader",
    "GGUFTensorInfo",
    "GGUFVocab",
    "PieceType",
    "is_gguf",
    "read_gguf_architecture",
    "read_gguf_header",
    "read_gguf_vocab",
    "read_vocab",
    "save_sentencepiece",
    "sentencepiece_model_bytes",
    "vocab_from_sentencepiece",
]


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


def _field(header: GGUFHeader, key: str) -> Any:
    return header.fields.get(key)


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
    path = Path(path)
    try:
        header = read_gguf_header(path)
    except (GGUFFormatError, OSError) as e:
        raise TokenizerError(f"cannot read GGUF file {path}: {e}") from e
    model = _field(header, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"GGUF file {path} has no tokenizer (key 'tokenizer.ggml.model' is missing)")
    if model != "llama":
        raise TokenizerError(
            f"GGUF file {path} holds a {model!r} tokenizer; expected 'llama' (SentencePiece BPE)"
        )
    pieces = _field(header, "tokenizer.ggml.tokens")
    scores = _field(header, "tokenizer.ggml.scores")
    if not isinstance(pieces, list) or not pieces:
        raise TokenizerError(f"GGUF file {path} has no 'tokenizer.ggml.tokens' array of strings")
    if len(pieces) > BOUNDS["vocab_size"].max:
        raise TokenizerError(
            f"GGUF file {path}: {len(pieces)} tokens; at most {BOUNDS['vocab_size'].max} are supported"
        )
    _check_numeric(path, "tokenizer.ggml.scores", scores, "f")
    _check_numeric(path, "tokenizer.ggml.token_type", _field(header, "tokenizer.ggml.token_type"), "iu")
    if scores is None or len(scores) != len(pieces):
        raise TokenizerError(
            f"GGUF file {path}: 'tokenizer.ggml.scores' must hold one score per token "
            f"({len(pieces)}), got {None if scores is None else len(scores)}"
        )
    n = len(pieces)

    def special(name: str) -> int | None:
        value = _field(header, f"tokenizer.ggml.{name}_token_id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise TokenizerError(
                f"GGUF file {path}: {name} token id {value} is outside the {n}-token vocabulary"
            )
        return int(value)

    unk, bos, eos, pad = special("unknown"), special("bos"), special("eos"), special("padding")
    types = _field(header, "tokenizer.ggml.token_type")
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
    add_prefix = _field(header, "tokenizer.ggml.add_space_prefix")
    remove_ws = _field(header, "tokenizer.ggml.remove_extra_whitespaces")
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


def _check_numeric(path: Path, key: str, value: Any, kinds: str) -> None:
    """Refuse a vocabulary array of the wrong element type (numpy kind 'f' float, 'i'/'u' integer)."""
    if value is not None and (not isinstance(value, np.ndarray) or value.dtype.kind not in kinds):
        expected = "floats" if kinds == "f" else "integers"
        raise TokenizerError(f"GGUF file {path}: '{key}' must be an array of {expected}")


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


# --- the other direction: a SentencePiece model as GGUF vocabulary arrays ----------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message's top-level fields."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        out.append((number, wire, value))
    return out


def normalizer_flags(model_bytes: bytes) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a serialised SentencePiece `ModelProto`.

    Both default to true in SentencePiece's `NormalizerSpec` when the model does not set them.
    """
    add_prefix, remove_ws = True, True
    try:
        for number, wire, value in _proto_fields(model_bytes):
            if number == 3 and wire == 2 and isinstance(value, bytes):  # normalizer_spec
                for n, w, v in _proto_fields(value):
                    if n == 3 and w == 0:
                        add_prefix = bool(v)
                    elif n == 4 and w == 0:
                        remove_ws = bool(v)
    except ValueError as e:
        raise TokenizerError(f"corrupt SentencePiece model ({e})") from None
    return add_prefix, remove_ws


def vocab_from_sentencepiece(model_bytes: bytes, source: str = "<memory>") -> GGUFVocab:
    """The GGUF vocabulary arrays of a SentencePiece model, as llama.cpp's converter builds them.

    Types: unknown, control, unused and byte pieces get those types, every other piece NORMAL
    (llama.cpp's `convert_hf_to_gguf.py` does the same).

    Raises:
        TokenizerError: the bytes are not a SentencePiece model.
    """
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        raise TokenizerError(f"{source} is not a SentencePiece model: {e}") from e
    n = sp.vocab_size()
    types: list[int] = []
    for i in range(n):
        if sp.is_unknown(i):
            types.append(PieceType.UNKNOWN)
        elif sp.is_control(i):
            types.append(PieceType.CONTROL)
        elif sp.is_unused(i):
            types.append(PieceType.UNUSED)
        elif sp.is_byte(i):
            types.append(PieceType.BYTE)
        else:
            types.append(PieceType.NORMAL)
    add_prefix, remove_ws = normalizer_flags(model_bytes)
    return GGUFVocab(
        pieces=[sp.id_to_piece(i) for i in range(n)],
        scores=[float(sp.get_score(i)) for i in range(n)],
        types=types,
        unk_id=sp.unk_id(),
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        pad_id=sp.pad_id(),
        add_dummy_prefix=add_prefix,
        remove_extra_whitespaces=remove_ws,
    )


def read_vocab(path: Path | str) -> GGUFVocab:
    """The vocabulary of a tokenizer file: a GGUF file or a SentencePiece `tokenizer.model` (told
    apart by the GGUF magic bytes, not by the name).

    Raises:
        TokenizerError: missing file, or neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {path} does not exist; expected a tokenizer.model or a GGUF file"
        )
    if is_gguf(path):
        return read_gguf_vocab(path)
    return vocab_from_sentencepiece(path.read_bytes(), source=str(path))
