"""The Llama 2 decoder: `Transformer(tokens, start_pos) -> logits`, Meta's call signature."""

from __future__ import annotations

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
    ) -> Tensor:
        attn = self.attention(self.attention_norm(x), freqs, positions, mask, kv_len, start_pos, slots)
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
    reads every cached position up to each query's own.
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
    ) -> None:
        """Allocate a KV cache of `max_batch_size` x `max_seq_len` positions in every layer.

        `dtype` defaults to `default_cache_dtype`: float32 on CPU, else the output head's dtype.
        """
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

        Args:
            tokens: (B, T) int64.
            start_pos: see the class docstring.
            slots: see the class docstring.
            kv_len: attend over this many leading cache positions (masked beyond each query's own
                position). Default: up to the furthest position, which for a tensor `start_pos` reads
                it back to the host. Pass the cache length for fixed shapes (`torch.compile`); the
                caller then guarantees every position is below it.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        cache = self.cache
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
            h = layer(h, freqs, positions, mask, needed, common_start, slots)
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
        logits: Tensor = self.output(self.hidden_states(tokens, start_pos, slots, kv_len=kv_len))
        return logits.float()  # (B, T, vocab)
