"""Code Llama infilling prompts: prefix-suffix-middle (PSM) and suffix-prefix-middle (SPM).

Exactly codellama's `infilling_prompt_tokens`:
PSM is `<s> ▁<PRE> {prefix} ▁<SUF>{suffix} ▁<MID>` and SPM is `<s> ▁<PRE> ▁<SUF>{suffix} ▁<MID> {prefix}`.
The prefix is encoded normally (with SentencePiece's leading space), the suffix without it
(`Tokenizer.encode_infilling`). The model then generates the middle and ends it with `▁<EOT>`.
"""

from __future__ import annotations

from llama2.errors import TokenizerError
from llama2.tokenizer import Tokenizer


def infill_ids(tokenizer: Tokenizer) -> tuple[int, int, int, int]:
    """Returns the `(prefix_id, suffix_id, middle_id, eot_id)` of a Code Llama tokenizer.

    Raises:
        TokenizerError: the vocabulary lacks `▁<PRE>`, `▁<SUF>`, `▁<MID>` or `▁<EOT>` (e.g. plain Llama 2).
    """
    prefix_id, suffix_id, middle_id, eot_id = ids = (
        tokenizer.prefix_id,
        tokenizer.suffix_id,
        tokenizer.middle_id,
        tokenizer.eot_id,
    )
    if prefix_id is None or suffix_id is None or middle_id is None or eot_id is None:
        names = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")
        missing = [name for name, i in zip(names, ids, strict=True) if i is None]
        raise TokenizerError(
            f"tokenizer {tokenizer.source} has no infilling pieces {missing}; expected a Code Llama "
            "tokenizer (vocabulary of 32016 with ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> at 32007-32010)"
        )
    return prefix_id, suffix_id, middle_id, eot_id


def encode_infill(prefix: str, suffix: str, tokenizer: Tokenizer, suffix_first: bool = False) -> list[int]:
    """Builds the token prompt for filling in the code between `prefix` and `suffix`.

    Args:
        prefix: the code before the hole.
        suffix: the code after the hole.
        tokenizer: a Code Llama tokenizer.
        suffix_first: use the suffix-prefix-middle (SPM) order instead of prefix-suffix-middle (PSM).

    Returns:
        The prompt tokens, starting with BOS.

    Raises:
        TokenizerError: the tokenizer has no infilling pieces.
    """
    prefix_id, suffix_id, middle_id, _ = infill_ids(tokenizer)
    if suffix_first:
        # "<PRE> <SUF>{suf} <MID> {pre}"
        return [
            tokenizer.bos_id,
            prefix_id,
            suffix_id,
            *tokenizer.encode_infilling(suffix),
            middle_id,
            *tokenizer.encode(prefix, bos=False, eos=False),
        ]
    # "<PRE> {pre} <SUF>{suf} <MID>"
    return [
        tokenizer.bos_id,
        prefix_id,
        *tokenizer.encode(prefix, bos=False, eos=False),
        suffix_id,
        *tokenizer.encode_infilling(suffix),
        middle_id,
    ]
