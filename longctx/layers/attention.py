"""Rotary positions and sliding-window masks.

Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864, eq. 34): each pair of channels of a
query or key at position p is rotated by the angle ``p * base^(-2i/Dh)``, so that ``q_p . k_s`` depends on ``p - s``
only. The angles are computed in float64 from absolute positions, so that a key rotated when it was first read and
stored in a cache is exactly the key that a one-shot forward over the whole stream would compute, even after
millions of tokens.

Sliding-window attention on the CPU (:func:`banded_attention`): a dense kernel over ``[cache ; segment]`` would compute
``T * (M + T)`` scores of which only ``T * window`` are inside the window. The queries are therefore cut into blocks
of :data:`CPU_BLOCK` queries, and each block only looks at the ``block + window - 1`` keys its window can reach. The
scores and the softmax are computed in float32 also under bf16 autocast (as PyTorch's own CPU kernels do), the
products with the probabilities and the gradients of q, k, v run in the input precision.

Which kernel runs is an argument (``model.attention_kernel``, :func:`resolve_kernel`): ``banded`` (the blocks above)
or ``sdpa`` (one block with a boolean mask through ``F.scaled_dot_product_attention``, the fused kernels of a GPU);
``auto`` picks ``banded`` on the CPU and ``sdpa`` elsewhere. Both run on any device, so both are tested on the CPU.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CPU_BLOCK = 64  # queries per block of banded_attention on the CPU (32-96 measured about equally fast, window 256)
CPU_ALIGN = 16  # key ranges widened to a multiple of this: float32 matmuls are ~10% faster on aligned shapes

Kernel = Literal["banded", "sdpa"]


def resolve_kernel(kernel: str, device: torch.device) -> Kernel:
    """The kernel that ``model.attention_kernel`` selects on ``device``: ``auto`` is ``banded`` on the CPU and
    ``sdpa`` elsewhere; ``banded`` and ``sdpa`` are taken as they are."""
    if kernel == "auto":
        return "banded" if device.type == "cpu" else "sdpa"
    if kernel not in ("banded", "sdpa"):
        raise ValueError(f"unknown attention kernel {kernel!r}: expected auto, banded or sdpa")
    return kernel  # type: ignore[return-value]


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


def rotary_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 1, T, Dh/2) cos/sin -> (B, 1, T, Dh) tables ``[cos, cos]``, ``[-sin, sin]`` for :func:`apply_rotary_full`."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary_full(x: Tensor, cos_full: Tensor, sin_full: Tensor) -> Tensor:
    """:func:`apply_rotary` with the tables of :func:`rotary_tables`: 4 passes over ``x`` instead of 7, same bits.

    ``x * [cos, cos] + [x2, x1] * [-sin, sin]`` is ``[x1 cos - x2 sin, x2 cos + x1 sin]``: negation is exact and
    IEEE addition commutes, so the result is bit-identical to :func:`apply_rotary`. ``x`` may have extra dimensions
    before the last two (e.g. (B, H, T, Dh) or (B, T, 2, H, Dh) with matching tables).
    """
    cos_full, sin_full = cos_full.to(x.dtype), sin_full.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_full + torch.cat((x2, x1), dim=-1) * sin_full


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


# --------------------------------------------------------------------------------------------------------------------
# banded (sliding-window) attention


def window_blocks(
    n_queries: int, n_cache: int, window: int, cache_valid: Tensor, block: int, align: int = 1
) -> list[tuple[int, int, int, int, Tensor]]:
    """Cut the queries of :func:`window_mask` into blocks of ``block`` and give each block the keys it can see.

    Returns ``(q0, q1, k0, k1, allowed)`` per block: queries ``q0:q1`` of the segment see at most the keys ``k0:k1``
    of ``[cache ; segment]`` (``k0 = max(0, n_cache + q0 - window + 1)``, ``k1 = n_cache + q1``), and ``allowed``
    (B, 1, q1 - q0, k1 - k0) is the slice of :func:`window_mask` for them: every key outside ``k0:k1`` is masked
    for these queries anyway, so attending over ``k0:k1`` only gives exactly the same result. ``align`` > 1 widens
    each key range to a multiple of ``align`` where the keys exist (the extra keys are masked).
    """
    total = n_cache + n_queries
    device = cache_valid.device
    valid = torch.cat([cache_valid, cache_valid.new_ones(cache_valid.shape[0], n_queries)], dim=1)  # (B, M + T)
    blocks = []
    for q0 in range(0, n_queries, block):
        q1 = min(n_queries, q0 + block)
        k0, k1 = max(0, n_cache + q0 - window + 1), n_cache + q1
        extra = -(k1 - k0) % align  # widen the key range to a multiple of `align` (masked keys; faster matmuls)
        k0, k1 = max(0, k0 - extra), min(total, k1 + max(0, extra - k0))
        q_index = torch.arange(n_cache + q0, n_cache + q1, device=device)[:, None]
        k_index = torch.arange(k0, k1, device=device)[None, :]
        band = (k_index <= q_index) & (k_index > q_index - window)  # (q1 - q0, k1 - k0)
        allowed = band[None, None] & valid[:, None, None, k0:k1]
        blocks.append((q0, q1, k0, k1, allowed))
    return blocks


def additive_mask(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask -> 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class _BandedAttention(torch.autograd.Function):
    """Softmax attention of query blocks over key ranges, with a hand-written backward.

    Forward per block: ``s = (q * scale) k^T + mask`` and ``p = softmax(s)`` in float32, ``out = p v`` in the input
    dtype. Backward: ``dp = dout v^T`` and ``ds = p * (dp - rowsum(dp * p))`` in float32, then ``dq = ds k * scale``,
    ``dk = ds^T (q * scale)``, ``dv = p^T dout`` in the input dtype. Rows of ``dk``/``dv`` below ``grad_start`` (the
    cache, when it needs no gradient) are left at zero.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        blocks: list,
        scale: float,  # type: ignore[override]
        grad_start: int,
    ) -> Tensor:
        dtype = q.dtype
        keys, values = keys.to(dtype), values.to(dtype)
        outs, saved = [], []
        wide = torch.promote_types(dtype, torch.float32)  # scores and softmax: float32 (float64 for float64)
        with torch.autocast(q.device.type, enabled=False):
            keys_w = keys.to(wide)  # float32 matmuls take strided slices without copies
            for q0, q1, k0, k1, mask in blocks:
                qj = q[:, :, q0:q1] * scale  # (B, H, b, Dh), input dtype, contiguous
                s = torch.matmul(qj.to(wide), keys_w[:, :, k0:k1].transpose(-1, -2)).add_(mask)  # (B, H, b, L)
                p = torch.softmax(s, dim=-1)
                outs.append(torch.matmul(p.to(dtype), values[:, :, k0:k1]))
                saved += [qj, p]
        ctx.save_for_backward(keys, values, *saved)
        ctx.ranges = [(q0, q1, k0, k1) for q0, q1, k0, k1, _ in blocks]
        ctx.scale, ctx.grad_start = scale, grad_start
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        keys, values, *saved = ctx.saved_tensors
        dtype = keys.dtype
        dout = dout.to(dtype)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dk = torch.zeros_like(keys) if need_k else None
        dv = torch.zeros_like(values) if need_v else None
        dqs = []
        with torch.autocast(dout.device.type, enabled=False):
            wide = torch.promote_types(dtype, torch.float32)
            values_w = values.to(wide)
            for i, (q0, q1, k0, k1) in enumerate(ctx.ranges):
                qj, p = saved[2 * i : 2 * i + 2]
                doj = dout[:, :, q0:q1]
                dp = torch.matmul(doj.to(wide), values_w[:, :, k0:k1].transpose(-1, -2))  # (B, H, b, L)
                ds = torch._softmax_backward_data(dp, p, -1, wide).to(dtype)
                if need_q:
                    dqs.append(torch.matmul(ds, keys[:, :, k0:k1]))
                off = max(0, ctx.grad_start - k0)  # key rows before grad_start need no gradient
                if off >= k1 - k0:
                    continue
                if need_v:
                    dv[:, :, k0 + off : k1] += torch.matmul(p.to(dtype)[..., off:].transpose(-1, -2), doj)
                if need_k:
                    dk[:, :, k0 + off : k1] += torch.matmul(ds[..., off:].transpose(-1, -2), qj)
        dq = None
        if need_q:
            dq = (torch.cat(dqs, dim=2) if len(dqs) > 1 else dqs[0]).mul_(ctx.scale)
        return dq, dk, dv, None, None, None


def banded_attention(q: Tensor, keys: Tensor, values: Tensor, blocks: list, grad_start: int = 0) -> Tensor:
    """Attention of q (B, H, T, Dh) over keys/values (B, H, S, Dh) for the blocks of :func:`window_blocks`.

    Each block is ``(q0, q1, k0, k1, mask)`` with ``mask`` additive (float32, broadcastable to (B, H, q1 - q0,
    k1 - k0)). Equals ``softmax(q k^T / sqrt(Dh) + full mask) v``; the scores and the softmax are float32, the rest
    runs in ``q.dtype``. ``grad_start``: key rows before it get no gradient (pass the cache length when the cache
    does not require grad).
    """
    if not blocks:  # no queries
        return q.new_zeros(q.shape)
    return _BandedAttention.apply(q, keys, values, blocks, 1.0 / math.sqrt(q.shape[-1]), grad_start)


def kernel_blocks(kernel: Kernel, n_queries: int, n_cache: int, window: int, cache_valid: Tensor) -> list:
    """The blocks of :func:`window_blocks` in the form ``kernel`` takes: blocks of :data:`CPU_BLOCK` queries with
    additive float32 masks for ``banded``, one block of all queries with a boolean mask for ``sdpa`` (the fused
    kernels beat a loop over blocks)."""
    if kernel == "sdpa":
        return window_blocks(n_queries, n_cache, window, cache_valid, max(n_queries, 1))
    blocks = window_blocks(n_queries, n_cache, window, cache_valid, CPU_BLOCK, CPU_ALIGN)
    return [(q0, q1, k0, k1, additive_mask(allowed)) for q0, q1, k0, k1, allowed in blocks]


def sdpa_blocks(q: Tensor, keys: Tensor, values: Tensor, blocks: list) -> Tensor:
    """The same result with ``F.scaled_dot_product_attention`` per block (boolean masks): the ``sdpa`` kernel."""
    if not blocks:  # no queries
        return q.new_zeros(q.shape)
    outs = [
        F.scaled_dot_product_attention(q[:, :, q0:q1], keys[:, :, k0:k1], values[:, :, k0:k1], attn_mask=mask)
        for q0, q1, k0, k1, mask in blocks
    ]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def window_attention(
    kernel: Kernel, q: Tensor, keys: Tensor, values: Tensor, blocks: list, grad_start: int = 0
) -> Tensor:
    """q (B, H, T, Dh) over keys/values (B, H, S, Dh) with the blocks of :func:`kernel_blocks` for ``kernel``
    -> (B, H, T, Dh). ``grad_start`` as in :func:`banded_attention` (``sdpa`` leaves the gradients to autograd)."""
    if kernel == "banded":
        return banded_attention(q, keys, values, blocks, grad_start=grad_start)
    return sdpa_blocks(q, keys, values, blocks)
