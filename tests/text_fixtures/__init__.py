"""Shared helpers for the tokenizer, chat and infill tests (real Llama 2 vocabulary from ../shared).

Oracles here use `sentencepiece` directly, never `llama2`'s own code.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

import sentencepiece as spm

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
MODEL = FIXTURES / "tokenizer.model"
GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"

# Code Llama: 16 pieces at 32000-32015, of which these four are the infilling pieces.
CODELLAMA_SPECIAL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}


def vocab_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's test cases, read as its test-tokenizer-0 reads them (each input ends with a separator)."""
    text = (FIXTURES / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    inputs = text.split(SEPARATOR)
    if inputs and inputs[-1] == "":  # the file ends with a separator: no input after it
        inputs.pop()
    lines = (FIXTURES / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").splitlines()
    if len(lines) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(lines)} expected outputs")
    return [(inp, [int(x) for x in line.split()]) for inp, line in zip(inputs, lines, strict=True)]


@lru_cache(maxsize=1)
def reference_sp() -> spm.SentencePieceProcessor:
    """The oracle: sentencepiece on the fixture model."""
    return spm.SentencePieceProcessor(model_file=str(MODEL))


def ref_encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Meta's `Tokenizer.encode`, computed with sentencepiece directly (bos=1, eos=2)."""
    ids: list[int] = reference_sp().encode(text)
    return [1] * bos + ids + [2] * eos


def _piece_entry(piece: str, score: float, piece_type: int) -> bytes:
    # ModelProto field 1 (pieces) holding a SentencePiece message: 1 piece, 2 score, 3 type.
    # Pieces here are short, so every length fits in one byte.
    raw = piece.encode("utf-8")
    body = (
        b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([piece_type])
    )
    return b"\x0a" + bytes([len(body)]) + body


@lru_cache(maxsize=1)
def codellama_model_bytes() -> bytes:
    """The fixture model with Code Llama's 16 extra pieces appended (ids 32000-32015).

    Protobuf merges repeated fields that appear after other fields, so appending piece entries to the
    serialised model extends the vocabulary. The four infilling pieces are CONTROL (3), the others UNUSED (5).
    """
    extra = b"".join(
        _piece_entry(CODELLAMA_SPECIAL.get(i, f"<cl_extra_{i}>"), 0.0, 3 if i in CODELLAMA_SPECIAL else 5)
        for i in range(32000, 32016)
    )
    return MODEL.read_bytes() + extra


@lru_cache(maxsize=1)
def codellama_sp() -> spm.SentencePieceProcessor:
    """Oracle sentencepiece processor over the Code Llama-extended vocabulary."""
    return spm.SentencePieceProcessor(model_proto=codellama_model_bytes())
