"""Code Llama infilling prompts (PSM / SPM) against sentencepiece on a Code Llama-extended vocabulary."""

from __future__ import annotations

import pytest

from llama2.errors import TokenizerError
from llama2.infill import encode_infill, infill_ids
from llama2.tokenizer import Tokenizer
from text_fixtures import MODEL, codellama_model_bytes, codellama_sp

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"


@pytest.fixture(scope="module")
def code_tok() -> Tokenizer:
    return Tokenizer.from_model_bytes(codellama_model_bytes(), source="codellama-fixture")


def _oracle_infilling(text: str) -> list[int]:
    # codellama's `encode_infilling`: encode "☺" + text, drop the "▁" and "☺" tokens.
    ids: list[int] = codellama_sp().encode("☺" + text)
    assert codellama_sp().id_to_piece(ids[:2]) == ["▁", "☺"]
    return ids[2:]


def test_infill_ids(code_tok: Tokenizer) -> None:
    assert code_tok.vocab_size == 32016
    assert infill_ids(code_tok) == (32007, 32008, 32009, 32010)


def test_psm_prompt(code_tok: Tokenizer) -> None:
    tokens = encode_infill(PREFIX, SUFFIX, code_tok)
    # "<s> ▁<PRE> ▁def ▁add ( a , ▁b ): \n ▁▁▁▁ ▁<SUF> \n ▁▁▁ ▁return ▁c \n ▁<MID>"
    assert tokens == [
        1, 32007, 822, 788, 29898, 29874, 29892, 289, 1125, 13, 268, 32008, 13, 1678, 736, 274, 13, 32009,
    ]  # fmt: skip
    assert tokens == [1, 32007, *codellama_sp().encode(PREFIX), 32008, *_oracle_infilling(SUFFIX), 32009]


def test_spm_prompt(code_tok: Tokenizer) -> None:
    tokens = encode_infill(PREFIX, SUFFIX, code_tok, suffix_first=True)
    assert tokens == [
        1, 32007, 32008, 13, 1678, 736, 274, 13, 32009, 822, 788, 29898, 29874, 29892, 289, 1125, 13, 268,
    ]  # fmt: skip
    assert tokens == [1, 32007, 32008, *_oracle_infilling(SUFFIX), 32009, *codellama_sp().encode(PREFIX)]


@pytest.mark.parametrize("suffix", ["return c", " return c", "x", "", "\tfoo(1)\n", "½🦙"])
def test_suffix_gets_no_implicit_leading_space(code_tok: Tokenizer, suffix: str) -> None:
    ids = code_tok.encode_infilling(suffix)
    assert ids == _oracle_infilling(suffix)
    assert code_tok.decode_infilling(ids) == suffix
    if suffix[:1].isalpha():
        assert not code_tok.id_to_piece(ids[0]).startswith("▁")  # "return", not "▁return"
        assert code_tok.encode(suffix, bos=False, eos=False) != ids


def test_llama2_tokenizer_has_no_infill_ids() -> None:
    tok = Tokenizer.from_file(MODEL)
    for suffix_first in (False, True):
        with pytest.raises(TokenizerError, match="▁<PRE>"):
            encode_infill("a", "b", tok, suffix_first=suffix_first)
