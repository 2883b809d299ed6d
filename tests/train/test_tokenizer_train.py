"""Tokenizer training: Llama 2's settings, checked side by side with the real Llama 2 tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from llama2.errors import ConfigError
from llama2.tokenizer import Tokenizer
from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer

_TEXT = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have "
    "they which one you were her all she there would their we him been has when who will more no if out "
    "thou thee thy hath doth Romeo Juliet king queen lord lady 1599 42"
)
WORDS = _TEXT.split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok_corpus")
    rng = random.Random(1)
    for i in range(6):
        lines = []
        for _ in range(150):
            indent = "    " if rng.random() < 0.3 else ""
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".")
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=out, vocab_size=360))


def _pair(trained: Path, llama2_tokenizer_dir: Path) -> list[spm.SentencePieceProcessor]:
    return [
        spm.SentencePieceProcessor(model_file=str(trained)),
        spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model")),
    ]


def test_deterministic(corpus: Path, trained: Path, tmp_path: Path) -> None:
    again = train_tokenizer(
        TokenizerTrainConfig(data=[str(corpus)], out=tmp_path / "t.model", vocab_size=360)
    )
    assert again.read_bytes() == trained.read_bytes()


def test_special_and_byte_pieces_match_llama2(trained: Path, llama2_tokenizer_dir: Path) -> None:
    ours, llama = _pair(trained, llama2_tokenizer_dir)
    assert ours.vocab_size() == 360
    for sp in (ours, llama):
        assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    # ids 0..258: <unk> <s> </s> <0x00> ... <0xFF>, the same layout as Llama 2
    assert [ours.id_to_piece(i) for i in range(259)] == [llama.id_to_piece(i) for i in range(259)]
    assert all(ours.is_byte(i) for i in range(3, 259)) and ours.is_control(1) and ours.is_unknown(0)


@pytest.mark.parametrize(
    "text",
    [
        "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature ① é",  # identity normalisation: NFKC would rewrite these
        "emoji 🙂 and 漢字",  # byte fallback
        "two  spaces,\n\n  a blank line\tand a tab ",  # extra whitespace kept
        " leading space",
    ],
)
def test_round_trip_like_llama2(trained: Path, llama2_tokenizer_dir: Path, text: str) -> None:
    for sp in _pair(trained, llama2_tokenizer_dir):
        assert sp.decode(sp.encode(text)) == text


def test_settings_behave_like_llama2(trained: Path, llama2_tokenizer_dir: Path) -> None:
    for sp in _pair(trained, llama2_tokenizer_dir):
        pieces = sp.encode("In 1599 and 20240 thou", out_type=str)
        assert pieces[0].startswith("▁")  # add_dummy_prefix
        text_pieces = [p for p in pieces if not p.startswith("<0x")]
        assert all(sum(c.isdigit() for c in p) <= 1 for p in text_pieces)  # split_digits
        digits = [chr(int(p[3:5], 16)) if p.startswith("<0x") else p for p in pieces if p != "▁"]
        assert [d for d in digits if d.isdigit()] == list("159920240")
        emoji = sp.encode("🙂", out_type=str)
        assert emoji[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback
    ours = spm.SentencePieceProcessor(model_file=str(trained))
    # allow_whitespace_only_pieces: the indentation runs became pieces
    assert any(set(ours.id_to_piece(i)) == {"▁"} and len(ours.id_to_piece(i)) > 1 for i in range(360))


def test_extra_pieces(corpus: Path, tmp_path: Path) -> None:
    cfg = TokenizerTrainConfig(
        data=[str(corpus)],
        out=tmp_path / "code.model",
        vocab_size=370,
        infill_pieces=True,
        control_symbols=["<ctl>"],
    )
    tok = Tokenizer.from_file(train_tokenizer(cfg))
    ids = [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id]
    assert None not in ids and len(set(ids)) == 4
    assert [tok.id_to_piece(i) for i in ids if i is not None] == ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    assert tok.encode("<PRE>", bos=False, eos=False) == [tok.prefix_id]  # user-defined: matched in text
    ctl = tok.piece_to_id("<ctl>")
    assert ctl not in tok.encode("<ctl>", bos=False, eos=False)  # control: never produced by encode


def test_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=tmp_path / "a.model", vocab_size=100))
    with pytest.raises(ConfigError, match="no training data"):
        train_tokenizer(TokenizerTrainConfig(out=tmp_path / "b.model"))
    with pytest.raises(ConfigError, match="matched no files"):
        train_tokenizer(TokenizerTrainConfig(data=[str(tmp_path / "nope*")], out=tmp_path / "c.model"))
