"""Fixtures of the corpus/packing tests: a small synthetic corpus and a tokenizer trained on it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama2.train.tokenizer import TokenizerTrainConfig, train_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "that",
    "is",
    "was",
    "he",
    "for",
    "it",
    "with",
    "as",
    "his",
    "on",
    "be",
    "at",
    "by",
    "I",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "her",
    "all",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "Romeo",
    "Juliet",
    "king",
    "queen",
    "lord",
    "lady",
    "thou",
    "thee",
    "thy",
    "hath",
    "doth",
    "naïve",
    "café",
    "“quoted”",
    "—",
    "½",
    "2024",
    "1599",
]


def make_document(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.12:
            lines.append(" ".join(line) + rng.choice([".", ",", "!", "?", ";"]))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PtCorpus:
    root: Path
    folder: Path  # 12 .txt documents (one in a sub-folder)
    jsonl: Path  # 4 documents in the `text` field
    texts: list[str]  # folder documents in sorted-path order
    jsonl_texts: list[str]


@pytest.fixture(scope="session")
def pt_corpus(tmp_path_factory: pytest.TempPathFactory) -> PtCorpus:
    """12 text files in a folder (one with a sub-folder) and a JSONL with 4 documents."""
    root = tmp_path_factory.mktemp("pt_corpus")
    rng = random.Random(0)
    texts: list[str] = []
    folder = root / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        doc = make_document(rng, rng.randint(80, 400))
        path = folder / (f"sub/doc{i:02d}.txt" if i == 5 else f"doc{i:02d}.txt")
        path.write_text(doc, encoding="utf-8")
        texts.append(doc)
    jsonl = root / "docs.jsonl"
    jdocs = [make_document(rng, 60) + " emoji 🙂 and ünïcödé" for _ in range(4)]
    jsonl.write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(jdocs)), encoding="utf-8"
    )
    ordered = [f.read_text(encoding="utf-8") for f in sorted(folder.rglob("*.txt"))]
    return PtCorpus(root, folder, jsonl, ordered, jdocs)


@pytest.fixture(scope="session")
def pt_tokenizer(pt_corpus: PtCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320-piece BPE tokenizer trained on `pt_corpus` with Llama 2's settings."""
    out = tmp_path_factory.mktemp("pt_tok") / "tokenizer.model"
    cfg = TokenizerTrainConfig(data=[str(pt_corpus.folder)], out=out, vocab_size=320)
    return train_tokenizer(cfg)
