"""The Llama 2 decoder: `Transformer(tokens, start_pos) -> logits`, Meta's call signature."""

from __future__ import annotations

import contextlib
from typing import cast

import torch
from torch import Tensor, nn

from llama2.config import ModelArgs
from llama2.errors import GenerationError
from llama2.model.attention import Attention
from llama2.model.kv_cache import KVCache, default_cache_dtype
from llama2.model.layers import FeedForward, RMSNorm, RotaryEmbedding


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        positions: Tensor | None,
        mask: Tensor | None,
        kv_len: int,
        start_pos: int | None,
        slots: Tensor | None,
        use_cache: bool = True,
    ) -> Tensor:
        attn = self.attention(
            self.attention_norm(x), freqs, positions, mask, kv_len, start_pos, slots, use_cache
        )
        h: Tensor = x + attn
        out: Tensor = h + self.feed_forward(self.ffn_norm(h))
        return out


class Transformer(nn.Module):
    """Llama 2 decoder-only transformer. Parameter names match Meta's checkpoints.

    Call as `model(tokens, start_pos)`:
      - tokens: (B, T) int64;
      - start_pos: int (all rows start at the same position, Meta's convention) or a (B,) int64
        tensor of per-row start positions (continuous batching);
      - slots: optional (B,) int64 cache rows for each batch row (default: row i uses cache row i).
    Returns float32 logits (B, T, vocab_size).

    Without caches (`setup_caches` not called) the forward is a plain causal pass over `tokens`,
    as used in training; with caches, keys/values are written at the given positions and attention
    reads every cached position up to each query's own (Meta's semantics), except in a training
    forward (train mode with grad enabled), which ignores the caches: generating with a model never
    changes how it trains (see `hidden_states`).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling, args.max_seq_len)
        # dtype of the activations; None: the embeddings' dtype. `llama2.quant.accelerate` sets
        # float32 on CPUs, where bf16/fp16 elementwise ops are emulated and slower than float32.
        self.compute_dtype: torch.dtype | None = None
        self.strict_cache = True  # see setup_caches

    @property
    def blocks(self) -> list[TransformerBlock]:
        """The decoder blocks, typed (iterating `self.layers` yields plain `nn.Module`s)."""
        return [cast(TransformerBlock, layer) for layer in self.layers]

    # ----------------------------------------------------------------------------- caches
    def setup_caches(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        strict: bool = True,
    ) -> None:
        """Allocate a KV cache of `max_batch_size` x `max_seq_len` positions in every layer.

        Args:
            max_batch_size: cache rows.
            max_seq_len: cache positions.
            dtype: default `default_cache_dtype`: float32 on CPU, else the output head's dtype.
            device: default the embeddings' device.
            strict: True (Meta's fixed cache): every forward outside training uses the cache, and
                one that does not fit raises. False (a generator's scratch cache, kept for reuse): a
                forward from position 0 that does not fit runs as the plain causal pass instead, so
                e.g. an evaluation after a generation works for any batch and length.
        """
        self.strict_cache = strict
        param = self.output.weight
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or default_cache_dtype(param.dtype if param.is_floating_point() else None, device)
        for layer in self.blocks:
            layer.attention.cache = KVCache(
                max_batch_size, max_seq_len, self.args.kv_heads, self.args.head_dim, dtype, device
            )

    def clear_caches(self) -> None:
        for layer in self.blocks:
            layer.attention.cache = None
        self.strict_cache = True

    @property
    def cache(self) -> KVCache | None:
        """The first layer's cache (all layers share its shape), or None."""
        return self.blocks[0].attention.cache

    # ---------------------------------------------------------------------------- forward
    def hidden_states(
        self,
        tokens: Tensor,
        start_pos: int | Tensor = 0,
        slots: Tensor | None = None,
        *,
        kv_len: int | None = None,
    ) -> Tensor:
        """Final normalised hidden states (B, T, dim) — the input of the output head (and of reward heads).

        With caches set up, the pass depends on autograd (see `uses_cache`):
          - grad enabled and train mode: a training forward, the plain causal pass; the cache is
            neither read nor written (start_pos must be 0);
          - otherwise Meta's cached forward: keys/values are written at their positions and
            attention reads the cache. With grad enabled (eval mode) it runs under `torch.no_grad()`
            (Meta's runs under inference mode), returning ordinary tensors callers may modify;
          - with a scratch cache (`setup_caches(strict=False)`, as `Generator` allocates), a forward
            from position 0 (no slots, no kv_len) whose batch or length does not fit the cache has
            nothing to read from it: the plain causal pass, the cache untouched.

        Args:
            tokens: (B, T) int64.
            start_pos: see the class docstring.
            slots: see the class docstring.
            kv_len: attend over this many leading cache positions (masked beyond each query's own
                position). Default: up to the furthest position, which for a tensor `start_pos` reads
                it back to the host. Pass the cache length for fixed shapes (`torch.compile`); the
                caller then guarantees every position is below it.

        Raises:
            GenerationError: a training forward at start_pos != 0 while a cache is set up (it would
                silently ignore the cached past), per-row positions without a cache, positions past
                the cache.
        """
        use_cache = self.uses_cache(tokens, start_pos, slots, kv_len=kv_len)
        with _no_grad_if(use_cache):
            return self._hidden_states(tokens, start_pos, slots, kv_len, use_cache=use_cache)

    def uses_cache(
        self,
        tokens: Tensor,
        start_pos: int | Tensor = 0,
        slots: Tensor | None = None,
        *,
        kv_len: int | None = None,
    ) -> bool:
        """Whether `model(tokens, start_pos, slots)` reads and writes the KV cache in the current
        autograd mode (see `hidden_states`).

        Raises:
            GenerationError: a training forward (grad enabled, train mode) with a cache set up and a
                start position other than 0, or slots: it cannot use the cache and would ignore the past.
        """
        cache = self.cache
        if cache is None:
            return False
        fresh = not isinstance(start_pos, Tensor) and int(start_pos) == 0 and slots is None
        if torch.is_grad_enabled() and self.training:
            if not fresh:
                raise GenerationError(
                    "a training forward (train mode, grad enabled) runs without the KV cache, so it "
                    f"must start at position 0 without slots, got start_pos {start_pos!r}; for cached "
                    "decoding call model.eval() or run under torch.no_grad()/torch.inference_mode()"
                )
            return False
        if self.strict_cache or not fresh or kv_len is not None:
            return True
        bsz, seqlen = tokens.shape
        return bsz <= cache.max_batch_size and seqlen <= cache.max_seq_len

    def _hidden_states(
        self,
        tokens: Tensor,
        start_pos: int | Tensor,
        slots: Tensor | None,
        kv_len: int | None,
        *,
        use_cache: bool,
    ) -> Tensor:
        bsz, seqlen = tokens.shape
        device = tokens.device
        cache = self.cache if use_cache else None
        positions: Tensor | None = None  # (B, T), only for per-row start positions
        common_start: int | None = None
        if isinstance(start_pos, Tensor):
            if cache is None:
                raise GenerationError("per-row start positions need a KV cache; call setup_caches first")
            positions = start_pos.to(device=device, dtype=torch.long)[:, None] + torch.arange(
                seqlen, device=device
            )  # (B, T)
            needed = kv_len if kv_len is not None else int(positions.max().item()) + 1
        else:
            common_start = int(start_pos)
            needed = common_start + seqlen
            if kv_len is not None and cache is not None:
                if kv_len < needed:
                    raise GenerationError(f"kv_len {kv_len} is shorter than the last position {needed - 1}")
                needed = kv_len
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if self.compute_dtype is not None:
            h = h.to(self.compute_dtype)
        mask: Tensor | None = None
        if cache is not None:
            if needed > cache.max_seq_len:
                raise GenerationError(
                    f"position {needed - 1} is past the KV cache length {cache.max_seq_len}; "
                    "allocate a longer cache with setup_caches(max_seq_len=...)"
                )
            if bsz > cache.max_batch_size and slots is None:
                raise GenerationError(
                    f"batch of {bsz} exceeds the cache's max_batch_size {cache.max_batch_size}"
                )
            # No mask when the new tokens see exactly the keys up to their own: a fresh prefill
            # (plain causal) or one token per row at a common position (decode).
            plain = common_start is not None and (
                (common_start == 0 and needed == seqlen) or (seqlen == 1 and needed == common_start + 1)
            )
            if not plain:
                pos = positions
                if pos is None:
                    pos = (common_start or 0) + torch.arange(seqlen, device=device)[None]  # (1, T)
                visible = torch.arange(needed, device=device) <= pos[:, :, None]  # (B|1, T, L)
                mask = torch.zeros(visible.shape, dtype=h.dtype, device=device).masked_fill_(
                    visible.logical_not(), float("-inf")
                )[:, None]  # (B|1, 1, T, L), additive
        if positions is not None:
            freqs = self.rope(positions, needed, device)  # (B, T, 1, D/2, 2)
        else:
            freqs = self.rope(common_start or 0, seqlen, device)  # (1, T, 1, D/2, 2)
        for layer in self.layers:
            h = layer(h, freqs, positions, mask, needed, common_start, slots, use_cache)
        normed: Tensor = self.norm(h)  # (B, T, dim)
        return normed

    def forward(
        self,
        tokens: Tensor,
        start_pos: int | Tensor = 0,
        slots: Tensor | None = None,
        *,
        kv_len: int | None = None,
    ) -> Tensor:
        use_cache = self.uses_cache(tokens, start_pos, slots, kv_len=kv_len)
        with _no_grad_if(use_cache):
            h = self._hidden_states(tokens, start_pos, slots, kv_len, use_cache=use_cache)  # (B, T, dim)
            logits: Tensor = self.output(h)
        return logits.float()  # (B, T, vocab)


def _no_grad_if(use_cache: bool) -> contextlib.AbstractContextManager[object]:
    """`torch.no_grad()` for a cached forward with grad mode on: a cache write is never
    differentiated (it would chain every decoding step into one graph), as Meta's forward runs under
    inference mode; a no-op otherwise (already inside no_grad/inference mode, or a training forward)."""
    if use_cache and torch.is_grad_enabled():
        return torch.no_grad()
    return contextlib.nullcontext()
