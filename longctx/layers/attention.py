"""Rotary positions and sliding-window masks.

Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864, eq. 34): each pair of channels of a
query or key at position p is rotated by the angle ``p * base^(-2i/Dh)``, so that ``q_p . k_s`` depends on ``p - s``
only. The angles are computed in float64 from absolute positions, so that a key rotated when it was first read and
stored in a cache is exactly the key that a one-shot forward over the whole stream would compute, even after
millions of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin for integer ``positions`` (B, T), each (B, 1, T, Dh/2) in ``dtype``."""
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device)  # (B, T, Dh/2)
        angles = angles.unsqueeze(1)  # (B, 1, T, Dh/2): broadcast over heads
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of ``x`` (B, H, T, Dh) by the angles in cos/sin."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def window_mask(n_queries: int, n_cache: int, window: int, cache_valid: Tensor) -> Tensor:
    """Boolean attention mask (B, 1, T, M + T) for queries that follow a cache of M slots.

    Query i (0-based in the segment) sits at index ``M + i`` of the concatenated keys and sees keys
    ``j`` with ``M + i - window < j <= M + i`` (itself and the previous ``window - 1`` tokens) whose slot is valid.
    ``cache_valid`` (B, M) marks the cache slots that hold real tokens.
    """
    total = n_cache + n_queries
    device = cache_valid.device
    q_index = torch.arange(n_cache, total, device=device)[:, None]  # (T, 1)
    k_index = torch.arange(total, device=device)[None, :]  # (1, M + T)
    band = (k_index <= q_index) & (k_index > q_index - window)  # (T, M + T)
    valid = torch.cat([cache_valid, cache_valid.new_ones(cache_valid.shape[0], n_queries)], dim=1)  # (B, M + T)
    return band[None, None] & valid[:, None, None, :]  # (B, 1, T, M + T)
