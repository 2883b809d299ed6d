"""Supervised fine-tuning data: chat dialogs -> Llama 2-Chat tokens with a loss mask -> packed rows.

Input: JSONL, one dialog per line, `{"messages": [{"role": "system"|"user"|"assistant", "content": ...},
...]}` (an optional system message, then user/assistant turns alternating, ending with the assistant).
Each dialog is encoded with exactly the chat format of `llama2.chat.encode_dialog_for_training`
(`<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>` per pair); the loss mask is True only on
the assistant answers' tokens (with the `▁` and EOS that close each answer) of every turn, so every
system and user token is masked out (Llama 2 paper, sec. 3.1: "we zero-out the loss on tokens from
the user prompt").

Packing (the choice made here): several whole dialogs are concatenated into one row of `seq_len`
positions, like Llama 2 pretraining packing and the paper's SFT ("all the prompts and answers from the
training set are concatenated"). There is no document mask: causal attention may look back into an
earlier dialog of the same row; each dialog starts with `<s>`, which marks the boundary. A dialog is
never split across rows; one longer than a row is cut to the row length (counted in `PackStats`). The
tail of a row is padding (`pad_id`, masked). Within a dialog, position i's target is token i+1 and it
counts in the loss iff token i+1 is an answer token; no target crosses from one dialog into the next.

A batch is `(inputs, targets, loss_mask)`: (B, T) int64, (B, T) int64, (B, T) bool. Masked targets
keep their real token ids (so a test can show they do not matter); `sft_loss` reads only the mask.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.chat import Dialog, Message, encode_dialog_for_training
from llama2.errors import ConfigError, DialogError
from llama2.tokenizer import Tokenizer

SFTBatch = tuple[Tensor, Tensor, Tensor]  # inputs (B, T), targets (B, T), loss_mask (B, T) bool


@dataclass(frozen=True)
class SFTExample:
    """One encoded dialog: `tokens[i]` and whether it is an answer token (`mask[i]`)."""

    tokens: list[int]
    mask: list[bool]


@dataclass
class PackStats:
    """What packing did: rows made, dialogs packed, dialogs cut to the row length, supervised tokens."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    supervised_tokens: int = 0
    positions: int = 0  # rows * seq_len
    real_tokens: int = 0  # positions holding dialog tokens (not padding)

    @property
    def fill(self) -> float:
        """Share of row positions holding real (non-padding) tokens."""
        return 0.0 if self.positions == 0 else self.real_tokens / self.positions


# -------------------------------------------------------------------------------------- reading
def load_dialogs(path: Path | str) -> list[Dialog]:
    """Read a JSONL file of `{"messages": [...]}` objects (other keys are ignored).

    Raises:
        DialogError: a line is not JSON, lacks `messages`, or a message lacks role/content; the
            message names the file and line.
        ConfigError: the file does not exist or holds no dialogs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"SFT data file {path} does not exist; expected a JSONL file of dialogs")
    dialogs: list[Dialog] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DialogError(f"{path}:{lineno}: invalid JSON ({e})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise DialogError(
                    f'{path}:{lineno}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}'
                )
            dialog: Dialog = []
            for j, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    raise DialogError(f"{path}:{lineno}: message {j} needs a 'role' and a string 'content'")
                if m.get("role") not in ("system", "user", "assistant"):
                    raise DialogError(
                        f"{path}:{lineno}: message {j} has role {m.get('role')!r}; "
                        "expected system, user or assistant"
                    )
                msg: Message = {"role": m["role"], "content": m["content"]}
                dialog.append(msg)
            dialogs.append(dialog)
    if not dialogs:
        raise ConfigError(f"SFT data file {path} holds no dialogs")
    return dialogs


def encode_examples(
    dialogs: Sequence[Dialog], tokenizer: Tokenizer, *, loss_turns: str = "all"
) -> list[SFTExample]:
    """Encode dialogs with `encode_dialog_for_training` (Meta's chat format + answer-token mask).

    `loss_turns="last"` trains only each dialog's last answer (Ghost Attention, see `llama2.chat`).

    Raises:
        DialogError: a dialog is malformed (names its index), or `loss_turns` is not "all"/"last".
    """
    out = []
    for i, dialog in enumerate(dialogs):
        try:
            tokens, mask = encode_dialog_for_training(dialog, tokenizer, loss_turns=loss_turns)
        except DialogError as e:
            raise DialogError(f"dialog {i}: {e}") from None
        out.append(SFTExample(tokens, mask))
    return out


# -------------------------------------------------------------------------------------- packing
def pack_examples(
    examples: Sequence[SFTExample], seq_len: int, pad_id: int = 0
) -> tuple[SFTBatch, PackStats]:
    """Pack examples, in the given order, into rows of `seq_len` positions (see the module docstring).

    Returns:
        `((inputs, targets, loss_mask), stats)`: (N, seq_len) int64, int64, bool tensors.
    """
    if seq_len <= 1:
        raise ConfigError(f"seq_len must be > 1, got {seq_len}")
    stats = PackStats()
    rows_in: list[list[int]] = []
    rows_tg: list[list[int]] = []
    rows_mk: list[list[bool]] = []
    cur_in: list[int] = []
    cur_tg: list[int] = []
    cur_mk: list[bool] = []

    def close_row() -> None:
        n_pad = seq_len - len(cur_in)
        stats.real_tokens += len(cur_in)
        rows_in.append(cur_in + [pad_id] * n_pad)
        rows_tg.append(cur_tg + [pad_id] * n_pad)
        rows_mk.append(cur_mk + [False] * n_pad)

    for ex in examples:
        if len(ex.tokens) < 2:
            continue
        inp, tgt, msk = ex.tokens[:-1], ex.tokens[1:], ex.mask[1:]  # position i predicts token i+1
        if len(inp) > seq_len:
            inp, tgt, msk = inp[:seq_len], tgt[:seq_len], msk[:seq_len]
            stats.truncated += 1
        if len(cur_in) + len(inp) > seq_len:
            close_row()
            cur_in, cur_tg, cur_mk = [], [], []
        cur_in += inp
        cur_tg += tgt
        cur_mk += msk
        stats.examples += 1
        stats.supervised_tokens += sum(msk)
    if cur_in:
        close_row()
    stats.rows = len(rows_in)
    stats.positions = stats.rows * seq_len
    if not rows_in:
        raise ConfigError("no SFT examples to pack (every dialog was empty)")
    batch = (
        torch.tensor(rows_in, dtype=torch.long),  # (N, T)
        torch.tensor(rows_tg, dtype=torch.long),  # (N, T)
        torch.tensor(rows_mk, dtype=torch.bool),  # (N, T)
    )
    return batch, stats


def sft_loss(model: nn.Module, batch: SFTBatch) -> Tensor:
    """Mean next-token cross-entropy over the answer tokens only (nats/token).

    The targets at masked positions do not enter the loss (nor its gradient) at all.
    """
    inputs, targets, mask = batch  # (B, T) each
    logits = model(inputs)  # (B, T, V) float32
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*T,)
    m = mask.flatten().to(nll.dtype)  # (B*T,)
    return (nll * m).sum() / m.sum().clamp(min=1.0)


def supervised_tokens(batch: SFTBatch) -> int:
    """Number of answer tokens (loss positions) in a batch."""
    return int(batch[2].sum().item())


class SFTBatches:
    """Endless, resumable micro-batches of packed SFT rows; dialogs are shuffled and re-packed at
    every epoch (a seeded order per epoch). Satisfies `llama2.train.loop.ResumableBatches`."""

    def __init__(
        self, examples: Sequence[SFTExample], seq_len: int, batch_size: int, seed: int = 0, pad_id: int = 0
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if not examples:
            raise ConfigError("no SFT examples; expected at least one dialog")
        self.examples = list(examples)
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.epoch, self.row = 0, 0
        self._rows: SFTBatch | None = None
        self.stats: PackStats | None = None

    def _epoch_rows(self) -> SFTBatch:
        if self._rows is None:
            order = list(range(len(self.examples)))
            random.Random(f"sft/{self.seed}/{self.epoch}").shuffle(order)
            rows, self.stats = pack_examples([self.examples[i] for i in order], self.seq_len, self.pad_id)
            self._rows = rows
        return self._rows

    def __iter__(self) -> Iterator[SFTBatch]:
        return self

    def __next__(self) -> SFTBatch:
        rows = self._epoch_rows()
        n = rows[0].shape[0]
        if self.row >= n:
            self.epoch, self.row, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
            n = rows[0].shape[0]
        sl = slice(self.row, min(self.row + self.batch_size, n))  # the last batch of an epoch may be short
        self.row = sl.stop
        return rows[0][sl], rows[1][sl], rows[2][sl]

    @property
    def rows_per_epoch(self) -> int:
        return int(self._epoch_rows()[0].shape[0])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None


def fixed_sft_batches(
    examples: Sequence[SFTExample], seq_len: int, batch_size: int, pad_id: int = 0
) -> list[SFTBatch]:
    """Validation batches: the examples packed once, in order."""
    (inp, tgt, msk), _ = pack_examples(examples, seq_len, pad_id)
    return [
        (inp[i : i + batch_size], tgt[i : i + batch_size], msk[i : i + batch_size])
        for i in range(0, inp.shape[0], batch_size)
    ]
