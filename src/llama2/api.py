"""A facade compatible with Meta's `llama.Llama`: change `from llama import Llama` to
`from llama2.api import Llama` and `build`, `text_completion`, `chat_completion` and codellama's
`text_infilling` behave as in the reference (same defaults, same result dicts).

Differences: any checkpoint format `load_model` reads works (Meta, Hugging Face, llama2.c, ours);
no `torch.distributed` set-up; prompts beyond `max_batch_size` are run in several batches instead
of failing an assert; errors are `llama2.errors` exceptions. Extra keyword-only options (top_k,
min_p, penalties, stop strings, a per-request seed) and streaming methods come on top.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch

from llama2 import dtypes
from llama2.chat import SPECIAL_TAGS, UNSAFE_ERROR, Dialog, Message, encode_dialog
from llama2.errors import GenerationError, TokenizerError
from llama2.generation import GenerationResult, Generator, SamplingParams, TokenEvent
from llama2.infill import encode_infill, infill_ids
from llama2.model import Transformer
from llama2.plan import check_kv_cache_fits
from llama2.quant.convert import QuantConfig
from llama2.tokenizer import Tokenizer

__all__ = ["ChatPrediction", "CompletionPrediction", "InfillingPrediction", "Llama", "parse_dtype"]


class CompletionPrediction(TypedDict, total=False):
    """`text_completion` result: `generation`, plus `tokens`/`logprobs` when logprobs were asked."""

    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    """`chat_completion` result: the assistant `Message`, plus `tokens`/`logprobs` on request."""

    generation: Message
    tokens: list[str]
    logprobs: list[float]


class InfillingPrediction(TypedDict, total=False):
    """`text_infilling` result: the middle and `prefix + middle + suffix`, plus token ids/logprobs."""

    generation: str
    full_text: str
    tokens: list[int]
    logprobs: list[float]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Any spelling of `llama2.dtypes` (`"bfloat16"`, `"bf16"`, `"fp16"`, `"half"`, ...) or a torch dtype
    -> torch dtype; None stays None.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return dtypes.parse_dtype(dtype)


class Llama:
    """A model, its tokenizer and a generator, with Meta's completion methods.

    Attributes:
        model: the `Transformer`; callable as `model(tokens, start_pos)` -> float logits (B, T, V).
            As in Meta's reference it holds a KV cache of `max_batch_size` x `max_seq_len` positions
            that each call reads and writes (without gradients), so `model(tokens[:, :n], 0)` then
            `model(tokens[:, t : t + 1], t)` for t = n, n + 1, ... decodes as one full forward would.
            In train mode with grad enabled the call is a plain causal training forward instead.
        tokenizer: the `Tokenizer`.
        max_seq_len: context window used for generation (prompt + generated tokens).
        max_batch_size: prompts generated together; longer lists run in several batches.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        max_batch_size: int = 8,
    ) -> None:
        if max_batch_size <= 0:
            raise GenerationError(f"max_batch_size must be positive, got {max_batch_size}")
        if tokenizer.vocab_size > model.args.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                f"{model.args.vocab_size}; expected a tokenizer matching the checkpoint"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len if max_seq_len is not None else model.args.max_seq_len
        self.max_batch_size = max_batch_size
        cache = model.cache  # Meta's KV cache (see the `model` attribute)
        if cache is None or cache.max_batch_size < max_batch_size or cache.max_seq_len < self.max_seq_len:
            param = model.tok_embeddings.weight  # Meta's cache: refuse before allocating what cannot fit
            check_kv_cache_fits(model.args, max_batch_size, self.max_seq_len, param.dtype, param.device)
            model.setup_caches(max_batch_size, self.max_seq_len)
        self.generator = Generator(model, tokenizer, max_seq_len=self.max_seq_len)

    # ------------------------------------------------------------------------------ construction
    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int | None = 512,
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 1,
        progress: bool = True,
        quantize: str | QuantConfig | None = None,
    ) -> Llama:
        """Load a checkpoint and its tokenizer (Meta's `Llama.build`).

        Args:
            ckpt_dir: a checkpoint folder or file in any format `llama2.checkpoint.load_model` reads.
            tokenizer_path: a `tokenizer.model` (or GGUF file); default: the one found with the
                checkpoint (e.g. `ckpt_dir/tokenizer.model`).
            max_seq_len: context window for generation; None keeps the checkpoint's.
            max_batch_size: prompts generated together; with `max_seq_len`, the size of the KV
                cache allocated now (as Meta's `build`).
            device: e.g. "cpu", "cuda"; default CPU.
            dtype: weight dtype ("bfloat16", "float16", "float32" or a torch dtype); default: the
                checkpoint's (see `load_model`).
            seed: seeds torch's global generator, as Meta does.
            progress: show a loading progress bar on stderr.
            quantize: quantize the projection layers while loading: "int8", "int4", "nf4", "q8_0",
                "q4_0", "q4_k", optionally with options ("int4,groupsize=64"; see
                `llama2.quant.parse_quant_spec`), or a `QuantConfig`. Quantized checkpoints load as
                stored without it.

        Returns:
            The `Llama` instance.

        Raises:
            CheckpointError: the checkpoint cannot be read.
            TokenizerError: no tokenizer was given or found, or it cannot be read.
        """
        from llama2.checkpoint.load import load_model
        from llama2.checkpoint.tokenizer_path import require_tokenizer

        torch.manual_seed(seed)
        loaded = load_model(
            ckpt_dir,
            device=device,
            dtype=parse_dtype(dtype),
            max_seq_len=max_seq_len,
            progress=progress,
            quantize=quantize,
        )
        path = require_tokenizer(loaded.tokenizer_path, tokenizer_path, ckpt_dir, "pass tokenizer_path")
        tokenizer = Tokenizer.from_file(path)
        return Llama(loaded.model, tokenizer, max_seq_len=loaded.max_seq_len, max_batch_size=max_batch_size)

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        max_batch_size: int = 8,
    ) -> Llama:
        """Wrap an in-memory model (e.g. just trained) and tokenizer."""
        return cls(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)

    # ------------------------------------------------------------------------------ Meta's API
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Meta's low-level `generate`: token ids in, (token ids, logprobs or None) out.

        With `echo`, the prompt tokens (and their logprobs, the first being 0.0) come first.
        Logprobs are log-softmax of the raw model logits at each token.
        """
        results = self._generate(prompt_tokens, max_gen_len, self._params(temperature, top_p), logprobs, echo)
        out_tokens = [(r.prompt_tokens if echo else []) + r.tokens for r in results]
        if not logprobs:
            return out_tokens, None
        return out_tokens, [self._logprobs(r, echo) for r in results]

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[CompletionPrediction]:
        """Complete each prompt (Meta's `text_completion`; BOS is added, no EOS).

        Args:
            prompts: texts to continue.
            temperature: 0 for greedy decoding.
            top_p: nucleus mass.
            max_gen_len: new tokens at most; default `max_seq_len - 1` (bounded by the context window).
            logprobs: add `tokens` (each token decoded alone) and `logprobs` (log-softmax of the raw
                model logits at each token) to each result.
            echo: put the prompt in front of the generation (and its logprobs, the first being 0.0).
            top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed:
                see `SamplingParams` (one seed is used for every prompt, so a prompt's output does
                not depend on the others).
            stop: stop strings; the generation is cut before the first one.

        Returns:
            One `{"generation": str}` dict per prompt (plus `tokens` and `logprobs` on request).
        """
        params = self._params(
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            logit_bias,
        )
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        results = self._generate(prompt_tokens, max_gen_len, params, logprobs, echo, stop=stop)
        out: list[CompletionPrediction] = []
        for r in results:
            ids = (r.prompt_tokens if echo else []) + r.tokens
            pred: CompletionPrediction = {"generation": r.text}
            if logprobs:
                pred["tokens"] = [self.tokenizer.decode([t]) for t in ids]
                pred["logprobs"] = self._logprobs(r, echo)
            out.append(pred)
        return out

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant (Meta's `chat_completion`, Llama 2-Chat format).

        As in Meta's reference, a dialog whose contents contain the format's special tags
        (`[INST]`, `<<SYS>>`, ...) gets the content "Error: special tags are not allowed as part of
        the prompt." instead of a generation.

        Args:
            dialogs: each an optional system message, then alternating user/assistant messages
                ending with a user message.
            temperature, top_p, max_gen_len, logprobs: as `text_completion`.
            top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, stop,
                seed: as `text_completion`.

        Returns:
            One `{"generation": {"role": "assistant", "content": str}}` dict per dialog (plus
            `tokens` and `logprobs` on request).

        Raises:
            DialogError: wrong role order, or the last message is not from the user.
        """
        params = self._params(
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            logit_bias,
        )
        unsafe = [any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in d) for d in dialogs]
        prompt_tokens = [
            encode_dialog(d, self.tokenizer, sanitize=bad) for d, bad in zip(dialogs, unsafe, strict=True)
        ]
        results = self._generate(prompt_tokens, max_gen_len, params, logprobs, False, stop=stop)
        out: list[ChatPrediction] = []
        for r, bad in zip(results, unsafe, strict=True):
            pred: ChatPrediction = {
                "generation": {"role": "assistant", "content": UNSAFE_ERROR if bad else r.text}
            }
            if logprobs:
                pred["tokens"] = [self.tokenizer.decode([t]) for t in r.tokens]
                pred["logprobs"] = self._logprobs(r, False)
            out.append(pred)
        return out

    def text_infilling(
        self,
        prefixes: list[str],
        suffixes: list[str],
        temperature: float = 0.0,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        *,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[InfillingPrediction]:
        """Fill in the code between each prefix and suffix (codellama's `text_infilling`).

        Generation stops at `▁<EOT>` (or EOS); the middle is decoded keeping its leading space.

        Args:
            prefixes: code before each hole.
            suffixes: code after each hole.
            temperature: 0 (default) for greedy decoding.
            top_p: nucleus mass.
            max_gen_len: new tokens at most; default `max_seq_len - 1`.
            logprobs: add `tokens` (ids, as codellama) and `logprobs`.
            suffix_first: suffix-prefix-middle order instead of prefix-suffix-middle.
            top_k, seed: see `SamplingParams`.

        Returns:
            One `{"generation": middle, "full_text": prefix + middle + suffix}` dict per pair.

        Raises:
            TokenizerError: the tokenizer has no infilling pieces (not a Code Llama vocabulary).
            GenerationError: prefixes and suffixes differ in number.
        """
        if len(prefixes) != len(suffixes):
            raise GenerationError(
                f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; expected as many"
            )
        _, _, _, eot_id = infill_ids(self.tokenizer)
        params = self._params(temperature, top_p, top_k, seed=seed)
        prompt_tokens = [
            encode_infill(p, s, self.tokenizer, suffix_first=suffix_first)
            for p, s in zip(prefixes, suffixes, strict=True)
        ]
        results = self._generate(prompt_tokens, max_gen_len, params, logprobs, False, stop_token_ids=[eot_id])
        out: list[InfillingPrediction] = []
        for prefix, suffix, r in zip(prefixes, suffixes, results, strict=True):
            middle = self.tokenizer.decode_infilling(r.tokens)
            pred: InfillingPrediction = {"generation": middle, "full_text": prefix + middle + suffix}
            if logprobs:
                pred["tokens"] = list(r.tokens)
                pred["logprobs"] = self._logprobs(r, False)
            out.append(pred)
        return out

    # ------------------------------------------------------------------------------ streaming
    def stream(
        self,
        prompt_tokens: list[int],
        max_gen_len: int | None = None,
        params: SamplingParams | None = None,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        logprobs: bool = False,
    ) -> Iterator[TokenEvent]:
        """Stream the generation of one token prompt as `TokenEvent`s (default: greedy)."""
        yield from self.generator.stream(
            [prompt_tokens],
            self._max_gen_len(max_gen_len),
            params or SamplingParams(temperature=0.0),
            stop=stop,
            stop_token_ids=stop_token_ids,
            logprobs=logprobs,
        )

    def stream_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like `text_completion` for one prompt, yielding text pieces as they are generated."""
        params = self._params(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
        ids = self.tokenizer.encode(prompt, bos=True, eos=False)
        for event in self.stream(ids, max_gen_len, params, stop=stop):
            if event.text:
                yield event.text

    def stream_chat(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like `chat_completion` for one dialog, yielding the answer's text pieces as generated.

        Raises:
            DialogError: malformed dialog, or special tags in a content.
        """
        params = self._params(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
        ids = encode_dialog(dialog, self.tokenizer)
        for event in self.stream(ids, max_gen_len, params, stop=stop):
            if event.text:
                yield event.text

    # ------------------------------------------------------------------------------ helpers
    def _max_gen_len(self, max_gen_len: int | None) -> int:
        if max_gen_len is None:
            return self.max_seq_len - 1  # Meta's default; the context window bounds it further
        if max_gen_len < 0:
            raise GenerationError(f"max_gen_len must be >= 0, got {max_gen_len}")
        return max_gen_len

    @staticmethod
    def _params(
        temperature: float,
        top_p: float,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
    ) -> SamplingParams:
        return SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            logit_bias=logit_bias,
        )

    def _generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        params: SamplingParams,
        logprobs: bool,
        echo: bool,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
    ) -> list[GenerationResult]:
        n = self._max_gen_len(max_gen_len)
        results: list[GenerationResult] = []
        for start in range(0, len(prompt_tokens), self.max_batch_size):
            chunk = prompt_tokens[start : start + self.max_batch_size]
            results += self.generator.generate(
                chunk, n, params, stop=stop, stop_token_ids=stop_token_ids, logprobs=logprobs, echo=echo
            )
        return results

    @staticmethod
    def _logprobs(r: GenerationResult, echo: bool) -> list[float]:
        lps = list(r.logprobs or [])
        return (list(r.prompt_logprobs or []) + lps) if echo else lps
