"""Relative-position attention over a per-query window (Transformer-XL; Dai et al. 2019, arXiv 1901.02860, §3.3).

Transformer-XL scores query i against key j with the relative encoding ``R_{i-j}`` (§3.3, the decomposition of
``A^rel_{i,j}`` into the terms (a)-(d))::

    A_ij = (q_i + u)^T k_j  +  (q_i + v)^T W_R R_{i-j}        (a) + (c): content,  (b) + (d): position

with ``R`` the sinusoid table of Vaswani et al. (2017) over distances and learned biases ``u``, ``v``. The functions
here are decoder-agnostic: they know about windows, distances and scores, nothing about caches or states.

Layouts. A query sits at index ``W - 1 + t`` of a key sequence ``[W - 1 earlier keys ; T keys of the segment]`` and
sees the ``W`` keys ``t .. t + W - 1`` (distances ``W - 1 .. 0``). A "band" tensor (..., T, W) stores one value per
query and window slot, column ``w`` = distance ``W - 1 - w`` (oldest first, the order of the keys). The position
term needs ``W_R R_d`` for the ``W`` distances only, a fixed table: it is computed once per call in band order, so
no relative shift is needed at all. The content term is computed per block of queries as a dense matmul over the
keys the block can reach (key layout: ``n`` queries x ``n + W - 1`` keys), and the band inside it is addressed as a
strided view (:func:`_band_view`: row ``r`` starts ``r + 1`` elements further than row ``r - 1``), which plays the
part of the official code's ``_rel_shift`` without its pad-and-reshape copies (checked against explicit loops in
the tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.layers.mlp import init_linear

BLOCK = 64  # queries per block of band_attention on the CPU: the dense scores cover block + W - 1 keys, not T + W - 1


def sinusoid_table(distances: Tensor, d_model: int) -> Tensor:
    """R_d = [sin(d w_k) ; cos(d w_k)], w_k = 10000^(-2k / D), for float ``distances`` (W,) -> (W, D) float32.

    Transformer-XL concatenates the sines and the cosines (not interleaved); D must be even.
    """
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=distances.device) / d_model)
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (W, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)  # (W, D)


def position_scores(q_pos: Tensor, weight: Tensor, table: Tensor) -> Tensor:
    """The position term ``(q_i + v)^T W_R R_d`` for every query and every row ``d`` of ``table``.

    q_pos (B, H, T, Dh) = queries plus ``v``; weight (H * Dh, D) is ``W_R`` (an ``nn.Linear(D, H * Dh)`` weight);
    table (W, D) holds ``R`` in the order the caller wants the columns. Returns (B, H, T, W).

    Two exact ways to order the products; the cheaper one is taken. Projecting the table first (``W_R R``: W D^2
    multiply-adds, then B T W D) wins for training segments; projecting the queries through ``W_R^T`` first
    (B T D^2, then B T H W D) wins for a few queries, e.g. token-by-token generation, where it avoids an
    O(W D^2) projection per token.
    """
    B, H, T, Dh = q_pos.shape
    W, D = table.shape
    table = table.to(q_pos.dtype)
    weight = weight.to(q_pos.dtype)
    if W * D * D + B * T * W * D <= B * T * D * D + B * T * H * W * D:
        rel = F.linear(table, weight).view(W, H, Dh).permute(1, 2, 0)  # (H, Dh, W)
        return torch.matmul(q_pos, rel)  # (B, H, T, W)
    q_proj = torch.matmul(q_pos, weight.view(H, Dh, D))  # (B, H, T, D): (q + v)^T W_R per head
    return torch.matmul(q_proj, table.t())  # (B, H, T, W)


def _band_view(scores: Tensor, W: int) -> Tensor:
    """The band (..., n, W) of contiguous key-layout scores (..., n, n + W - 1), as a view: ``[r, w] -> [r, r + w]``.

    Row ``r`` of the band starts ``r (n + W - 1) + r = r (n + W)`` elements into each (n, n + W - 1) matrix.
    """
    *lead, n, K = scores.shape
    strides = scores.stride()
    return scores.as_strided((*lead, n, W), (*strides[:-2], K + 1, 1), scores.storage_offset())


def _outside_band(n: int, W: int, device: torch.device) -> Tensor:
    """Boolean (n, n + W - 1): true where key ``c`` is outside the window of query ``r`` (c < r or c > r + W - 1)."""
    c = torch.arange(n + W - 1, device=device)[None, :]
    r = torch.arange(n, device=device)[:, None]
    return (c < r) | (c > r + W - 1)


class _BandAttention(torch.autograd.Function):
    """Band attention per block of queries, with a hand-written backward (no zero-filled slice gradients).

    Forward per block: ``s = (q * scale) k^T`` over the keys the block reaches, in float32; ``s[r, r + w] +=
    bias_scale * bias[r, w] + mask[r, w]``; ``-inf`` outside the band; ``p = softmax(s)``; ``out = p v`` in the input
    dtype. Backward: ``ds = p * (dp - rowsum(dp * p))`` with ``dp = dout v^T`` in float32; ``dbias`` is the band of
    ``ds`` times ``bias_scale``; ``dq = ds k * scale``, ``dk = ds^T (q * scale)``, ``dv = p^T dout``. Key rows before
    ``grad_start`` (a cache that needs no gradient) get none. The bias and the mask are added block by block, so no
    full (B, H, T, W) float32 sum of the two is ever formed.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        bias: Tensor,
        mask: Tensor | None,
        bias_scale: float,
        block: int,  # type: ignore[override]
        grad_start: int,
    ) -> Tensor:
        T, W = q.shape[2], bias.shape[-1]
        dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
        wide = torch.promote_types(dtype, torch.float32)  # scores and softmax in float32 (float64 for float64)
        keys, values = keys.to(dtype), values.to(dtype)
        outs, saved, outside = [], [], {}
        with torch.autocast(q.device.type, enabled=False):
            keys_w = keys.to(wide)
            for q0 in range(0, T, block):
                q1 = min(T, q0 + block)
                n = q1 - q0
                if n not in outside:
                    outside[n] = _outside_band(n, W, q.device)
                qs = q[:, :, q0:q1] * scale  # (B, H, n, Dh)
                s = torch.matmul(qs.to(wide), keys_w[:, :, q0 : q1 + W - 1].transpose(-1, -2))  # (B, H, n, n + W - 1)
                band = _band_view(s, W).add_(bias[:, :, q0:q1], alpha=bias_scale)
                if mask is not None:
                    band.add_(mask[:, :, q0:q1])
                p = torch.softmax(s.masked_fill_(outside[n], float("-inf")), dim=-1)
                outs.append(torch.matmul(p.to(dtype), values[:, :, q0 : q1 + W - 1]))  # (B, H, n, Dh)
                saved += [qs, p]
        ctx.save_for_backward(keys, values, *saved)
        ctx.block, ctx.W, ctx.scale, ctx.grad_start = block, W, scale, grad_start
        ctx.bias_scale, ctx.bias_dtype = bias_scale, bias.dtype
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
                dp = torch.matmul(d_blk.to(wide), values_w[:, :, q0 : q1 + W - 1].transpose(-1, -2))  # (B, H, n, K)
                ds = torch._softmax_backward_data(dp, p, -1, wide)  # (B, H, n, n + W - 1), 0 outside the band
                if dbias is not None:
                    band = _band_view(ds, W)
                    dbias[:, :, q0:q1] = band if ctx.bias_scale == 1.0 else band * ctx.bias_scale
                ds = ds.to(dtype)
                if need_q:
                    dqs.append(torch.matmul(ds, keys[:, :, q0 : q1 + W - 1]))
                off = max(0, ctx.grad_start - q0)  # key rows before grad_start need no gradient
                if off >= q1 - q0 + W - 1:
                    continue
                if dv is not None:
                    dv[:, :, q0 + off : q1 + W - 1] += torch.matmul(p.to(dtype)[..., off:].transpose(-1, -2), d_blk)
                if dk is not None:
                    dk[:, :, q0 + off : q1 + W - 1] += torch.matmul(ds[..., off:].transpose(-1, -2), qs)
        dq = (torch.cat(dqs, dim=2) if len(dqs) > 1 else dqs[0]).mul_(scale) if need_q else None
        return dq, dk, dv, dbias, None, None, None, None


def band_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor,
    block: int,
    grad_start: int = 0,
    mask: Tensor | None = None,
    bias_scale: float = 1.0,
) -> Tensor:
    """Softmax attention of each query over its own window of keys, plus an additive band bias.

    q (B, H, T, Dh) are the content queries (``q + u``); keys and values (B, H, W - 1 + T, Dh) are the ``W - 1``
    earlier keys followed by the segment's; bias (B, H, T, W) (any float dtype; it gets a gradient) is added to the
    scaled scores in band order (column ``w`` = distance ``W - 1 - w``), times ``bias_scale``, and so is ``mask``
    (broadcastable to (B, H, T, W), float32, no gradient: ``-inf`` for keys that do not exist). Each row must have a
    finite entry. Returns (B, H, T, Dh) = ``sum_w softmax_w(q_t . k_{t+w} / sqrt(Dh) + bias_scale bias_tw +
    mask_tw) v_{t+w}``.

    Queries are processed in blocks of ``block``; each block computes dense scores against the ``block + W - 1``
    keys it can reach (matmuls beat gathers), adds the bias and the mask on the band (a strided view: no skew copy)
    and applies the softmax in float32 (also under bf16 autocast; the products with the values run in the input
    precision). ``grad_start``: key rows before it get no gradient (pass ``W - 1`` when the earlier keys are a
    detached cache).
    """
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    return _BandAttention.apply(q, keys, values, bias, mask, bias_scale, block, grad_start)


class RelativeProjections(nn.Module):
    """The parameters of Transformer-XL attention (Dai et al. 2019, §3.3): Q/K/V, ``W_R`` for the sinusoidal
    positions, the output projection, and the biases ``u``, ``v`` when a layer owns them (``own_bias``; otherwise
    the decoder shares one pair across layers). GPT-2 initialisation, output scaled by 1/sqrt(2 n_layer)."""

    def __init__(self, cfg: ModelConfig, own_bias: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.r_net = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # W_R
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.qkv, cfg.init_std)
        init_linear(self.r_net, cfg.init_std)
        init_linear(self.out_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))
        self.pos_bias_u = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if own_bias else None
        self.pos_bias_v = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if own_bias else None
