"""The one-token decode step as a small function that `torch.compile` can take whole (gpt-fast's
`decode_one_token`).

Shapes never change from step to step: the step reads the whole preallocated KV cache (masked
beyond each row's position) and takes positions as a tensor, so one compiled graph serves every
position of a generation. Prefill stays eager (its length varies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from llama2.errors import GenerationError
from llama2.quant.kernels import prepare_for_compile

if TYPE_CHECKING:
    from llama2.model import Transformer

# Modes accepted by `DecodeStep(compile=...)`: torch.compile's.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def decode_one_token(
    model: Transformer, tokens: Tensor, positions: Tensor, slots: Tensor | None = None
) -> Tensor:
    """One decode step over the model's whole KV cache.

    Args:
        model: a `Transformer` with caches set up (`setup_caches`).
        tokens: (B, 1) int64, the last token of every row.
        positions: (B,) int64, where each row's token goes (every value < the cache length).
        slots: (B,) int64 cache row of each batch row (the engine's slots); None: row i uses row i.

    Returns:
        (B, V) float32 logits of the next token.
    """
    cache = model.cache
    if cache is None:
        raise GenerationError("decode_one_token needs a KV cache; call setup_caches first")
    logits: Tensor = model(tokens, positions, slots, kv_len=cache.max_seq_len)  # (B, 1, V)
    return logits[:, -1]


class DecodeStep:
    """`decode_one_token`, optionally compiled, bound to one model.

    Example:
        >>> model.setup_caches(1, 256)
        >>> step = DecodeStep(model, compile="default")
        >>> logits = step(torch.tensor([[tok]]), torch.tensor([pos]))  # (1, V)

    Compilation happens on the first call and again for each new batch size or cache shape
    (`dynamic=False`: every graph is specialised to its shapes).
    """

    def __init__(self, model: Transformer, *, compile: str | None = None) -> None:
        """Bind the step to `model`.

        Args:
            model: the decoder.
            compile: None (eager) or a `torch.compile` mode, one of `COMPILE_MODES`.

        Raises:
            GenerationError: an unknown compile mode.
        """
        if compile is not None and compile not in COMPILE_MODES:
            raise GenerationError(
                f"unknown compile mode {compile!r}; expected one of {', '.join(COMPILE_MODES)}"
            )
        self.model = model
        self.mode = compile
        self._fn: Callable[[Transformer, Tensor, Tensor, Tensor | None], Tensor] = decode_one_token
        if compile is not None:
            prepare_for_compile()
            compiled: Any = torch.compile(decode_one_token, mode=compile, dynamic=False, fullgraph=False)
            self._fn = cast("Callable[[Transformer, Tensor, Tensor, Tensor | None], Tensor]", compiled)

    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor | None = None) -> Tensor:
        """(B, 1) tokens at (B,) positions (in cache rows `slots`) -> (B, V) float32 logits (see
        `decode_one_token`)."""
        cache = self.model.cache
        if cache is None:
            raise GenerationError("DecodeStep needs a KV cache; call setup_caches first")
        # Build the rotary table outside the graph (a lazily created attribute).
        self.model.rope.table(cache.max_seq_len, tokens.device)
        return self._fn(self.model, tokens, positions, slots)
