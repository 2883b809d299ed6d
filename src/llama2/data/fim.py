"""Fill-in-the-middle (FIM) training data, Code Llama's objective (Rozière et al. 2023, sec. 2.3).

A fraction `fim_rate` of documents is split at two uniformly random character positions into
prefix / middle / suffix and laid out exactly like codellama's `infilling_prompt_tokens`
(`llama2.infill.encode_infill`) followed by the middle and `▁<EOT>`:

    PSM:  <s> ▁<PRE> enc(prefix) ▁<SUF> enc_infill(suffix) ▁<MID> enc_infill(middle) ▁<EOT>
    SPM:  <s> ▁<PRE> ▁<SUF> enc_infill(suffix) ▁<MID> enc(prefix) enc_infill(middle) ▁<EOT>

half of them PSM and half SPM (`spm_rate`). `enc` is the ordinary encoding (with SentencePiece's
implicit leading space); `enc_infill` encodes without it, so prefix + middle + suffix pieces spell the
document exactly. The other documents are plain `<s> enc(doc) </s>`. The split is drawn afresh for
every epoch (a new seed per epoch), so the model sees many different holes in each file.

Training examples are concatenated into one token stream and cut into rows of `seq_len + 1` tokens
(inputs = row[:-1], targets = row[1:]), as in pretraining: an example may continue into the next row
and attention may cross example boundaries (the model sees a causal mask only); every example starts
with `<s>`, which marks the boundary.

Source files are cut into documents of at most `max_chars` characters at line boundaries (whole
files are longer than a small model's context; a document that fits the context lets the model see the
whole prefix and suffix).
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2.errors import ConfigError, TokenizerError
from llama2.infill import encode_infill, infill_ids
from llama2.tokenizer import Tokenizer


@dataclass(frozen=True)
class FIMParts:
    """The token ids of one FIM example, cut at its sentinels."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    suffix_first: bool  # True for SPM, False for PSM


def split_document(doc: str, rng: random.Random) -> tuple[str, str, str]:
    """Cut `doc` at two uniformly random character positions into (prefix, middle, suffix)."""
    i, j = sorted((rng.randint(0, len(doc)), rng.randint(0, len(doc))))
    return doc[:i], doc[i:j], doc[j:]


def fim_tokens(prefix: str, middle: str, suffix: str, tokenizer: Tokenizer, suffix_first: bool) -> list[int]:
    """One FIM training example: `encode_infill(prefix, suffix)` + the middle + `▁<EOT>`."""
    _, _, _, eot = infill_ids(tokenizer)
    prompt = encode_infill(prefix, suffix, tokenizer, suffix_first=suffix_first)
    return [*prompt, *tokenizer.encode_infilling(middle), eot]


def document_example(
    doc: str, tokenizer: Tokenizer, rng: random.Random, fim_rate: float = 0.9, spm_rate: float = 0.5
) -> list[int]:
    """A training example for `doc`: FIM with probability `fim_rate` (SPM with probability
    `spm_rate` among those), else the plain document `<s> doc </s>`."""
    if rng.random() < fim_rate:
        prefix, middle, suffix = split_document(doc, rng)
        return fim_tokens(prefix, middle, suffix, tokenizer, suffix_first=rng.random() < spm_rate)
    return tokenizer.encode(doc, bos=True, eos=True)


def parse_fim(tokens: Sequence[int], tokenizer: Tokenizer) -> FIMParts:
    """Cut a FIM example (as made by `fim_tokens`) back into prefix / middle / suffix token ids.

    Raises:
        TokenizerError: `tokens` is not laid out as a PSM or SPM example.
    """
    pre, suf, mid, eot = infill_ids(tokenizer)
    toks = list(tokens)
    bad = TokenizerError(
        "not a FIM example: expected <s> ▁<PRE> ... ▁<SUF> ... ▁<MID> ... ▁<EOT> (PSM) or "
        "<s> ▁<PRE> ▁<SUF> ... ▁<MID> ... ▁<EOT> (SPM)"
    )
    if len(toks) < 5 or toks[0] != tokenizer.bos_id or toks[1] != pre or toks[-1] != eot:
        raise bad
    body = toks[2:-1]
    if body.count(suf) != 1 or body.count(mid) != 1:
        raise bad
    s, m = body.index(suf), body.index(mid)
    if s == 0:  # SPM: ▁<SUF> suffix ▁<MID> prefix+middle (cannot tell the prefix/middle cut apart
        # from the ids alone, so the whole tail is reported as the middle and the prefix as empty)
        if m < s:
            raise bad
        return FIMParts(prefix=[], middle=body[m + 1 :], suffix=body[s + 1 : m], suffix_first=True)
    if not s < m:
        raise bad
    return FIMParts(prefix=body[:s], middle=body[m + 1 :], suffix=body[s + 1 : m], suffix_first=False)


def reconstruct_document(tokens: Sequence[int], tokenizer: Tokenizer) -> str:
    """The document a FIM example was made from: prefix + middle + suffix.

    The prefix was encoded with `encode` (SentencePiece's dummy-prefix space, which `decode` removes),
    the middle and suffix with `encode_infilling` (decoded with `decode_infilling`, which keeps a
    leading space). In SPM the prefix/middle cut is not visible in the ids; the one case this cannot
    tell apart is an empty prefix followed by a middle that starts with a space.
    """
    parts = parse_fim(tokens, tokenizer)
    if parts.suffix_first:
        return tokenizer.decode(parts.middle) + tokenizer.decode_infilling(parts.suffix)
    return (
        tokenizer.decode(parts.prefix)
        + tokenizer.decode_infilling(parts.middle)
        + tokenizer.decode_infilling(parts.suffix)
    )


# ------------------------------------------------------------------------------------- documents
def default_source_dir() -> Path:
    """The running interpreter's standard library folder (e.g. .../lib/python3.11)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path | str, pattern: str = "*.py") -> list[Path]:
    """The files matching `pattern` directly under `root`, sorted by name (deterministic)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"source folder {root} does not exist; expected a folder of Python files")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ConfigError(f"no files matching {pattern!r} under {root}")
    return files


def is_heldout_file(path: Path, heldout_fraction: float = 0.1) -> bool:
    """Held-out (validation) membership of a source file, decided by the SHA-256 of its name."""
    h = int.from_bytes(hashlib.sha256(path.name.encode("utf-8")).digest()[:8], "big")
    return h % 10_000 < round(heldout_fraction * 10_000)


def split_files(files: Sequence[Path], heldout_fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files), by `is_heldout_file`."""
    train = [p for p in files if not is_heldout_file(p, heldout_fraction)]
    held = [p for p in files if is_heldout_file(p, heldout_fraction)]
    if not train or not held:
        raise ConfigError(f"splitting {len(files)} files left an empty train or held-out set")
    return train, held


def utf8_files(files: Sequence[Path]) -> list[Path]:
    """The files that decode as UTF-8 (a few legacy files may not)."""
    out = []
    for p in files:
        try:
            p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        out.append(p)
    return out


def source_splits(
    root: Path | str, pattern: str = "*.py", heldout_fraction: float = 0.1
) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) among the UTF-8 files matching `pattern` under `root`;
    deterministic (sorted names, held-out by name hash)."""
    return split_files(utf8_files(python_files(root, pattern)), heldout_fraction)


def chunk_source(text: str, max_chars: int) -> list[str]:
    """Cut `text` into consecutive documents of at most `max_chars` characters at line boundaries
    (a single longer line becomes its own document). Concatenating the documents gives `text`."""
    if max_chars <= 0:
        raise ConfigError(f"max_chars must be positive, got {max_chars}")
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            docs.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        docs.append("".join(cur))
    return docs


def read_documents(files: Sequence[Path], max_chars: int) -> list[str]:
    """All files' documents (`chunk_source`), in file order; blank-only documents dropped."""
    docs: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d for d in chunk_source(text, max_chars) if d.strip()]
    return docs


# --------------------------------------------------------------------------------------- batches
def epoch_stream(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    seed: int,
    epoch: int,
    fim_rate: float = 0.9,
    spm_rate: float = 0.5,
    shuffle: bool = True,
) -> list[int]:
    """The concatenated training examples of one epoch (document order and FIM cuts from
    `(seed, epoch)`)."""
    rng = random.Random(f"fim/{seed}/{epoch}")
    order = list(range(len(docs)))
    if shuffle:
        rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += document_example(docs[i], tokenizer, rng, fim_rate, spm_rate)
    return stream


def stream_rows(stream: Sequence[int], seq_len: int) -> Tensor:
    """Cut a token stream into (N, seq_len + 1) rows (rows overlap by one token so that every
    token is a target once); the incomplete tail is dropped."""
    t = torch.tensor(stream, dtype=torch.long)
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        raise ConfigError(f"only {len(stream)} tokens; need more than seq_len={seq_len}")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # (N, T+1)
    return t[idx]


class FIMBatches:
    """Endless, resumable (inputs, targets) micro-batches of FIM examples; a new FIM draw and document
    order every epoch. Satisfies `llama2.train.loop.ResumableBatches`."""

    def __init__(
        self,
        docs: Sequence[str],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        fim_rate: float = 0.9,
        spm_rate: float = 0.5,
    ) -> None:
        if not 0.0 <= fim_rate <= 1.0 or not 0.0 <= spm_rate <= 1.0:
            raise ConfigError(f"fim_rate and spm_rate must be in [0, 1], got {fim_rate}, {spm_rate}")
        self.docs, self.tokenizer = list(docs), tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.fim_rate, self.spm_rate = fim_rate, spm_rate
        self.epoch, self.row = 0, 0
        self._rows: Tensor | None = None

    def _epoch_rows(self) -> Tensor:
        if self._rows is None:
            stream = epoch_stream(
                self.docs, self.tokenizer, self.seed, self.epoch, self.fim_rate, self.spm_rate
            )
            rows = stream_rows(stream, self.seq_len)  # (N, T+1)
            if rows.shape[0] < self.batch_size:
                raise ConfigError(
                    f"an epoch has {rows.shape[0]} rows, fewer than batch_size {self.batch_size}"
                )
            self._rows = rows
        return self._rows

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        rows = self._epoch_rows()
        if self.row + self.batch_size > rows.shape[0]:
            self.epoch, self.row, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        batch = rows[self.row : self.row + self.batch_size]  # (B, T+1)
        self.row += self.batch_size
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None


def fixed_batches(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    fim_rate: float = 0.9,
    spm_rate: float = 0.5,
) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of validation batches (one FIM draw, documents in order)."""
    stream = epoch_stream(docs, tokenizer, seed, 0, fim_rate, spm_rate, shuffle=False)
    rows = stream_rows(stream, seq_len)  # (N, T+1)
    return [
        (rows[i : i + batch_size, :-1].contiguous(), rows[i : i + batch_size, 1:].contiguous())
        for i in range(0, rows.shape[0] - batch_size + 1, batch_size)
    ]
