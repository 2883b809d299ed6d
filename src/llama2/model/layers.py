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
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over adjacent pairs (x[2i], x[2i+1]), Meta's layout.

    Holds no buffers, so a model built on the `meta` device needs nothing re-materialised: the
    cos/sin tables are computed per forward from the positions (cheap: positions x head_dim/2).
    """

    def __init__(
        self, head_dim: int, theta: float, scaling: RopeScaling | None, max_position: int
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.max_position = max_position  # the trained context (dynamic NTK's reference length)

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

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (B, T) int64 -> cos, sin: (B, T, head_dim/2) float32."""
        seq_len = None
        if self.scaling is not None and self.scaling.type == "dynamic":
            seq_len = int(positions.max().item()) + 1
        inv = self.inv_freq(positions.device, seq_len)
        angles = positions.float()[..., None] * inv  # (B, T, d/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x. x: (B, T, H, D); cos/sin: (B, T, D/2). Computed in float32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2)
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, D/2, 2)
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
