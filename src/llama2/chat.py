"""Llama 2-Chat dialog format: dialog -> tokens, exactly as Meta's `Llama.chat_completion` builds them.

Each earlier user/assistant pair is `<s>[INST] {user} [/INST] {assistant} </s>` and the last user turn
is `<s>[INST] {user} [/INST]`; a system prompt is merged into the first user turn as
`<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`. Contents are `.strip()`ed as Meta does (the trailing space
after the answer becomes its own `▁` token, id 29871, before EOS). On top of Meta's format this module
rejects (or neutralises) injected special tags, drops the oldest pairs to fit a token budget, and
builds the loss mask for supervised fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from llama2.errors import DialogError
from llama2.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message."""

    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLE_ORDER_ERROR = (
    "model only supports 'system', 'user' and 'assistant' roles, "
    "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
)
# Look-alikes that keep the text readable but do not tokenize to the tags (fullwidth brackets U+FF3B/D,
# single angle quotation marks U+2039/A).
_SANITIZED = {
    "[INST]": "［INST］",
    "[/INST]": "［/INST］",
    "<<SYS>>": "‹‹SYS››",
    "<</SYS>>": "‹‹/SYS››",
}


@dataclass(frozen=True)
class EncodedDialog:
    """A chat prompt's tokens and how many messages were dropped to fit the token budget.

    Attributes:
        tokens: the prompt token ids.
        dropped_turns: number of messages (user and assistant turns, two per pair) removed from the
            start of the conversation; 0 when everything fit.
    """

    tokens: list[int]
    dropped_turns: int


def sanitize_content(text: str) -> str:
    """Replaces the special tags in `text` with look-alikes that do not tokenize to them."""
    while any(tag in text for tag in SPECIAL_TAGS):
        for tag, replacement in _SANITIZED.items():
            text = text.replace(tag, replacement)
    return text


def _pair_text(user: str, answer: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "


def _prompt_text(user: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST}"


def _with_system(system: str | None, user: str) -> str:
    return user if system is None else B_SYS + system + E_SYS + user


def _parse(dialog: Sequence[Message], sanitize: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """Validates a dialog; returns the system prompt (or None) and the (role, content) turns after it."""
    if len(dialog) == 0:
        raise DialogError("dialog is empty; expected at least one user message")
    turns: list[tuple[str, str]] = []
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise DialogError(f"message {i} must be a dict with a 'role' and a str 'content', got {msg!r}")
        content = msg["content"]
        if any(tag in content for tag in SPECIAL_TAGS):
            if not sanitize:
                raise DialogError(
                    f"{UNSAFE_ERROR} Message {i} ({msg['role']}) contains one of {list(SPECIAL_TAGS)}; "
                    "remove them or encode with sanitize=True"
                )
            content = sanitize_content(content)
        turns.append((str(msg["role"]), content))
    system = None
    if turns[0][0] == "system":
        if len(turns) == 1:
            raise DialogError(
                f"dialog has only a system message; expected a user message after it. {ROLE_ORDER_ERROR}"
            )
        system, turns = turns[0][1], turns[1:]
    if not (
        all(role == "user" for role, _ in turns[::2]) and all(role == "assistant" for role, _ in turns[1::2])
    ):
        raise DialogError(ROLE_ORDER_ERROR)
    return system, turns


def encode_dialog_with_info(
    dialog: Sequence[Message], tokenizer: Tokenizer, max_tokens: int | None = None, *, sanitize: bool = False
) -> EncodedDialog:
    """Encodes a dialog ending with a user turn as a Llama 2-Chat prompt, dropping old pairs to fit.

    Args:
        dialog: optional system message, then user/assistant turns alternating, ending with a user turn.
        tokenizer: the Llama 2 tokenizer.
        max_tokens: token budget for the prompt; when exceeded, the oldest whole user/assistant pairs are
            dropped (the system prompt is kept and merged into the new first user turn; the last user
            turn is never dropped). None means no limit.
        sanitize: replace special tags found in contents with inert look-alikes instead of raising.

    Returns:
        The tokens and the number of dropped messages.

    Raises:
        DialogError: empty dialog, wrong role order (Meta's messages), last message not from the user,
            special tags in a content (unless `sanitize`), or a budget too small even for the system
            prompt plus the last user turn.
    """
    if max_tokens is not None and max_tokens < 1:
        raise DialogError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    system, turns = _parse(dialog, sanitize)
    if turns[-1][0] != "user":
        raise DialogError(f"Last message must be from user, got {turns[-1][0]}")
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    last = turns[-1][1]
    plain = [tokenizer.encode(_pair_text(u, a), bos=True, eos=True) for u, a in pairs]  # without system
    if system is None:
        # Without a system prompt the kept pairs are exactly `plain[drop:]`: one pass from the front
        # with a running total (each pair is tokenized once; the whole search is linear).
        tail = tokenizer.encode(_prompt_text(last), bos=True, eos=False)
        total = sum(len(ids) for ids in plain) + len(tail)
        drop = 0
        while max_tokens is not None and total > max_tokens and drop < len(pairs):
            total -= len(plain[drop])
            drop += 1
        if max_tokens is None or total <= max_tokens:
            tokens = [t for ids in plain[drop:] for t in ids] + tail
            return EncodedDialog(tokens=tokens, dropped_turns=2 * drop)
        raise _no_fit_error(max_tokens, total, system, len(pairs))
    return _fit_with_system(system, pairs, plain, last, tokenizer, max_tokens)


def _fit_with_system(
    system: str,
    pairs: list[tuple[str, str]],
    plain: list[list[int]],
    last: str,
    tokenizer: Tokenizer,
    max_tokens: int | None,
) -> EncodedDialog:
    """Drops the oldest pairs until the prompt fits; the system prompt is merged into the first kept turn.

    The first kept pair must be re-tokenized with the system prompt, so a candidate costs one encode of
    the system prompt plus that pair. Two exact bounds keep that linear in the dialog: the system prompt
    with the last user turn alone (the shortest candidate) is tokenized first, and if it does not fit
    nothing does; and a candidate whose later pairs alone (each has at least BOS and EOS) exceed the
    budget is skipped without tokenizing it.
    """
    only_system = tokenizer.encode(_prompt_text(_with_system(system, last)), bos=True, eos=False)
    if max_tokens is not None and len(only_system) > max_tokens:
        raise _no_fit_error(max_tokens, len(only_system), system, len(pairs))
    tail: list[int] | None = None
    suffix = sum(len(ids) for ids in plain)  # tokens of plain[drop:], updated as drop grows
    for drop, (user, answer) in enumerate(pairs):
        suffix -= len(plain[drop])  # now the tokens of plain[drop + 1 :]
        if tail is None:
            tail = tokenizer.encode(_prompt_text(last), bos=True, eos=False)
        if max_tokens is not None and suffix + len(tail) + 1 > max_tokens:
            continue  # the first pair has at least BOS: cannot fit
        first = tokenizer.encode(_pair_text(_with_system(system, user), answer), bos=True, eos=True)
        if max_tokens is None or len(first) + suffix + len(tail) <= max_tokens:
            tokens = first + [t for ids in plain[drop + 1 :] for t in ids] + tail
            return EncodedDialog(tokens=tokens, dropped_turns=2 * drop)
    return EncodedDialog(tokens=only_system, dropped_turns=2 * len(pairs))


def _no_fit_error(max_tokens: int, needed: int, system: str | None, n_pairs: int) -> DialogError:
    what = "the system prompt and the last user turn" if system is not None else "the last user turn"
    return DialogError(
        f"dialog does not fit in max_tokens={max_tokens}: {what} alone need {needed} tokens "
        f"(after dropping all {n_pairs} earlier user/assistant pairs)"
    )


def encode_dialog(
    dialog: Sequence[Message], tokenizer: Tokenizer, max_tokens: int | None = None, *, sanitize: bool = False
) -> list[int]:
    """Encodes a dialog as a Llama 2-Chat prompt; see `encode_dialog_with_info` for the arguments.

    Returns:
        The prompt tokens, identical to those Meta's `chat_completion` feeds the model.
    """
    return encode_dialog_with_info(dialog, tokenizer, max_tokens, sanitize=sanitize).tokens


LOSS_TURNS = ("all", "last")


def encode_dialog_for_training(
    dialog: Sequence[Message], tokenizer: Tokenizer, *, sanitize: bool = False, loss_turns: str = "all"
) -> tuple[list[int], list[bool]]:
    """Encodes a dialog that ends with an assistant turn, with the loss mask for fine-tuning.

    The tokens are Meta's chat format with every pair, the last one included, closed by EOS:
    `<s>[INST] {user} [/INST] {answer} </s>` per pair.

    Args:
        dialog: optional system message, then user/assistant turns alternating, ending with an
            assistant turn.
        tokenizer: the Llama 2 tokenizer.
        sanitize: replace special tags found in contents with inert look-alikes instead of raising.
        loss_turns: "all" trains every answer; "last" trains only the last answer (with its `▁` and
            EOS) and zeroes the loss on every earlier pair, answers included — Ghost Attention's
            training dialogs (Llama 2 paper, sec. 3.3).

    Returns:
        `(tokens, loss_mask)`: `loss_mask[i]` is True exactly on the (trained) answers' tokens,
        including the `▁` and EOS tokens that end each answer, and False on BOS, `[INST]`, system and
        user tokens.

    Raises:
        DialogError: as `encode_dialog`, but the last message must be from the assistant; also when
            the tokens of a pair's prompt part are not a prefix of the pair's tokens, or `loss_turns`
            is not one of `LOSS_TURNS`.
    """
    if loss_turns not in LOSS_TURNS:
        raise DialogError(f"loss_turns must be one of {LOSS_TURNS}, got {loss_turns!r}")
    system, turns = _parse(dialog, sanitize)
    if turns[-1][0] != "assistant":
        raise DialogError(f"Last message must be from assistant for training, got {turns[-1][0]}")
    tokens: list[int] = []
    mask: list[bool] = []
    for i in range(0, len(turns), 2):
        user, answer = turns[i][1], turns[i + 1][1]
        if i == 0:
            user = _with_system(system, user)
        pair = tokenizer.encode(_pair_text(user, answer), bos=True, eos=True)
        prompt = tokenizer.encode(_prompt_text(user), bos=True, eos=False)
        if pair[: len(prompt)] != prompt:
            raise DialogError(
                f"the prompt part of pair {i // 2} does not tokenize to a prefix of the whole pair "
                f"({prompt[-3:]} vs {pair[len(prompt) - 3 : len(prompt)]}); cannot tell answer tokens apart"
            )
        trained = loss_turns == "all" or i == len(turns) - 2
        tokens += pair
        mask += [False] * len(prompt) + [trained] * (len(pair) - len(prompt))
    return tokens, mask
