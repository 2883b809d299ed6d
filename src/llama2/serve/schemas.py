"""Pydantic models of the OpenAI-compatible API: requests (validated strictly) and responses.

Requests reject unknown fields and values of the wrong JSON type (`strict`), and NaN/infinite
numbers, so that a client mistake becomes a 400 naming the field instead of a silent coercion.
Ranges follow OpenAI's documentation; `top_k`, `min_p`, `repetition_penalty` and `truncate` are
extensions (vLLM spells the first three the same way).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20

FinishReason = Literal["stop", "length"]


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string contains unpaired surrogate code points (not valid Unicode)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]  # a JSON string that is valid Unicode


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    """`stream_options`: `include_usage` adds a last chunk with token counts (and `usage: null` before)."""

    include_usage: bool = False


StopStrings = Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)]


class _SamplingRequest(_Request):
    """Fields shared by `/v1/completions` and `/v1/chat/completions`."""

    model: Text | None = Field(None, description="The served model's id (see /v1/models); optional.")
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 = off (extension).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Min-p sampling threshold (extension).")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    stop: Annotated[Text, Field(min_length=1)] | StopStrings | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, description="CTRL penalty (extension).")
    logit_bias: dict[Text, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit."
    )
    user: Text | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate: bool = Field(
        False,
        description="Extension: shorten a prompt that does not fit with max_tokens in the context window "
        "(completions: keep BOS and the last tokens; chat: drop the oldest turns) instead of failing.",
    )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`."""

    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    suffix: Text | None = Field(None, description="Code Llama infilling: the text after the hole.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Top alternatives per token.")
    best_of: int | None = Field(None, ge=1, le=128, description="Only best_of == n is supported.")


class TextPart(_Request):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    """One message; `developer` is treated as `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    name: Text | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions` (Llama 2-Chat prompt format)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0, description="Alias of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# ------------------------------------------------------------------------------------ responses
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama2"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail
