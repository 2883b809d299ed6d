"""Tokenizer tests against llama.cpp's golden vectors and sentencepiece as the oracle."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm

from llama2.errors import TokenizerError
from llama2.tokenizer import StreamingDetokenizer, Tokenizer, save_sentencepiece
from text_fixtures import (
    GGUF,
    MODEL,
    _piece_entry,
    codellama_model_bytes,
    codellama_sp,
    reference_sp,
    vocab_cases,
)

CASES = vocab_cases()
MODEL_SHA256 = "0cfa47d25971c2359ceeb30545d15b1676ed49abc163361350281694aa386843"  # fixture README


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(MODEL)


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    return Tokenizer.from_file(GGUF)


@pytest.fixture(scope="module", params=["tokenizer.model", "gguf"])
def any_tok(request: pytest.FixtureRequest, tok: Tokenizer, gguf_tok: Tokenizer) -> Tokenizer:
    return tok if request.param == "tokenizer.model" else gguf_tok


def _stream(tokenizer: object, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)  # type: ignore[arg-type]
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_case_file_has_one_expected_line_per_input() -> None:
    # llama.cpp writes each input followed by a separator: 46 separators, 46 inputs, 46 output lines.
    assert len(CASES) == 46
    assert CASES[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_encode_matches_llama_cpp(any_tok: Tokenizer, case: int) -> None:
    text, expected = CASES[case]
    assert any_tok.encode(text, bos=False, eos=False) == expected


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_and_stream_match_whole_decode(any_tok: Tokenizer, case: int) -> None:
    text, expected = CASES[case]
    ids = [1, *expected, 2]
    whole = any_tok.decode(ids)
    assert whole == reference_sp().decode(ids) == text
    chunks = _stream(any_tok, ids)
    assert "".join(chunks) == whole
    assert not any("\ufffd" in c for c in chunks)


def test_known_values(any_tok: Tokenizer) -> None:
    assert any_tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert any_tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert any_tok.encode("[INST] Hi [/INST]", bos=False, eos=False) == [
        518, 25580, 29962, 6324, 518, 29914, 25580, 29962,
    ]  # fmt: skip
    assert (any_tok.bos_id, any_tok.eos_id, any_tok.pad_id, any_tok.unk_id) == (1, 2, -1, 0)
    assert any_tok.vocab_size == 32000
    assert (any_tok.prefix_id, any_tok.suffix_id, any_tok.middle_id, any_tok.eot_id) == (None,) * 4
    assert any_tok.id_to_piece(15043) == "▁Hello"
    assert any_tok.piece_to_id("▁Hello") == 15043
    assert any_tok.is_control(1) and not any_tok.is_control(15043)


def test_stream_holds_back_split_utf8_character(tok: Tokenizer) -> None:
    ids = tok.encode("🦙", bos=False, eos=False)
    assert ids == [29871, 243, 162, 169, 156]  # "▁" then byte-fallback <0xF0> <0x9F> <0xA6> <0x99>
    assert _stream(tok, ids) == ["", "", "", "", "🦙", ""]


def test_stream_keeps_leading_spaces(tok: Tokenizer) -> None:
    assert _stream(tok, [1, 15043, 3186, 2]) == ["", "Hello", " world", "", ""]
    # Pieces "▁▁" "▁x" "▁" "▁world": decode drops only the very first space of the text.
    assert reference_sp().encode("  x  world", out_type=str) == ["▁▁", "▁x", "▁", "▁world"]
    assert _stream(tok, reference_sp().encode("  x  world")) == [" ", " x", " ", " world", ""]


def test_stream_flushes_incomplete_bytes_like_decode(tok: Tokenizer) -> None:
    ids = [15043, 243, 162]  # "Hello" + the first two bytes of a 4-byte character
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["Hello", "", ""]
    assert "Hello" + detok.flush() == tok.decode(ids) == reference_sp().decode(ids)


def test_stream_works_with_a_decode_only_tokenizer() -> None:
    class DecodeOnly:
        def decode(self, ids: list[int]) -> str:
            return str(reference_sp().decode(list(ids)))

    text = "Hello  world 🦙 ½"
    ids = reference_sp().encode(text)
    assert "".join(_stream(DecodeOnly(), ids)) == text


def test_stream_rejects_bad_id_and_stays_usable(tok: Tokenizer) -> None:
    detok = StreamingDetokenizer(tok)
    assert detok.add(15043) == "Hello"
    with pytest.raises(TokenizerError, match="32000"):
        detok.add(32000)
    assert detok.add(3186) == " world"


def test_decode_validates_ids(tok: Tokenizer) -> None:
    assert tok.decode([-1, 15043, -1]) == "Hello"  # Meta's decode skips -1 (padding)
    for bad in ([32000], [-2], [15043, 10**9]):
        with pytest.raises(TokenizerError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(TokenizerError, match="integers"):
        tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizerError):
        tok.id_to_piece(32000)
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes", bos=False, eos=False)  # type: ignore[arg-type]


def test_gguf_rebuilds_the_fixture_model_byte_for_byte(tmp_path: Path) -> None:
    out = save_sentencepiece(GGUF, tmp_path / "sub" / "tokenizer.model")
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == MODEL_SHA256
    rebuilt = spm.SentencePieceProcessor(model_file=str(out))
    ref = reference_sp()
    assert rebuilt.vocab_size() == ref.vocab_size() == 32000
    for i in range(0, 32000, 7):
        assert rebuilt.id_to_piece(i) == ref.id_to_piece(i)
        assert rebuilt.get_score(i) == ref.get_score(i)
        assert (rebuilt.is_byte(i), rebuilt.is_control(i), rebuilt.is_unknown(i)) == (
            ref.is_byte(i), ref.is_control(i), ref.is_unknown(i),
        )  # fmt: skip


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match=r"nope\.model"):
        Tokenizer.from_file(missing)
    with pytest.raises(TokenizerError):
        Tokenizer.from_file(tmp_path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff\x00not a sentencepiece model" * 10)
    with pytest.raises(TokenizerError, match=r"garbage\.bin"):
        Tokenizer.from_file(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"empty\.model"):
        Tokenizer.from_file(empty)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(GGUF.read_bytes()[:5000])
    with pytest.raises(TokenizerError, match=r"cut\.gguf"):
        Tokenizer.from_file(truncated)


def _write_gguf(
    path: Path, model: str | None, pieces: list[str], scores: list[float], types: list[int]
) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    if model is not None:
        writer.add_tokenizer_model(model)
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "H", "i", "▁H", "▁Hi"]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0]
    types = [2, 3, 3] + [6] * 256 + [1] * 5
    return pieces, scores, types


def test_from_file_detects_format_by_content(tmp_path: Path) -> None:
    disguised_gguf = tmp_path / "tokenizer.model"
    _write_gguf(disguised_gguf, "llama", *_tiny_vocab())
    small = Tokenizer.from_file(disguised_gguf)
    assert small.vocab_size == 264
    assert small.encode("Hi", bos=True, eos=False) == [1, 263]  # merges ▁ H i -> ▁H -> ▁Hi
    assert small.decode([1, 263, 2, 259, 108, 109]) == "Hi ij"  # <0x69> <0x6A> decode as "ij"
    disguised_spm = tmp_path / "vocab.gguf"
    shutil.copyfile(MODEL, disguised_spm)
    assert Tokenizer.from_file(disguised_spm).encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]


def test_gguf_without_sentencepiece_vocabulary_is_rejected(tmp_path: Path) -> None:
    bpe = tmp_path / "gpt2.gguf"
    _write_gguf(bpe, "gpt2", ["<unk>", "<s>", "</s>", "a"], [0.0] * 4, [2, 3, 3, 1])
    with pytest.raises(TokenizerError, match="'gpt2'"):
        Tokenizer.from_file(bpe)
    bare = tmp_path / "bare.gguf"
    _write_gguf(bare, None, [], [], [])
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_file(bare)


def test_gguf_with_code_llama_vocabulary(tmp_path: Path) -> None:
    ref = codellama_sp()
    n = ref.vocab_size()
    pieces = [ref.id_to_piece(i) for i in range(n)]
    scores = [ref.get_score(i) for i in range(n)]
    kinds = (ref.is_unknown, ref.is_control, ref.is_byte, ref.is_unused)
    types = [
        next((t for t, is_kind in zip((2, 3, 6, 5), kinds, strict=True) if is_kind(i)), 1) for i in range(n)
    ]
    path = tmp_path / "codellama.gguf"
    _write_gguf(path, "llama", pieces, scores, types)
    from_gguf = Tokenizer.from_file(path)
    from_model = Tokenizer.from_model_bytes(codellama_model_bytes())
    for t in (from_gguf, from_model):
        assert t.vocab_size == 32016
        assert (t.prefix_id, t.suffix_id, t.middle_id, t.eot_id) == (32007, 32008, 32009, 32010)
    text = "def f(x):\n    return x  # ½ 🦙"
    assert from_gguf.encode(text, bos=True, eos=False) == [1, *ref.encode(text)]


def test_save_writes_a_loadable_model(tok: Tokenizer, tmp_path: Path) -> None:
    out = tok.save(tmp_path / "copy" / "tokenizer.model")
    assert spm.SentencePieceProcessor(model_file=str(out)).encode("Hello world") == [15043, 3186]


# --- long texts are encoded in pieces (issue 9: the server's event loop kept waiting for the GIL) ----
def _random_text(rng: random.Random, length: int) -> str:
    """Words, runs of spaces, newlines, tabs, digits, punctuation, accents, CJK, emoji and a few
    characters the vocabulary lacks (byte fallback), so cuts land next to every kind of neighbour."""
    alphabet = [
        "llama", "the", "Hello", "ab", "x", "1234", "3.14", "!", ",", ".", "?", "'", '"', "(", ")", "-",
        "é", "naïve", "日本語", "🦙", "\u0301", "\t", "\n", "\n\n", " ", "  ", "   ", "_", "▁", "[INST]",
        "<s>", "\x00", "\u200b", "~", "{", "}",
    ]  # fmt: skip
    out: list[str] = []
    size = 0
    while size < length:
        token = rng.choice(alphabet)
        out.append(token)
        size += len(token)
    return "".join(out)[:length]


def test_pieces_are_exactly_one_call_on_many_random_texts(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama2.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 7)  # a cut every few characters
    oracle = reference_sp()
    rng = random.Random(1234)
    cut = 0  # texts cut at least once
    for case in range(600):
        text = _random_text(rng, rng.randrange(1, 400))
        if case % 3 == 0:
            text = " " * rng.randrange(3) + text + " " * rng.randrange(3)  # edge spaces stay in place
        pieces = list(tok.encode_pieces(text))
        cut += len(pieces) > 1
        assert [i for p in pieces for i in p] == oracle.encode(text), repr(text)
        assert tok.encode(text, bos=True, eos=True) == [1, *oracle.encode(text), 2], repr(text)
    assert cut > 250  # the texts really were cut (the short ones often have no cut)


def test_a_long_text_is_encoded_in_64_kib_pieces(tok: Tokenizer) -> None:
    rng = random.Random(7)
    vocabulary = ["llama", "alpaca", "the", "of", "42,", "naïve", "🦙", "日本語."]
    words = [rng.choice(vocabulary) for _ in range(300_000)]
    text = " ".join(words)
    assert len(text) > 1_000_000
    pieces = list(tok.encode_pieces(text))
    assert len(pieces) >= len(text) // (64 * 1024) - 1  # ~64 KiB of text each (a few ms of GIL)
    assert [i for p in pieces for i in p] == reference_sp().encode(text)


def test_a_text_without_a_cut_or_a_piece_spanning_spaces_is_encoded_in_one_call(tok: Tokenizer) -> None:
    assert len(list(tok.encode_pieces("é" * 70_000))) == 1  # no space at all
    assert len(list(tok.encode_pieces("a  " * 30_000))) == 1  # only double spaces: "▁▁" pieces exist
    # A vocabulary with a piece holding "▁" after a letter ("s▁t") could merge across a cut: no cuts.
    spanning = MODEL.read_bytes() + _piece_entry("s▁t", 0.0, 4)  # USER_DEFINED, matched literally
    other = Tokenizer.from_model_bytes(spanning)
    oracle = spm.SentencePieceProcessor(model_proto=spanning)
    text = "this is the test " * 6_000
    assert oracle.encode("is the") != oracle.encode("is") + oracle.encode("the")  # it does span
    assert len(list(other.encode_pieces(text))) == 1
    assert other.encode(text, bos=False, eos=False) == oracle.encode(text)
