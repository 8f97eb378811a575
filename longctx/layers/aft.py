"""Causal AFT kernels: exact, stable prefix sums of ``exp(key + bias) * value`` in a parallel and a recurrent form.

Zhai et al. 2021, "An Attention Free Transformer" (arXiv 2105.14103), eq. (2) restricted to the past (the paper's
footnote on the causal mode) with a relative position bias ``b(δ)``, ``δ = t - t'``::

    num_t = Σ_{t' <= t} exp(K_{t'} + b(t - t')) ⊙ V_{t'}        den_t = Σ_{t' <= t} exp(K_{t'} + b(t - t'))
    y_t   = num_t / den_t                                          (the caller multiplies by σ(Q_t))

``b(δ)`` is learned for ``δ < s`` (``log_w``, one row per head) and 0 for ``δ >= s`` (AFT-local, eq. 3: far tokens
keep contributing through ``exp(K)`` alone); ``s = 1`` with ``b(0) = 0`` is AFT-simple (eq. 4).

Split at the window. The tokens at distance ``>= s`` all have bias 0, so their contribution is a running sum (the
*far sums*). The last ``s - 1`` tokens and the query itself form the *window*, a banded product with the weights
``exp(b(δ))`` (the depth-wise convolution of AFT-conv, eq. 5). The memory of a stream (:class:`Memory`) is
therefore: the far sums ``(num, den)``, the terms ``[exp(K - ref) V, exp(K - ref)]`` of the last ``s - 1`` tokens, and
the reference ``ref`` both are relative to. Zeros are the empty memory, and a new maximum rescales all of it with one
multiplication, so a single-token step touches each remembered term about three times (rescale, append, sum).

Parallel form (:func:`aft_parallel`). The queries are cut into blocks of :data:`BAND_BLOCK`. For a block, the
window and the part of the far sums that lies inside the block are one Toeplitz matrix ``A[i, j] = f(M + i - j)``
(``f(δ) = exp(b(δ))`` on the window, ``exp(0)`` beyond it, 0 for the future) applied to the block's keys: one matrix
product per block (:class:`_BlockToeplitz`), and the far sums of everything before the block are added as a vector.
No loop over tokens, no cumulative sum along time (slow on the CPU), and the work is ``block + s - 1`` multiply-adds
per query and channel.

Stability (the paper's max subtraction, done as in online softmax). Every exponential is taken relative to a
reference that is at least as large as its argument, so no term exceeds 1 and nothing overflows, whatever the keys:

* keys, per channel: ``ref`` is the running maximum of every key read so far; the memory is kept relative to it
  and rescaled by ``exp(ref_old - ref_new) <= 1`` when it grows (the recurrent form does this at every token);
* biases, per row: ``β = max(0, max_δ b(δ))`` is subtracted from the bias of every distance (``exp(b - β) <= 1``);
  it is the row maximum of every row that reaches beyond the window, and an upper bound for the first ``s - 1``
  rows of a stream. A constant per row cancels in ``num / den``, so this changes nothing but the range.

Within a segment the parallel form needs one reference per matrix product, while the exact reference of query t is
its running maximum ``m_t``, which grows along the segment. Using the segment maximum ``R`` for every query is exact
as long as the terms that matter do not underflow, i.e. as long as ``R - m_t`` stays well inside the float32 exponent
range. Queries are therefore grouped in *levels*: query t uses ``R - l * LEVEL_STEP`` with ``l = floor((R - m_t) /
LEVEL_STEP)``, a reference less than ``LEVEL_STEP`` above its own running maximum. Since ``m_t`` only grows, the
queries of levels >= 1 are a prefix of the segment (the tokens before the keys reach their maximum), and the extra
passes only cover that prefix; after the first segment of a stream the running maximum is rarely exceeded by much, so
one pass is the rule. What is exact: keys of any size (up to ``MAX_LEVELS * LEVEL_STEP`` of spread per segment) with
learned biases spanning up to ~50 (``max(0, max b) - min(0, min b)``): a query's largest term is then above
``exp(-LEVEL_STEP - 50)``, and every term within float32 rounding of it (a factor ``exp(-17)``) is still a normal
number (``> exp(-87)``). The recurrent form uses ``m_t`` itself and has 16 more in range. Beyond that, results stay
finite (denominators are clamped at ``DEN_FLOOR``) but lose accuracy (the tests check biases of ±20 with keys of
±200). Over long streams the far sums grow like the token count (each term is <= 1): a million tokens is ~1e6 in
float32, rounded at ~6e-8 relative per addition (tested: 2^20 tokens match a float64 sum to 1e-5).

Precision: exponentials, sums and products run in float32 (``promote_types(dtype, float32)``), autocast off.

Layout: time-major with the heads first, so that one head's terms are a (time, B * channels) matrix and a block of
queries is one matrix product. H heads, L = M + T (the window cache of M = s - 1 tokens, then the T new ones), B
batch, Dk key channels per head (Dh for simple/local/full, 1 for conv), Dh value channels per head, C = Dh + Dk
(numerator and denominator channels side by side).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LEVEL_STEP = 16.0  # keys: a query's reference is within this of its running maximum (exp(-16) ~ 1e-7)
MAX_LEVELS = 64  # at most this many passes per segment (keys spread over up to 64 * 16 = 1024 stay exact)
DEN_FLOOR = 1e-30  # denominators below this are clamped (they only occur beyond the exact range above)
BAND_BLOCK = 32  # queries per block of the parallel form (16-64 measured about equally fast for s <= 64)


class Memory(NamedTuple):
    """The memory of a stream for one layer, everything relative to ``ref``; zeros = nothing read.

    The numerator and denominator channels sit side by side (C = Dh + Dk), so that one product serves both.
    """

    window: Tensor  # (H, M, B, C) [exp(K - ref) V, exp(K - ref)] of the last M tokens, oldest first
    far: Tensor  # (H, B, C) Σ of the same terms over every older token (distance >= s from the next token)
    ref: Tensor  # (H, B, Dk) running maximum of every key read so far; meaningless before the first token


def bias_weights(log_w: Tensor | None, n_heads: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(b(δ) - β)`` (H, s) for the window and ``exp(-β)`` (H, 1) for the far part, ``β`` per head.

    ``log_w`` (H, s) is the bias of distances 0..s-1 (None: no bias, AFT-simple). ``β = max(0, max_δ b(δ))`` is a
    constant (detached): it cancels in num / den and only keeps every weight <= 1.
    """
    if log_w is None:
        ones = like.new_ones(n_heads, 1)
        return ones, ones
    log_w = log_w.to(like.dtype)
    beta = log_w.detach().amax(dim=1, keepdim=True).clamp_min(0.0)  # (H, 1)
    return torch.exp(log_w - beta), torch.exp(-beta)


def toeplitz_weights(window_w: Tensor, far_w: Tensor, rows: int) -> Tensor:
    """(H, rows, rows + M) matrix ``A[h, i, j] = f(M + i - j)``: query i of a block, key j of its window.

    ``f(δ) = window_w[h, δ]`` for ``0 <= δ <= M``, ``far_w[h]`` for ``δ > M`` (far tokens inside the block) and 0
    for ``δ < 0`` (the future).
    """
    H, s = window_w.shape
    M = s - 1
    device = window_w.device
    delta = M + torch.arange(rows, device=device)[:, None] - torch.arange(rows + M, device=device)[None, :]
    inside = window_w[:, delta.clamp(0, M)]  # (H, rows, rows + M)
    weights = torch.where(delta > M, far_w[:, :, None], inside)
    return torch.where(delta < 0, weights.new_zeros(()), weights)


class _BlockToeplitz(torch.autograd.Function):
    """``y[:, p] = A_b @ z[:, q0 : q0 + rows + M] + far_w * (far0 + Σ_{j < q0} z[:, j])`` for the block b of queries
    ``q0 : q0 + rows`` (row ``p - q0`` of the product); z (H, L, N), A (H, Q, Q + M), far0 (H, N) -> y (H, T, N).

    Forward and backward loop over the blocks and write into preallocated tensors: autograd through slices of z would
    allocate one full-size gradient per block. ``far_w`` (H, 1) is a constant.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weights: Tensor, far0: Tensor, far_w: Tensor,  # type: ignore[override]
                n_queries: int) -> Tensor:
        H, L, N = z.shape
        M, block = L - n_queries, weights.shape[1]
        y = z.new_empty(H, n_queries, N)
        prefix = far0.clone()  # (H, N): far sums of every key before the current block
        for q0 in range(0, n_queries, block):
            rows = min(block, n_queries - q0)
            torch.baddbmm((prefix * far_w)[:, None], weights[:, :rows, :rows + M], z[:, q0:q0 + rows + M],
                          out=y[:, q0:q0 + rows])  # (H, rows, N)
            prefix += z[:, q0:q0 + rows].sum(dim=1)  # these keys are beyond the window of the next block
        ctx.save_for_backward(z, weights, far_w)
        ctx.n_queries = n_queries
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        z, weights, far_w = ctx.saved_tensors
        T, (H, L, N), block = ctx.n_queries, z.shape, weights.shape[1]
        M = L - T
        dz, dw = torch.zeros_like(z), torch.zeros_like(weights)
        later = z.new_zeros(H, N)  # Σ over the later blocks of d(prefix): what a key before them receives
        for q0 in reversed(range(0, T, block)):
            rows = min(block, T - q0)
            dyb = dy[:, q0:q0 + rows]  # (H, rows, N)
            dz[:, q0:q0 + rows + M].baddbmm_(weights[:, :rows, :rows + M].transpose(1, 2), dyb)
            dw[:, :rows, :rows + M].baddbmm_(dyb, z[:, q0:q0 + rows + M].transpose(1, 2))
            dz[:, q0:q0 + rows] += later[:, None]
            later += dyb.sum(dim=1) * far_w
        return dz, dw, later, None, None


def _terms(keys: Tensor, values: Tensor, ref: Tensor, clamp: bool) -> Tensor:
    """z = [exp(K - ref) V, exp(K - ref)] (H, T, B, Dh + Dk). ``clamp``: exponents above 0 (keys above ``ref``, which
    only come after the queries that use this reference) are clamped so that nothing overflows."""
    diff = keys - ref[:, None]  # (H, T, B, Dk)
    x = torch.exp(diff.clamp(max=0.0) if clamp else diff)
    return torch.cat([x * values, x], dim=-1)  # (H, T, B, Dh + Dk)


def _rescale(memory: Tensor, prev: Tensor, ref: Tensor) -> Tensor:
    """``exp(prev - ref)`` (<= 1; 0 before the first token) per key channel, widened to the C channels of the terms:
    (H, B, Dh + Dk), a key channel covering all Dh value channels of its head when Dk = 1."""
    scale = torch.exp((prev - ref).clamp(max=0.0))  # (H, B, Dk)
    Dh = memory.shape[-1] - scale.shape[-1]
    return torch.cat([scale.expand(*scale.shape[:-1], Dh), scale], dim=-1)  # (H, B, C)


def _levels(prev: Tensor, new_keys: Tensor) -> tuple[Tensor, Tensor | None, int]:
    """prev (H, B, Dk) running maximum before the segment, new_keys (H, T, B, Dk). Returns the segment maximum R
    (H, B, Dk), the level of every query (H, T, B, Dk; None with a single level) and the number of levels."""
    keys = new_keys.detach()
    top = torch.maximum(prev, keys.amax(dim=1))  # (H, B, Dk)
    if keys.shape[1] == 1:
        return top, None, 1
    lowest = torch.maximum(prev, keys[:, 0])  # the running maximum is lowest at the first query
    spread = float((top - lowest).max())  # one sync per layer and segment
    if not math.isfinite(spread) or spread < LEVEL_STEP:
        return top, None, 1
    running = torch.maximum(prev[:, None], torch.cummax(keys, dim=1).values)  # (H, T, B, Dk)
    level = torch.floor((top[:, None] - running) / LEVEL_STEP).clamp_(0, MAX_LEVELS - 1)  # (H, T, B, Dk)
    return top, level, min(MAX_LEVELS, int(spread // LEVEL_STEP) + 1)


def _pass(memory: Memory, keys: Tensor, values: Tensor, prev: Tensor, ref: Tensor, weights: Tensor,
          far_w: Tensor, clamp: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One pass of the parallel form over the T new tokens with the reference ``ref`` (H, B, Dk). Returns y (H, T, B,
    Dh), the terms of ``[window ; segment]`` (H, M + T, B, C) and the far sums before the window (H, B, C)."""
    H, T, B, Dk = keys.shape
    Dh = values.shape[-1]
    scale = _rescale(memory.far, prev, ref)  # (H, B, C)
    z = torch.cat([memory.window * scale[:, None], _terms(keys, values, ref, clamp)], dim=1)  # (H, M + T, B, C)
    far0 = memory.far * scale  # (H, B, C)
    total = _BlockToeplitz.apply(z.flatten(2), weights, far0.flatten(1), far_w, T).view(H, T, B, Dh + Dk)
    y = total[..., :Dh] / total[..., Dh:].clamp_min(DEN_FLOOR)  # (H, T, B, Dh); Dk = 1 broadcasts over the head
    return y, z, far0


def aft_parallel(memory: Memory, keys: Tensor, values: Tensor, started: Tensor,
                 log_w: Tensor | None) -> tuple[Tensor, Memory]:
    """Parallel form over a segment: ``y = num / den`` for its T queries and the memory after it.

    keys (H, T, B, Dk) and values (H, T, B, Dh) of the new tokens, in float32; started (B,) is false for streams
    that have read nothing (their ``memory.ref`` is meaningless). ``log_w`` (H, M + 1), or None for no bias (then
    M = 0). Returns y (H, T, B, Dh) and the memory after the segment, relative to the new running maximum.
    """
    H, T = keys.shape[:2]
    if T == 0:  # nothing new: nothing changes
        return values.new_zeros(values.shape), memory
    window_w, far_w = bias_weights(log_w, H, keys)  # (H, s), (H, 1)
    weights = toeplitz_weights(window_w, far_w, min(BAND_BLOCK, T))  # (H, Q, Q + M)
    prev = torch.where(started[:, None], memory.ref, float("-inf"))  # (H, B, Dk)
    top, level, n_levels = _levels(prev, keys)
    y, z, far0 = _pass(memory, keys, values, prev, top, weights, far_w, clamp=False)
    for lv in range(1, n_levels):  # rare: queries whose running maximum is >= LEVEL_STEP below the segment's
        n = int((level >= lv).flatten(2).any(dim=2).any(dim=0).sum())  # a prefix: the running maximum only grows
        y_lv = _pass(memory, keys[:, :n], values[:, :n], prev, top - lv * LEVEL_STEP, weights, far_w, clamp=True)[0]
        y = torch.cat([torch.where(level[:, :n] == lv, y_lv, y[:, :n]), y[:, n:]], dim=1)  # (H, T, B, Dh)
    # the first T terms of [window ; segment] leave the window (distance >= s from the next token)
    return y, Memory(window=z[:, T:], far=far0 + z[:, :T].sum(dim=1), ref=top)


def aft_recurrent(memory: Memory, keys: Tensor, values: Tensor, started: Tensor,
                  log_w: Tensor | None) -> tuple[Tensor, Memory]:
    """Recurrent form for one new token: the same arguments and result as :func:`aft_parallel` with T = 1.

    The running maximum absorbs the new key, the memory is rescaled to it (one multiplication), the window is a
    weighted sum over the M remembered tokens and the new one, and the oldest token moves into the far sums.
    """
    Dh = values.shape[-1]
    window_w, far_w = bias_weights(log_w, keys.shape[0], keys)  # (H, s), (H, 1)
    prev = torch.where(started[:, None], memory.ref, float("-inf"))  # (H, B, Dk)
    top = torch.maximum(prev, keys[:, 0].detach())  # (H, B, Dk)
    scale = _rescale(memory.far, prev, top)  # (H, B, C)
    z = torch.cat([memory.window * scale[:, None], _terms(keys, values, top, clamp=False)], dim=1)  # (H, M+1, B, C)
    far0 = memory.far * scale  # (H, B, C)
    total = far0 * far_w[:, :, None] + torch.einsum("hlbc,hl->hbc", z, window_w.flip(-1))  # slot l: distance M - l
    y = total[..., :Dh] / total[..., Dh:].clamp_min(DEN_FLOOR)  # (H, B, Dh)
    return y[:, None], Memory(window=z[:, 1:], far=far0 + z[:, 0], ref=top)
