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
no relative shift is needed at all. The content term and the softmax are the band attention of
:mod:`longctx.layers.attention` (:func:`~longctx.layers.attention.band_attention`), which adds this position term to
the band of each block of scores, as the official code's ``_rel_shift`` does without its pad-and-reshape copies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.layers.kept import KeepsTables
from longctx.layers.mlp import init_linear


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
    (B T D^2, then B T H W D) wins for a few queries with autograd on. (Without autograd the layers keep the
    projected table between calls: :meth:`RelativeProjections.position_term`.)
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


class RelativeProjections(KeepsTables):
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

    def position_term(self, q_pos: Tensor, table: Tensor) -> Tensor:
        """:func:`position_scores` with this layer's ``W_R``: q_pos (B, H, T, Dh), table (W, D) -> (B, H, T, W).

        Without autograd (evaluation, generation) the projected table ``W_R R`` (H, Dh, W) depends on the weights only:
        it is kept for the next call (:class:`~longctx.layers.kept.KeepsTables`) and each call is one product with
        the queries, also for a single token.
        """
        weight = self.r_net.weight
        if torch.is_grad_enabled():
            return position_scores(q_pos, weight, table)

        def project() -> Tensor:
            rel = F.linear(table.to(q_pos.dtype), weight.to(q_pos.dtype))  # (W, H * Dh)
            return rel.view(-1, self.n_head, self.head_dim).permute(1, 2, 0).contiguous()  # (H, Dh, W)

        rel = self.kept(f"position_table_{q_pos.dtype}", [weight], [table], project)
        return torch.matmul(q_pos, rel)  # (B, H, T, W)
