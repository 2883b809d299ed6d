"""Perplexity of a model on held-out text: `llama2 eval perplexity --model M --data FILE`.

Windowing (the same as pretraining's validation loss, so the two numbers agree):
  1. every document of `data` (a text file is one document, a JSONL line's `text` is one; folders and
     globs expand in sorted order) is tokenized as `[BOS] tokens [EOS]`, documents back to back —
     or the tokens are read from one of our token files;
  2. the stream is cut into non-overlapping windows of `seq_len + 1` tokens starting every `seq_len`
     tokens (window i = stream[i*seq_len : i*seq_len + seq_len + 1]); the tail shorter than a full
     window is dropped;
  3. each window's first `seq_len` tokens are the input and the next-token targets are its last
     `seq_len` tokens, so each target is predicted from the window's preceding tokens only (at most
     `seq_len - 1` of them, no context carried across windows);
  4. mean NLL = sum of target negative log-likelihoods (nats) / number of targets; perplexity =
     exp(mean NLL).
`seq_len` defaults to the model's context window (`max_seq_len` of its params.json).

With `chat=True` the data is JSONL dialogs (`{"messages": [...]}` ending with an assistant turn, as
SFT reads them): each dialog is encoded alone in the Llama 2-Chat format
(`llama2.chat.encode_dialog_for_training`) and only the assistant answers' tokens (with the `</s>`
closing each answer) are scored, exactly the tokens the SFT loss trains on. The result is the mean
NLL per answer token; a window is one dialog.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llama2.data.corpus import TokenFile, is_token_file, load_encoder, tokenize_documents
from llama2.data.packing import PackedSequences
from llama2.errors import ConfigError


@dataclass
class PerplexityConfig:
    """`llama2 eval perplexity`: mean NLL per token and perplexity of a model on a text."""

    model: str = field(
        default="base", metadata={"help": "checkpoint path or embedded model name (base, chat, code)"}
    )
    data: list[str] = field(
        default_factory=list, metadata={"help": "text/JSONL files, folders, globs, or one token file"}
    )
    seq_len: int = field(default=0, metadata={"help": "window length; 0: the model's max_seq_len"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    max_windows: int = field(default=0, metadata={"help": "evaluate only the first N windows (0: all)"})
    dtype: str = field(
        default="float32", metadata={"help": "compute dtype: float32 | bfloat16 | float16 | auto (as stored)"}
    )
    device: str = "cpu"
    quantize: str | None = None  # quantize while loading: int8 | int4 | nf4 | q8_0 | q4_0 | q4_k[,options]
    text_field: str = field(default="text", metadata={"help": "JSONL field with the document text"})
    tokenizer: Path | None = field(
        default=None, metadata={"help": "default: the tokenizer.model next to the weights"}
    )
    chat: bool = field(
        default=False,
        metadata={"help": "data is JSONL dialogs; score only assistant-answer tokens, one dialog at a time"},
    )


@dataclass
class PerplexityResult:
    """Result of `run_perplexity`."""

    nll: float  # mean negative log-likelihood per target token (nats)
    perplexity: float
    n_tokens: int  # targets scored
    n_windows: int
    seq_len: int
    seconds: float


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, windows: PackedSequences, batch_size: int, max_windows: int = 0
) -> tuple[float, int]:
    """Sum of target NLLs and number of targets over `windows` (see the module docstring)."""
    n = len(windows) if max_windows <= 0 else min(max_windows, len(windows))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for a in range(0, n, batch_size):
        inputs, targets = windows.batch(range(a, min(n, a + batch_size)))  # (B, T) each
        logits = model(inputs.to(device))  # (B, T, V) float32
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum")
        total += float(nll.item())
        count += targets.numel()
    return total, count


@torch.no_grad()
def dialog_nll(
    model: torch.nn.Module, dialogs: list[tuple[list[int], list[bool]]], max_len: int
) -> tuple[float, int]:
    """Sum of NLLs over the masked (assistant-answer) targets of each (tokens, loss_mask) dialog."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for tokens, mask in dialogs:
        if len(tokens) > max_len + 1:
            raise ConfigError(f"a dialog of {len(tokens)} tokens is longer than the window of {max_len + 1}")
        ids = torch.tensor(tokens, device=device)
        logits = model(ids[None, :-1])[0]  # (T, V)
        keep = torch.tensor(mask[1:], device=device)  # (T,) targets that carry the SFT loss
        nll = F.cross_entropy(logits[keep].float(), ids[1:][keep], reduction="sum")
        total += float(nll.item())
        count += int(keep.sum().item())
    return total, count


def _read_dialogs(paths: list[str], tok_path: Path) -> list[tuple[list[int], list[bool]]]:
    from llama2.chat import encode_dialog_for_training
    from llama2.data.sft import load_dialogs
    from llama2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tok_path)
    return [
        encode_dialog_for_training(dialog, tokenizer) for path in paths for dialog in load_dialogs(Path(path))
    ]


def run_perplexity(cfg: PerplexityConfig) -> PerplexityResult:
    """Load `cfg.model`, score `cfg.data` and print/return the mean NLL and perplexity.

    Returns:
        A `PerplexityResult`.

    Raises:
        ConfigError: no data, or the data is shorter than one window.
        CheckpointError: the model cannot be found or read.
        TokenizerError: the data is text and no tokenizer was given or found.
    """
    from llama2.assets import resolve_model
    from llama2.checkpoint.load import load_model
    from llama2.checkpoint.tokenizer_path import require_tokenizer

    if not cfg.data:
        raise ConfigError("no data given; expected --data with a text/JSONL file, folder, glob or token file")
    if cfg.batch_size <= 0 or cfg.seq_len < 0 or cfg.max_windows < 0:
        raise ConfigError("batch_size must be positive and seq_len/max_windows >= 0")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
    if cfg.dtype not in dtypes:
        raise ConfigError(f"dtype must be one of {', '.join(dtypes)}, got {cfg.dtype!r}")
    t0 = time.perf_counter()
    loaded = load_model(
        resolve_model(cfg.model),
        device=cfg.device,
        dtype=dtypes[cfg.dtype],
        progress=False,
        quantize=cfg.quantize,
    )
    model = loaded.model
    seq_len = cfg.seq_len or loaded.args.max_seq_len
    def tok_path() -> Path:  # only text needs one: a token file is already tokenized
        return require_tokenizer(loaded.tokenizer_path, cfg.tokenizer, cfg.model, "pass --tokenizer PATH")

    if cfg.chat:
        dialogs = _read_dialogs(cfg.data, tok_path())
        if cfg.max_windows:
            dialogs = dialogs[: cfg.max_windows]
        total, count = dialog_nll(model, dialogs, seq_len)
        if count == 0:
            raise ConfigError("the dialogs have no assistant answers to score")
        return _report(total, count, len(dialogs), seq_len, t0, "dialogs")
    first = Path(cfg.data[0])
    if len(cfg.data) == 1 and first.is_file() and is_token_file(first):
        tokens = TokenFile(first)
        if tokens.vocab_size != loaded.args.vocab_size:
            raise ConfigError(
                f"{first}: tokenized with a {tokens.vocab_size}-piece vocabulary, but the model has "
                f"{loaded.args.vocab_size}; expected a token file made with the model's tokenizer"
            )
        windows = PackedSequences(tokens, seq_len)
    else:
        windows = PackedSequences(
            tokenize_documents(cfg.data, load_encoder(tok_path()), cfg.text_field), seq_len
        )
    if len(windows) == 0:
        raise ConfigError(
            f"the data has {windows.n_stream_tokens} tokens, fewer than one window of {seq_len + 1}"
        )
    total, count = window_nll(model, windows, cfg.batch_size, cfg.max_windows)
    return _report(total, count, -(-count // seq_len), seq_len, t0, f"windows of {seq_len}")


def _report(total: float, count: int, n_windows: int, seq_len: int, t0: float, unit: str) -> PerplexityResult:
    nll = total / count
    result = PerplexityResult(
        nll=nll,
        perplexity=math.exp(nll),
        n_tokens=count,
        n_windows=n_windows,
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
    )
    print(
        f"mean NLL {result.nll:.4f} nats/token, perplexity {result.perplexity:.3f} "
        f"({result.n_tokens:,} tokens in {result.n_windows} {unit}, {result.seconds:.1f}s)"
    )
    return result
