"""Fill-in-the-middle examples: exact Code Llama token layout (checked against sentencepiece on a Code
Llama-extended Llama 2 vocabulary), round trip to the document, FIM/SPM rates, batches."""

from __future__ import annotations

import random
import struct
from functools import lru_cache
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama2.data.fim import (
    FIMBatches,
    chunk_source,
    document_example,
    fim_tokens,
    fixed_batches,
    parse_fim,
    reconstruct_document,
    split_document,
    split_files,
)
from llama2.errors import ConfigError, TokenizerError
from llama2.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llama2-tokenizer"
PRE, SUF, MID, EOT = 32007, 32008, 32009, 32010

DOCS = [
    "def add(a, b):\n    c = a + b\n    return c\n",
    'class Point:\n    """A point."""\n\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n',
    "import os\n\nfor name in os.listdir('.'):\n\tprint(name)  # tab   and  spaces\n",
    "x = {'é': 1, '😀': [2, 3]}\nassert x['é'] == 1\n",
]


def _piece(piece: str, piece_type: int) -> bytes:
    # ModelProto.pieces entry: SentencePiece{piece=1, score=2, type=3}; appended entries extend the vocab.
    raw = piece.encode("utf-8")
    body = (
        b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + bytes([piece_type])
    )
    return b"\x0a" + bytes([len(body)]) + body


@lru_cache(maxsize=1)
def codellama_bytes() -> bytes:
    """Llama 2's tokenizer.model plus Code Llama's 16 pieces (ids 32000-32015, infill ones CONTROL)."""
    names = {PRE: "▁<PRE>", SUF: "▁<SUF>", MID: "▁<MID>", EOT: "▁<EOT>"}
    extra = b"".join(
        _piece(names.get(i, f"<extra_{i}>"), 3 if i in names else 5) for i in range(32000, 32016)
    )
    return (FIXTURES / "tokenizer.model").read_bytes() + extra


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_bytes(codellama_bytes(), source="codellama-test")


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=codellama_bytes())


def oracle_infilling(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """codellama's `encode_infilling`: encode "☺" + text and drop the "▁", "☺" tokens."""
    ids: list[int] = sp.encode("☺" + text)
    assert sp.id_to_piece(ids[:2]) == ["▁", "☺"]
    return ids[2:]


def test_psm_layout(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    prefix, middle, suffix = "def add(a, b):\n", "    c = a + b\n", "    return c\n"
    got = fim_tokens(prefix, middle, suffix, tok, suffix_first=False)
    want = [
        1, PRE, *sp.encode(prefix), SUF, *oracle_infilling(sp, suffix), MID,
        *oracle_infilling(sp, middle), EOT,
    ]  # fmt: skip
    assert got == want


def test_spm_layout(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    prefix, middle, suffix = "def add(a, b):\n", "    c = a + b\n", "    return c\n"
    got = fim_tokens(prefix, middle, suffix, tok, suffix_first=True)
    want = [
        1, PRE, SUF, *oracle_infilling(sp, suffix), MID, *sp.encode(prefix),
        *oracle_infilling(sp, middle), EOT,
    ]  # fmt: skip
    assert got == want


def test_parse_cuts_at_sentinels(tok: Tokenizer) -> None:
    ex = fim_tokens("a = 1\n", "b = 2\n", "c = 3\n", tok, suffix_first=False)
    parts = parse_fim(ex, tok)
    assert not parts.suffix_first
    assert tok.decode(parts.prefix) == "a = 1\n"
    assert tok.decode_infilling(parts.middle) == "b = 2\n"
    assert tok.decode_infilling(parts.suffix) == "c = 3\n"
    with pytest.raises(TokenizerError, match="not a FIM example"):
        parse_fim(tok.encode("a = 1", bos=True, eos=True), tok)


@pytest.mark.parametrize("suffix_first", [False, True])
def test_roundtrip_random_cuts(tok: Tokenizer, suffix_first: bool) -> None:
    rng = random.Random(0)
    for doc in DOCS:
        for _ in range(40):
            prefix, middle, suffix = split_document(doc, rng)
            assert prefix + middle + suffix == doc
            ex = fim_tokens(prefix, middle, suffix, tok, suffix_first)
            if suffix_first and not prefix and middle[:1].isspace():
                continue  # documented ambiguity of SPM: empty prefix + middle starting with a space
            assert reconstruct_document(ex, tok) == doc, (prefix, middle, suffix)


def test_document_example_rates(tok: Tokenizer) -> None:
    rng = random.Random(1)
    kinds = {"psm": 0, "spm": 0, "plain": 0}
    n = 1000
    for _ in range(n):
        ex = document_example(DOCS[0], tok, rng, fim_rate=0.9, spm_rate=0.5)
        if ex[1] != PRE:
            assert ex == tok.encode(DOCS[0], bos=True, eos=True)
            kinds["plain"] += 1
        else:
            kinds["spm" if ex[2] == SUF else "psm"] += 1
            assert ex[-1] == EOT
    # binomial: 0.1 * 1000 = 100 +- 9.5; 450 +- 15.7 each
    assert 60 < kinds["plain"] < 140
    assert 380 < kinds["psm"] < 520 and 380 < kinds["spm"] < 520


def test_plain_llama_tokenizer_is_rejected() -> None:
    plain = Tokenizer.from_file(FIXTURES / "tokenizer.model")
    with pytest.raises(TokenizerError, match="infilling pieces"):
        fim_tokens("a", "b", "c", plain, suffix_first=False)


def test_chunk_source() -> None:
    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(200)) + "no newline at end"
    docs = chunk_source(text, 100)
    assert "".join(docs) == text
    assert all(len(d) <= 100 for d in docs)
    assert all(d.endswith("\n") for d in docs[:-1])
    assert chunk_source("y" * 300 + "\nz\n", 100) == ["y" * 300 + "\n", "z\n"]  # a long line stays whole
    with pytest.raises(ConfigError):
        chunk_source("x", 0)


def test_split_files_deterministic_and_disjoint() -> None:
    files = [Path(f"mod_{i}.py") for i in range(200)]
    train, held = split_files(files, 0.1)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200
    assert 8 < len(held) < 35
    assert split_files(list(reversed(files)), 0.1)[1] == list(reversed(held))


def test_batches_shift_resume_and_new_cuts_per_epoch(tok: Tokenizer) -> None:
    docs = DOCS * 5
    batches = FIMBatches(docs, tok, seq_len=32, batch_size=2, seed=3)
    x, y = next(batches)
    assert x.shape == y.shape == (2, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for _ in range(3):
        next(batches)
    state = batches.state_dict()
    want = [next(batches) for _ in range(4)]
    again = FIMBatches(docs, tok, seq_len=32, batch_size=2, seed=3)
    again.load_state_dict(state)
    for (a, b), (c, d) in zip(want, [next(again) for _ in range(4)], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    e0 = FIMBatches(docs, tok, 32, 2, seed=3)._epoch_rows()
    nxt = FIMBatches(docs, tok, 32, 2, seed=3)
    nxt.epoch = 1
    assert not torch.equal(e0[: min(len(e0), 4)], nxt._epoch_rows()[: min(len(e0), 4)])
    val = fixed_batches(docs, tok, 32, 2)
    assert val and all(v[0].shape == (2, 32) for v in val)


def test_infill_eval_cases(tmp_path: Path, tok: Tokenizer) -> None:
    from llama2.eval.infill_eval import (
        first_unit,
        make_cases,
        make_identifier_cases,
        most_frequent_identifier,
        most_frequent_line,
        unigram_logprobs,
    )

    files = []
    for k in range(3):
        p = tmp_path / f"m{k}.py"
        p.write_text(
            "".join(f"def f{k}_{i}(x):\n    return x + {i}\n\n" for i in range(30)), encoding="utf-8"
        )
        files.append(p)
    cases = make_cases(files, 20, seed=4, context_chars=80)
    assert cases == make_cases(files, 20, seed=4, context_chars=80)
    for c in cases:
        text = (tmp_path / c.file).read_text(encoding="utf-8")
        lines = text.splitlines()
        assert c.middle == lines[c.line_no - 1]  # the hole is one whole line, without its newline
        assert c.prefix + c.middle + c.suffix in text
        assert text.index(c.prefix + c.middle + c.suffix) + len(c.prefix) == len(
            "".join(line + "\n" for line in lines[: c.line_no - 1])
        )
        assert len(c.prefix) <= 80 and c.suffix.startswith("\n")
    assert most_frequent_line(files) in {f"return x + {i}" for i in range(30)}
    logp = unigram_logprobs(files, tok)
    assert logp.shape == (tok.vocab_size,)
    assert abs(float(logp.double().exp().sum()) - 1.0) < 1e-4
    ids = make_identifier_cases(files, 25, seed=1, context_chars=60)
    for c in ids:
        text = (tmp_path / c.file).read_text(encoding="utf-8")
        assert c.prefix + c.middle + c.suffix in text
        assert c.middle.isidentifier() and len(c.middle) >= 2
        assert c.middle in text.splitlines()[c.line_no - 1]
        assert not c.prefix[-1:].isalnum() and not c.suffix[:1].isalnum()  # the whole identifier
    assert most_frequent_identifier(files) in {"def", "return", "x"}
    assert first_unit("  self.x = 1\nfoo", "identifier") == "self"
    assert first_unit("  self.x = 1\nfoo", "line") == "self.x = 1"
