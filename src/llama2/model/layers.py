"""Building blocks of the Llama 2 decoder: RMSNorm, rotary embeddings and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2.config import RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 and cast back (Meta's reference numerics)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)  # one fused op, same arithmetic
        normed = F.rms_norm(x.float(), shape, eps=self.eps)  # float32, as Meta's reference
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over adjacent pairs (x[2i], x[2i+1]), Meta's layout.

    The (cos, sin) table over positions is computed once, lazily, on the device of the first
    forward (so a model built on the `meta` device and loaded with `assign=True` needs nothing
    re-materialised), and kept in float32 as a plain attribute: it is not a buffer, so neither the
    state dict nor `model.to(torch.bfloat16)` touch it. It grows when a longer position is asked
    for. It is built outside inference mode, so a table first built during generation serves later
    training forwards. Dynamic NTK scaling depends on the sequence length, so it is computed per
    forward.
    """

    def __init__(
        self, head_dim: int, theta: float, scaling: RopeScaling | None, max_position: int
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.max_position = max_position  # the trained context (dynamic NTK's reference length)
        self._table: Tensor | None = None  # (L, head_dim/2, 2) float32: cos, sin

    @property
    def dynamic(self) -> bool:
        """True for dynamic NTK scaling (frequencies depend on the sequence length)."""
        return self.scaling is not None and self.scaling.type == "dynamic"

    def inv_freq(self, device: torch.device, seq_len: int | None = None) -> Tensor:
        """Inverse frequencies (head_dim/2,), float32. `seq_len` matters only for dynamic scaling."""
        d = self.head_dim
        exponent = torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d  # (d/2,)
        base = self.theta
        s = self.scaling
        if s is not None and s.type == "dynamic" and seq_len is not None and seq_len > self.max_position:
            # NTK-aware base growth, as transformers' dynamic rope type computes it.
            base = base * ((s.factor * seq_len / self.max_position) - (s.factor - 1)) ** (d / (d - 2))
        inv = 1.0 / (base**exponent)
        if s is not None and s.type == "linear":
            inv = inv / s.factor
        return inv

    def _angles(self, positions: Tensor, seq_len: int | None) -> Tensor:
        """positions (...) -> (..., head_dim/2, 2) float32 (cos, sin)."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device, seq_len)  # (..., d/2)
        return torch.stack((angles.cos(), angles.sin()), dim=-1)

    def table(self, length: int, device: torch.device) -> Tensor:
        """The (length', head_dim/2, 2) float32 (cos, sin) table, length' >= length (not dynamic)."""
        t = self._table
        if t is None or t.device != device or t.shape[0] < length:
            n = max(length, self.max_position, t.shape[0] if t is not None and t.device == device else 0)
            # An ordinary constant even when first built inside a generation (inference mode): an
            # inference tensor cannot be saved for backward by a later training forward.
            with torch.inference_mode(False), torch.no_grad():
                t = self._angles(torch.arange(n, device=device), None)
            self._table = t
        return t

    def forward(self, positions: Tensor | int, length: int, device: torch.device) -> Tensor:
        """Rotation factors for T = `length` positions, shaped to broadcast over heads.

        Args:
            positions: (B, T) int64 per-row positions, or an int: every row covers
                `positions ... positions + T - 1`.
            length: T for an int `positions`; for a tensor, a bound on every position (the cache
                length: the caller checked it), so the table is sized without reading the tensor.
            device: where the table lives.

        Returns:
            (B or 1, T, 1, head_dim/2, 2) float32 (cos, sin).
        """
        if isinstance(positions, int):
            if self.dynamic:
                pos = (positions + torch.arange(length, device=device))[None]  # (1, T)
                return self._angles(pos, positions + length)[:, :, None]
            return self.table(positions + length, device)[positions : positions + length][None, :, None]
        if self.dynamic:
            seq_len = int(positions.max().item()) + 1
            return self._angles(positions, seq_len)[:, :, None]
        return self.table(length, device)[positions][:, :, None]  # (B, T, 1, d/2, 2)


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent pairs of x in float32. x: (B, T, H, D); freqs: (B|1, T, 1, D/2, 2) (cos, sin).

    Eagerly this is one complex multiply (Meta's formulation); under `torch.compile` it is written
    with real ops, which inductor fuses into one kernel (it has no complex codegen).
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    if torch.compiler.is_compiling():
        x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2)
        c, s = freqs[..., 0], freqs[..., 1]  # (B|1, T, 1, D/2)
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, D/2, 2)
    else:
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.view_as_complex(freqs))
    return out.flatten(-2).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Names match Meta's checkpoints."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out
