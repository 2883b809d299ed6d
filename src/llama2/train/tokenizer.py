"""Train a SentencePiece BPE tokenizer with Llama 2's settings.

Llama 2's `tokenizer.model` records its trainer spec; we copy the settings that shape the vocabulary:
BPE, byte fallback (unknown characters become `<0xNN>` byte pieces), digits split one per piece,
identity normalisation (text is not NFKC-normalised), a dummy-prefix space, whitespace-only pieces
allowed, extra whitespace kept, ids unk=0, bos=1, eos=2, no pad piece (-1). Training sees every line
of the corpus (no sentence sampling) and runs single-threaded by default, so the same corpus and
settings give the same model bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llama2.checkpoint.save import atomic_write
from llama2.data.corpus import iter_corpus
from llama2.errors import ConfigError

# sentencepiece skips sentences longer than this (bytes); Llama 2 used 4192.
MAX_SENTENCE_LENGTH = 4192
CODE_LLAMA_INFILL_PIECES = ("▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>")


@dataclass
class TokenizerTrainConfig:
    """`llama2 train tokenizer`: SentencePiece BPE with Llama 2's settings."""

    data: list[str] = field(
        default_factory=list, metadata={"help": "text files, folders, globs or JSONL files"}
    )
    out: Path = field(default=Path("tokenizer.model"), metadata={"help": "where to write the model"})
    vocab_size: int = 4096
    character_coverage: float = field(
        default=0.99995, metadata={"help": "Llama 2's value; rarer characters fall back to bytes"}
    )
    user_defined_symbols: list[str] = field(
        default_factory=list, metadata={"help": "always one piece, matched in text"}
    )
    control_symbols: list[str] = field(
        default_factory=list, metadata={"help": "reserved ids, never produced by encode"}
    )
    infill_pieces: bool = field(
        default=False,
        metadata={"help": "add Code Llama's ▁<PRE> ▁<MID> ▁<SUF> ▁<EOT> as user-defined pieces"},
    )
    text_field: str = field(default="text", metadata={"help": "JSONL field with the document text"})
    num_threads: int = field(default=1, metadata={"help": "1 keeps training reproducible"})
    seed: int = 0


def _sentences(cfg: TokenizerTrainConfig) -> Iterator[str]:
    """Every non-empty line of every document (SentencePiece trains on lines)."""
    for doc in iter_corpus(cfg.data, cfg.text_field):
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            if line.strip():
                yield line


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train the tokenizer described by `cfg` and write it to `cfg.out`.

    Returns:
        The path of the written `tokenizer.model`.
    """
    import sentencepiece as spm

    if not cfg.data:
        raise ConfigError("no training data given; expected at least one file, folder or glob in `data`")
    min_vocab = 3 + 256 + len(cfg.user_defined_symbols) + len(cfg.control_symbols) + 1
    if cfg.vocab_size < min_vocab:
        raise ConfigError(
            f"vocab_size {cfg.vocab_size} is too small: byte fallback alone needs 256 pieces plus "
            f"3 specials and the extra pieces; expected at least {min_vocab}"
        )
    user = list(cfg.user_defined_symbols)
    if cfg.infill_pieces:
        user += [p for p in CODE_LLAMA_INFILL_PIECES if p not in user]
    spm.set_random_generator_seed(cfg.seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(cfg),
            model_writer=buf,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            split_digits=True,
            split_by_unicode_script=True,
            split_by_number=True,
            split_by_whitespace=True,
            treat_whitespace_as_suffix=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            unk_surface=" \u2047 ",
            max_sentence_length=MAX_SENTENCE_LENGTH,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=cfg.num_threads,
            num_sub_iterations=2,
            hard_vocab_limit=True,
            vocabulary_output_piece_score=True,
            user_defined_symbols=user,
            control_symbols=list(cfg.control_symbols),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(f"SentencePiece training failed: {e}") from None
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_bytes(buf.getvalue())

    atomic_write(out, write)
    return out
