"""Request preparation: a validated request -> engine sequences (tokenize, check, truncate).

Everything here is plain blocking code, proportional to the request body (tokenizing a 4 MB prompt,
encoding and truncating a 20k-turn dialog); the app runs it on `PrepareWorkers`, a small bounded
thread pool, never on the event loop. (SentencePiece releases the GIL while it encodes but not while
it builds its result list: long texts are encoded in pieces, see `Tokenizer.encode_pieces`.)
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from llama2.chat import Message as ChatTurn
from llama2.chat import encode_dialog_with_info
from llama2.errors import Llama2Error
from llama2.generation.sampling import SamplingParams, choice_seed
from llama2.infill import encode_infill
from llama2.serve.http_errors import APIError
from llama2.serve.scheduler import SequenceSpec
from llama2.serve.schemas import ChatCompletionRequest, CompletionRequest
from llama2.tokenizer import Tokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

T = TypeVar("T")


@dataclass(frozen=True)
class AppSettings:
    """What the HTTP layer needs besides the engine.

    Attributes:
        model_name: the id served in `/v1/models` and echoed in responses.
        api_keys: accepted bearer keys; empty: no authentication.
        max_body_bytes: larger request bodies get 413.
        max_prompt_tokens: longer prompts get 400 (None: only the context window limits them).
        max_sequences_per_request: `n` times the number of prompts may not exceed this.
        chat_special_tags: what to do with `[INST]`, `<<SYS>>`... inside message contents: "reject"
            (400) or "sanitize" (replace with inert look-alikes).
        drain_timeout_s: on shutdown, how long in-flight requests may run; then streams end with an
            error event and `[DONE]`, and waiting requests get 503.
        read_timeout_s: a request body not complete this many seconds after its headers gets 408.
        allowed_hosts: `Host` header names served (any port); empty or `*`: any host.
        prepare_workers: threads that parse, tokenize and truncate requests off the event loop.
        prepare_queue: requests that may wait for a preparation thread before new ones get 429.
        prepare_timeout_s: a request whose preparation takes longer gets 503 (its thread finishes
            the work in the background and still counts against `prepare_queue` until then).
    """

    model_name: str = "llama2"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_sequences_per_request: int = 16
    chat_special_tags: Literal["reject", "sanitize"] = "reject"
    drain_timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    allowed_hosts: tuple[str, ...] = ()
    prepare_workers: int = 2
    prepare_queue: int = 64
    prepare_timeout_s: float = 30.0


@dataclass
class Prepared:
    """Sequences of a request plus what the response needs to be built."""

    specs: list[SequenceSpec]
    prompt_tokens: int  # usage: each prompt counted once (not once per choice)
    n: int


class RequestPreparer:
    """Turns validated requests into engine sequences (blocking; thread-safe: it keeps no state)."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, context_window: int, settings: AppSettings
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_window = context_window
        self.settings = settings
        tokenizer.can_encode_in_pieces()  # its one-off vocabulary check, now rather than mid-request

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.settings.model_name}'",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, choice: int) -> SamplingParams:
        bias: dict[int, float] | None = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                try:
                    tok = int(key)
                except ValueError:
                    raise APIError(
                        400,
                        f"logit_bias keys must be token ids written as integers, got {key!r}",
                        param="logit_bias",
                    ) from None
                if not 0 <= tok < self.vocab_size:
                    raise APIError(
                        400,
                        f"logit_bias token id {tok} is outside the vocabulary [0, {self.vocab_size})",
                        param="logit_bias",
                    )
                bias[tok] = value
        seed = choice_seed(body.seed, choice)  # distinct, reproducible streams for the n choices
        try:
            return SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=max(body.top_k, 0),
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=seed,
                logit_bias=bias,
            )
        except Llama2Error as e:
            raise APIError(400, str(e)) from e

    def check_counts(self, n: int, prompts: int) -> None:
        limit = self.settings.max_sequences_per_request
        if n * prompts > limit:
            raise APIError(
                400,
                f"n ({n}) times the number of prompts ({prompts}) is {n * prompts}; this server allows at "
                f"most {limit} sequences per request",
                param="n",
            )

    def encode_prompt(self, text: str) -> tuple[list[int], int]:
        """BOS and the ids of `text`, and their number; when there are more than the context window,
        only BOS and the last `context_window` ids are kept (all that `fit` can use), so a 4 MB prompt
        never becomes one list of millions of ids, whose building and freeing would hold the GIL."""
        keep = self.context_window
        parts: deque[list[int]] = deque()
        held = total = 0
        for part in self.tokenizer.encode_pieces(text):
            parts.append(part)
            held += len(part)
            total += len(part)
            while held - len(parts[0]) >= keep:  # the pieces after the first still hold `keep` ids
                held -= len(parts.popleft())
        ids = [self.tokenizer.bos_id]
        for part in parts:
            ids += part
        if total > keep:
            ids = ids[:1] + ids[len(ids) - keep :]  # [BOS] + the last `keep` ids
        return ids, total + 1

    def fit(
        self, prompt: list[int], max_tokens: int, truncate: bool, param: str, length: int | None = None
    ) -> list[int]:
        """Check (or, with `truncate`, shorten) a prompt against the caps and the context window.

        `length` is the prompt's real length when `prompt` holds only BOS and its last ids (see
        `encode_prompt`); it must then be longer than the context window.
        """
        ctx = self.context_window
        cap = self.settings.max_prompt_tokens
        length = len(prompt) if length is None else length
        if max_tokens >= ctx:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) must be smaller than the context window of {ctx} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if length + max_tokens > ctx:
            if not truncate:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{length + max_tokens} tokens ({length} in the prompt, {max_tokens} for the "
                    'completion). Shorten the prompt or max_tokens, or set "truncate": true.',
                    param=param,
                    code="context_length_exceeded",
                )
            keep = ctx - max_tokens
            bos = self.tokenizer.bos_id
            prompt = (
                prompt[:1] + prompt[len(prompt) - keep + 1 :]
                if prompt[0] == bos and keep > 1
                else prompt[-keep:]
            )
        if cap is not None and len(prompt) > cap:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server accepts at most {cap}",
                param=param,
                code="context_length_exceeded",
            )
        return prompt

    # --------------------------------------------------------------- completions
    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        self.check_model(body.model)
        tok = self.tokenizer
        raw = body.prompt
        prompts: list[str | list[int]]
        if isinstance(raw, str):
            prompts = [raw]
        elif raw and isinstance(raw[0], str):
            prompts = [p for p in raw if isinstance(p, str)]
        elif raw and isinstance(raw[0], int):
            prompts = [[t for t in raw if isinstance(t, int)]]
        else:
            prompts = [list(p) for p in raw if isinstance(p, list)]
        self.check_counts(body.n, len(prompts))
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(
                400, f"best_of must equal n ({body.n}) on this server, got {body.best_of}", param="best_of"
            )
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        stop_ids: tuple[int, ...] = ()
        infill = body.suffix is not None
        if infill:
            if body.echo:
                raise APIError(400, "echo cannot be combined with suffix (infilling)", param="echo")
            if tok.eot_id is None or tok.prefix_id is None:
                raise APIError(
                    400,
                    "suffix (infilling) needs a Code Llama model; this model's vocabulary has no "
                    "▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> tokens",
                    param="suffix",
                )
            stop_ids = (tok.eot_id,)
        specs: list[SequenceSpec] = []
        total_prompt = 0
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            length = None
            if isinstance(p, str):
                if infill:
                    ids = encode_infill(p, body.suffix or "", tok)
                else:
                    ids, length = self.encode_prompt(p)
            else:
                if infill:
                    raise APIError(
                        400, "suffix (infilling) needs the prompt as text, not token ids", param="suffix"
                    )
                bad = next((t for t in p if t >= self.vocab_size), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                        param=param,
                    )
                ids = p
            ids = self.fit(ids, max_tokens, body.truncate, param, length)
            total_prompt += len(ids)
            for j in range(body.n):
                specs.append(
                    SequenceSpec(
                        prompt=ids,
                        max_tokens=max_tokens,
                        params=self.sampling_params(body, j),
                        stop=tuple(body.stop_list()),
                        stop_token_ids=stop_ids,
                        logprobs=body.logprobs,
                        echo=body.echo,
                        infill=infill,
                    )
                )
        return Prepared(specs, total_prompt, body.n)

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        self.check_model(body.model)
        self.check_counts(body.n, 1)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        dialog: list[ChatTurn] = []
        for m in body.messages:
            role: Literal["system", "user", "assistant"] = (
                "system"
                if m.role in ("system", "developer")
                else ("user" if m.role == "user" else "assistant")
            )
            dialog.append({"role": role, "content": m.text()})
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ctx = self.context_window
        if requested is not None and requested >= ctx:
            raise APIError(
                400,
                f"max_tokens ({requested}) must be smaller than the context window of {ctx} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        budget = ctx - (requested if requested is not None else 1) if body.truncate else None
        sanitize = self.settings.chat_special_tags == "sanitize"
        try:
            prompt = encode_dialog_with_info(dialog, self.tokenizer, budget, sanitize=sanitize).tokens
        except Llama2Error as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = requested if requested is not None else ctx - len(prompt)
        if max_tokens < 1 and requested is None:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens; the messages alone take {len(prompt)}",
                param="messages",
                code="context_length_exceeded",
            )
        prompt = self.fit(prompt, max_tokens, False, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        specs = [
            SequenceSpec(
                prompt=prompt,
                max_tokens=max_tokens,
                params=self.sampling_params(body, j),
                stop=tuple(body.stop_list()),
                logprobs=logprobs,
            )
            for j in range(body.n)
        ]
        return Prepared(specs, len(prompt), body.n)



class PrepareWorkers:
    """A small thread pool for request preparation, bounded in threads, in waiting work and in time.

    At most `workers` preparations run at once and at most `queue` are admitted (running or waiting);
    beyond that requests get 429. A caller waits at most `timeout_s` (then 503); Python cannot stop
    the thread, so its work still counts against `queue` until it really ends.
    """

    def __init__(self, workers: int, queue: int, timeout_s: float) -> None:
        self.workers = max(1, workers)
        self.queue = max(self.workers, queue)
        self.timeout_s = timeout_s
        self._pool: ThreadPoolExecutor | None = None
        self._admitted = 0
        self._lock = threading.Lock()

    def _release(self, _: object) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on a worker thread; its exceptions propagate.

        Raises:
            APIError: 429 when `queue` preparations are already admitted, 503 after `timeout_s`.
        """
        with self._lock:
            if self._admitted >= self.queue:
                raise APIError(
                    429,
                    f"{self._admitted} requests are already being prepared; retry shortly",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                )
            self._admitted += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="llama2-prepare")
            pool = self._pool
        try:
            future = pool.submit(fn)
        except RuntimeError:  # the pool was shut down
            self._release(None)
            message = "the server is shutting down"
            raise APIError(503, message, type="server_error", code="service_unavailable") from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except TimeoutError:
            future.cancel()  # only takes effect if it has not started yet
            raise APIError(
                503,
                f"preparing the request took longer than {self.timeout_s:g} s",
                type="server_error",
                code="timeout",
                headers={"Retry-After": "1"},
            ) from None

    def shutdown(self) -> None:
        """Stop taking work; running preparations finish in the background."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
