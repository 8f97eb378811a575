"""Rotary positions and sliding-window masks.

Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864, eq. 34): each pair of channels of a
query or key at position p is rotated by the angle ``p * base^(-2i/Dh)``, so that ``q_p . k_s`` depends on ``p - s``
only. The angles are computed in float64 from absolute positions, so that a key rotated when it was first read and
stored in a cache is exactly the key that a one-shot forward over the whole stream would compute, even after
millions of tokens.

Band attention (:func:`band_attention`), the one sliding-window kernel of the package: a query at index ``W - 1 + t``
of ``[W - 1 earlier keys ; T keys of the segment]`` sees the ``W`` keys ``t .. t + W - 1``. A dense kernel would
compute ``T x (W - 1 + T)`` scores of which ``T x W`` are in a window; the queries are therefore cut into blocks of
:data:`BLOCK`, each scored against the ``block + W - 1`` keys it can reach, and the band inside those scores is a
strided view (:func:`_band_view`: row ``r`` starts ``r + 1`` elements further than row ``r - 1``), where a per-query,
per-distance bias (the relative positions of ``xl`` and ``infinite``) and a validity mask are added. Scores and
softmax are float32 also under bf16 autocast (as PyTorch's own CPU kernels do); the products with the values and the
gradients of q, k, v run in the input precision; the backward is written out (no zero-filled slice gradients).
Without autograd the blocks go through PyTorch's fused attention instead (below), where under bf16 the bias and the
mask are rounded to bf16 before they are added.

:class:`WindowAttention` (``transformer`` and ``perceiver_ar``) is rotary attention over such a window. Which kernel
it runs is an argument (``model.attention_kernel``, :func:`resolve_kernel`): ``banded`` (the band kernel) or
``sdpa`` (``F.scaled_dot_product_attention`` with the full boolean window mask, the fused kernels of a GPU); ``auto``
picks ``banded`` on the CPU for windows shorter than :data:`LONG_WINDOW` and ``sdpa`` elsewhere. Both run on any
device, so both are tested on the CPU.

Without autograd (evaluation, reading a prompt) the band kernel hands each block of queries to PyTorch's fused
attention (:func:`_attend_fused`) with the band's bias and mask as an additive mask, and a single query (a token of
decoding) takes a short path with the kernel's own products (:func:`_attend_one`). ``floors`` let a caller whose
windows shrink (the ∞-former at its refit boundaries) leave out keys that no query of a block can see.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.layers.cache import join
from longctx.layers.mlp import init_linear

BLOCK = 64  # queries per block of band_attention on the CPU (32-96 measured about equally fast, window 256)
ALIGN = 16  # a block's key range is widened to a multiple of this where it can be (masked keys; faster matmuls)

# ``auto`` takes ``sdpa`` on the CPU too from this window on: 1.04x (fp32) and 1.44x (bf16) the banded kernel's
# training tokens/s for perceiver-ar-long (window 8,192), 1.0x to 1.1x in inference; at window 256 the banded kernel
# trains at 1.0x to 1.08x the speed of sdpa (it computes no gradient for the keys of the cache); perceiver-ar-small
# (cross-attention window 1,024) trains and reads at the same speed with the threshold at 1,024 or 2,048
LONG_WINDOW = 2048

Kernel = Literal["banded", "sdpa"]


def resolve_kernel(kernel: str, device: torch.device, window: int = 0) -> Kernel:
    """The kernel that ``model.attention_kernel`` selects on ``device`` for a sliding ``window``: ``auto`` is
    ``banded`` on the CPU for windows shorter than :data:`LONG_WINDOW` and ``sdpa`` elsewhere; ``banded`` and ``sdpa``
    are taken as they are."""
    if kernel == "auto":
        return "banded" if device.type == "cpu" and window < LONG_WINDOW else "sdpa"
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


def additive_mask(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask -> 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# --------------------------------------------------------------------------------------------------------------------
# band attention: the sliding-window kernel


def _key_start(q0: int, q1: int, W: int, floor: int = 0) -> int:
    """The first key a block of queries ``q0:q1`` is scored against: ``q0`` (the first key of the block's first
    window), or ``floor`` when it is later (the caller guarantees no query of the block sees a key before it), moved
    back (over keys that are masked anyway) so that the block's ``q1 + W - 1 - start`` keys are a multiple of
    :data:`ALIGN` where the sequence allows: float32 matmuls on aligned shapes are measurably faster."""
    start = max(q0, floor)
    return max(0, start - (-(q1 + W - 1 - start) % ALIGN))


def _block_floor(floors: Sequence[int] | None, q0: int, q1: int) -> int:
    """The latest first key a block of queries ``q0:q1`` can be scored from, given the per-query ``floors`` (0 without
    them): row ``r`` of a block's band starts ``r`` score columns in, so the keys before the block's start plus ``r``
    must be hidden from query ``q0 + r`` (:func:`_outside_band` hides them)."""
    return 0 if floors is None else min(f - r for r, f in enumerate(floors[q0:q1]))


def _band_view(scores: Tensor, W: int, offset: int = 0) -> Tensor:
    """The band (..., n, W) of contiguous key-layout scores (..., n, offset + n + W - 1), as a view: ``[r, w] ->
    [r, offset + r + w]`` (``offset``: keys scored before the block's first window starts).

    Row ``r`` of the band starts ``r K + r + offset`` elements into each (n, K) matrix.
    """
    *lead, n, K = scores.shape
    strides = scores.stride()
    return scores.as_strided((*lead, n, W), (*strides[:-2], K + 1, 1), scores.storage_offset() + offset)


def _block_band(scores: Tensor, W: int, offset: int) -> tuple[Tensor, int]:
    """The part of a block's band that was scored, and its first band column: with ``offset >= 0`` the whole band
    (:func:`_band_view`), column 0; with ``offset < 0`` (keys before a floor left out) the band columns from
    ``-offset`` on, which start at score column ``r`` in row ``r``."""
    if offset >= 0:
        return _band_view(scores, W, offset), 0
    return _band_view(scores, W + offset, 0), -offset


@functools.lru_cache(maxsize=64)
def _outside_band(n: int, W: int, device: torch.device, offset: int = 0) -> Tensor:
    """Boolean (n, offset + n + W - 1): true where key ``c`` is outside the window of query ``r`` (c < offset + r or
    c > offset + r + W - 1), and with ``offset < 0`` (keys before a floor left out) also before the part of the band
    that was scored (c < r, :func:`_block_band`). A constant of its arguments, kept for the next call (every layer and
    call of a stream asks for the same few)."""
    c = torch.arange(offset + n + W - 1, device=device)[None, :]
    r = torch.arange(n, device=device)[:, None]
    return (c < r + max(offset, 0)) | (c > r + offset + W - 1)


class _BandAttention(torch.autograd.Function):
    """Band attention per block of queries, with a hand-written backward (no zero-filled slice gradients).

    Forward per block: ``s = (q * scale) k^T`` over the keys the block reaches, in float32; ``s[r, r + w] +=
    bias_scale * bias[r, w] + mask[r, w]``; ``-inf`` outside the band and for the keys ``key_mask`` marks missing;
    ``p = softmax(s)``; ``out = p v`` in the input dtype. Backward: ``ds = p * (dp - rowsum(dp * p))`` with ``dp =
    dout v^T`` in float32; ``dbias`` is the band of ``ds`` times ``bias_scale``; ``dq = ds k * scale``, ``dk = ds^T
    (q * scale)``, ``dv = p^T dout``. Key rows before ``grad_start`` (a cache that needs no gradient) get none. The
    bias and the mask are added block by block, so no full (B, H, T, W) float32 sum of the two is ever formed.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
        key_mask: Tensor | None,
        bias_scale: float,
        block: int,  # type: ignore[override]
        grad_start: int,
        floors: Sequence[int] | None,
    ) -> Tensor:
        T = q.shape[2]
        W = keys.shape[2] - T + 1
        dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
        wide = torch.promote_types(dtype, torch.float32)  # scores and softmax in float32 (float64 for float64)
        keys, values = keys.to(dtype), values.to(dtype)
        outs, saved = [], []
        with torch.autocast(q.device.type, enabled=False):
            keys_w = keys.to(wide)
            for q0 in range(0, T, block):
                q1 = min(T, q0 + block)
                n = q1 - q0
                k0 = _key_start(q0, q1, W, _block_floor(floors, q0, q1))
                qs = q[:, :, q0:q1] * scale  # (B, H, n, Dh)
                s = torch.matmul(qs.to(wide), keys_w[:, :, k0 : q1 + W - 1].transpose(-1, -2))  # (B, H, n, K)
                band, w0 = _block_band(s, W, q0 - k0)  # band columns w0.. were scored
                if bias is not None:
                    band.add_(bias[:, :, q0:q1, w0:], alpha=bias_scale)
                if mask is not None:
                    band.add_(mask[:, :, q0:q1, w0:])
                hide = _outside_band(n, W, q.device, q0 - k0)
                if key_mask is not None:
                    hide = hide | key_mask[:, None, None, k0 : q1 + W - 1]
                p = torch.softmax(s.masked_fill_(hide, float("-inf")), dim=-1)
                outs.append(torch.matmul(p.to(dtype), values[:, :, k0 : q1 + W - 1]))  # (B, H, n, Dh)
                saved += [qs, p]
        ctx.save_for_backward(keys, values, *saved)
        ctx.block, ctx.W, ctx.scale, ctx.grad_start, ctx.floors = block, W, scale, grad_start, floors
        ctx.bias_scale, ctx.bias_dtype = bias_scale, None if bias is None else bias.dtype
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        keys, values, *saved = ctx.saved_tensors
        block, W, scale = ctx.block, ctx.W, ctx.scale
        dtype = keys.dtype
        wide = torch.promote_types(dtype, torch.float32)
        dout = dout.to(dtype)
        B, H, T, _ = dout.shape
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.bias_dtype is not None
        dk = torch.zeros_like(keys) if need_k else None
        dv = torch.zeros_like(values) if need_v else None
        dbias = torch.empty(B, H, T, W, dtype=ctx.bias_dtype, device=dout.device) if need_bias else None
        dqs = []
        with torch.autocast(dout.device.type, enabled=False):
            values_w = values.to(wide)
            for i, q0 in enumerate(range(0, T, block)):
                q1 = min(T, q0 + block)
                qs, p = saved[2 * i], saved[2 * i + 1]
                d_blk = dout[:, :, q0:q1]
                k0 = _key_start(q0, q1, W, _block_floor(ctx.floors, q0, q1))
                dp = torch.matmul(d_blk.to(wide), values_w[:, :, k0 : q1 + W - 1].transpose(-1, -2))  # (B, H, n, K)
                ds = torch._softmax_backward_data(dp, p, -1, wide)  # (B, H, n, n + W - 1), 0 outside the band
                if dbias is not None:
                    band, w0 = _block_band(ds, W, q0 - k0)
                    if w0:  # keys before the block's floor: no score, no gradient
                        dbias[:, :, q0:q1, :w0] = 0
                    dbias[:, :, q0:q1, w0:] = band if ctx.bias_scale == 1.0 else band * ctx.bias_scale
                ds = ds.to(dtype)
                if need_q:
                    dqs.append(torch.matmul(ds, keys[:, :, k0 : q1 + W - 1]))
                off = max(0, ctx.grad_start - k0)  # key rows before grad_start need no gradient
                if off >= q1 + W - 1 - k0:
                    continue
                if dv is not None:
                    dv[:, :, k0 + off : q1 + W - 1] += torch.matmul(p.to(dtype)[..., off:].transpose(-1, -2), d_blk)
                if dk is not None:
                    dk[:, :, k0 + off : q1 + W - 1] += torch.matmul(ds[..., off:].transpose(-1, -2), qs)
        dq = (torch.cat(dqs, dim=2) if len(dqs) > 1 else dqs[0]).mul_(scale) if need_q else None
        return dq, dk, dv, dbias, None, None, None, None, None, None


def band_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor | None,
    block: int = BLOCK,
    grad_start: int = 0,
    mask: Tensor | None = None,
    bias_scale: float = 1.0,
    key_mask: Tensor | None = None,
    floors: Sequence[int] | None = None,
) -> Tensor:
    """Softmax attention of each query over its own window of keys, plus an additive band bias.

    q (B, H, T, Dh) are the content queries (``q + u``); keys and values (B, H, W - 1 + T, Dh) are the ``W - 1``
    earlier keys followed by the segment's; bias (B, H, T, W) (any float dtype; it gets a gradient; None: no bias) is
    added to the scaled scores in band order (column ``w`` = distance ``W - 1 - w``), times ``bias_scale``, and so is
    ``mask`` (broadcastable to (B, H, T, W), float32, no gradient: ``-inf`` for keys that do not exist). ``key_mask``
    (B, W - 1 + T) bool marks keys that no query may see (empty cache slots), a cheaper form of the same. Each query
    must see at least one key. Returns (B, H, T, Dh) = ``sum_w softmax_w(q_t . k_{t+w} / sqrt(Dh) + bias_scale bias_tw +
    mask_tw) v_{t+w}``.

    Queries are processed in blocks of ``block``; each block computes dense scores against the ``block + W - 1``
    keys it can reach (matmuls beat gathers), adds the bias and the mask on the band (a strided view: no skew copy)
    and applies the softmax in float32 (also under bf16 autocast; the products with the values run in the input
    precision). ``grad_start``: key rows before it get no gradient (pass ``W - 1`` when the earlier keys are a
    detached cache). ``floors`` (T ints, optional): query ``t`` sees no key before index ``floors[t]`` in any row (the
    caller's ``mask`` hides them); a block ``q0:q1`` then starts its keys at ``min_r(floors[q0 + r] - r)`` (row ``r``
    of a block's band starts ``r`` keys later), rounded down to an aligned key count, where that is after its first
    window: the ∞-former, whose window shrinks back to ``mem_len`` at each refit boundary, leaves out about a sixth of
    its scores this way.
    """
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if not torch.is_grad_enabled():
        if q.shape[2] == 1:  # one token of decoding: the same operations as the kernel, less overhead
            k0 = _key_start(0, 1, keys.shape[2], _block_floor(floors, 0, 1))
            return _attend_one(q, keys, values, bias, mask, key_mask, bias_scale, k0)
        return _attend_fused(q, keys, values, bias, mask, key_mask, bias_scale, block, floors)
    return _BandAttention.apply(q, keys, values, bias, mask, key_mask, bias_scale, block, grad_start, floors)


def _attend_fused(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    key_mask: Tensor | None,
    bias_scale: float,
    block: int,
    floors: Sequence[int] | None,
) -> Tensor:
    """:func:`band_attention` without autograd (evaluation, prompts): per block of queries, the same keys as the
    kernel, with the band's bias and mask written into an additive mask that is ``-inf`` off the band, and PyTorch's
    fused attention (``F.scaled_dot_product_attention``: scores, softmax and values in one pass, without the float32
    score matrix; bf16 inputs use the CPU's bf16 matrix units). The mask is in the inputs' dtype, so under bf16 the
    bias is rounded to bf16 before it is added (the kernel adds it to float32 scores)."""
    B, H, T, _ = q.shape
    W = keys.shape[2] - T + 1
    dtype = q.dtype
    keys, values = keys.to(dtype), values.to(dtype)
    if mask is not None:  # once per call: adding a float32 mask into a bf16 band would convert every block's bias
        mask = mask.to(dtype)
    heads = 1 if bias is None and (mask is None or mask.shape[1] == 1) else H  # the additive mask's head dimension
    outs = []
    with torch.autocast(q.device.type, enabled=False):
        for q0 in range(0, T, block):
            q1 = min(T, q0 + block)
            k0 = _key_start(q0, q1, W, _block_floor(floors, q0, q1))
            add = torch.full((B, heads, q1 - q0, q1 + W - 1 - k0), float("-inf"), dtype=dtype, device=q.device)
            band, w0 = _block_band(add, W, q0 - k0)  # band columns w0.. exist; the rest stays -inf
            parts = [t[:, :, q0:q1, w0:] for t in (bias, mask) if t is not None]
            if len(parts) == 2 and torch.broadcast_shapes(*(t.shape for t in parts)) == band.shape:
                torch.add(parts[1], parts[0], alpha=bias_scale, out=band)  # one pass
            else:
                band.zero_()
                if bias is not None:
                    band.add_(bias[:, :, q0:q1, w0:], alpha=bias_scale)
                if mask is not None:
                    band.add_(mask[:, :, q0:q1, w0:])
            if key_mask is not None:
                add.masked_fill_(key_mask[:, None, None, k0 : q1 + W - 1], float("-inf"))
            k, v = keys[:, :, k0 : q1 + W - 1], values[:, :, k0 : q1 + W - 1]
            outs.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k, v, attn_mask=add))  # (B, H, n, Dh)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _attend_one(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    key_mask: Tensor | None,
    bias_scale: float,
    k0: int = 0,
) -> Tensor:
    """:func:`band_attention` of a single query (T = 1, so its window is every key and the band is the whole score
    row) without the autograd function and the block loop: the same products in the same order over the same keys
    (from ``k0``, the kernel's start), so the same bits. q (B, H, 1, Dh), keys/values (B, H, W, Dh) -> (B, H, 1, Dh)."""
    dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    wide = torch.promote_types(dtype, torch.float32)
    keys, values = keys[:, :, k0:], values[:, :, k0:]
    with torch.autocast(q.device.type, enabled=False):
        s = torch.matmul((q * scale).to(wide), keys.to(dtype).to(wide).transpose(-1, -2))  # (B, H, 1, W - k0)
        if bias is not None:
            s.add_(bias[..., k0:], alpha=bias_scale)
        if mask is not None:
            s.add_(mask[..., k0:])
        if key_mask is not None:
            s.masked_fill_(key_mask[:, None, None, k0:], float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1).to(dtype), values.to(dtype))


# --------------------------------------------------------------------------------------------------------------------
# windowed rotary attention (transformer, perceiver_ar)


@dataclass(frozen=True)
class WindowPattern:
    """Which keys of ``[cache ; segment]`` the queries of a segment see: each its own and the previous
    ``window - 1`` tokens, among them only the cache slots that hold real tokens. The cache is ``window - 1`` slots
    long, the band layout of :func:`band_attention`."""

    n_queries: int  # T
    window: int  # W
    cache_valid: Tensor  # (B, W - 1) bool: the slots that hold real tokens (the newest ones)

    @classmethod
    def of(cls, n_queries: int, window: int, length: Tensor) -> WindowPattern:
        """The pattern for a cache of ``window - 1`` slots whose newest ``length`` (B,) are real."""
        slots = torch.arange(window - 1, device=length.device)[None, :]  # (1, W - 1)
        return cls(n_queries, window, slots >= (window - 1 - length[:, None]))

    def key_mask(self) -> Tensor | None:
        """(B, W - 1 + T) bool: true for the keys no query may see (empty cache slots); None when there are none."""
        valid = self.cache_valid
        if bool(valid.all()):  # a full cache (every step after the first): nothing to hide
            return None
        return torch.cat([~valid, valid.new_zeros(valid.shape[0], self.n_queries)], dim=1)

    def allowed(self) -> Tensor:
        """(B, 1, T, W - 1 + T) bool: the full mask (the ``sdpa`` kernel and the tests' reference)."""
        return window_mask(self.n_queries, self.window - 1, self.window, self.cache_valid)


def window_attention(
    kernel: Kernel, q: Tensor, keys: Tensor, values: Tensor, pattern: WindowPattern, grad_start: int = 0
) -> Tensor:
    """q (B, H, T, Dh) over keys/values (B, H, W - 1 + T, Dh) as ``pattern`` allows -> (B, H, T, Dh). ``grad_start``
    as in :func:`band_attention` (``sdpa`` leaves the gradients to autograd)."""
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if kernel == "banded":
        block = BLOCK if q.device.type == "cpu" else max(q.shape[2], 1)
        return band_attention(q, keys, values, None, block, grad_start, key_mask=pattern.key_mask())
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=pattern.allowed())


class WindowAttention(nn.Module):
    """Multi-head causal attention with rotary positions of a segment over ``[cache ; segment]`` in a window.

    ``cos``/``sin`` are the (B, 1, T, Dh) tables of :func:`rotary_tables`; ``pattern`` says which keys each query sees;
    the kernel is ``cfg.attention_kernel`` resolved on the device of ``x`` (:func:`resolve_kernel`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.kernel = cfg.attention_kernel
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.qkv, cfg.init_std)
        init_linear(self.out_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(
        self,
        x: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        cos: Tensor,
        sin: Tensor,
        pattern: WindowPattern,
        out: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), cache_k/v (B, H, W - 1, Dh) -> output (B, T, D), keys and values (B, H, W - 1 + T, Dh)
        (written into ``out`` when given)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        q, k = apply_rotary_full(q, cos, sin), apply_rotary_full(k, cos, sin)
        out_k, out_v = out if out is not None else (None, None)
        keys, values = join(cache_k, k, 2, out_k), join(cache_v, v, 2, out_v)  # (B, H, W - 1 + T, Dh)
        cache_grad = cache_k.requires_grad or cache_v.requires_grad
        y = window_attention(
            resolve_kernel(self.kernel, x.device, pattern.window),
            q,
            keys,
            values,
            pattern,
            grad_start=0 if cache_grad else cache_k.shape[2],
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.dropout(self.out_proj(y)), keys, values
