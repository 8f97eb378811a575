"""Causal AFT kernels: exact, stable prefix sums of ``exp(key + bias) * value`` in a parallel and a recurrent form.

Zhai et al. 2021, "An Attention Free Transformer" (arXiv 2105.14103), eq. (2) restricted to the past (the paper's
footnote on the causal mode) with a relative position bias ``b(δ)``, ``δ = t - t'``::

    num_t = Σ_{t' <= t} exp(K_{t'} + b(t - t')) ⊙ V_{t'}        den_t = Σ_{t' <= t} exp(K_{t'} + b(t - t'))
    y_t   = num_t / den_t                                          (the caller multiplies by σ(Q_t))

``b(δ)`` is learned for ``δ < s`` (``log_w``, one row per head; ``s = 1`` with ``b(0) = 0`` is AFT-simple, eq. 4).
Beyond the window, two rules:

* ``uniform`` (the paper, AFT-local eq. 3): ``b(δ) = 0``, far tokens keep contributing through ``exp(K)`` alone;
* ``decay``: ``b(δ) = -λ_c (δ - s + 1)`` per key channel c (``-λ_c`` at ``δ = s``, falling linearly with the
  distance), ``λ_c > 0`` given by the caller (``decay``, (H, Dk)); a numerator channel uses the decay of its key
  channel (channel d of the head when Dk = Dh, the head's only key when Dk = 1). This is the learned per-channel
  time decay of RWKV (Peng et al. 2023, arXiv 2305.13048) applied to AFT's far past: ``1/λ_c`` is the time
  constant, in tokens, over which channel c forgets.

Split at the window. The last ``s - 1`` tokens and the query itself form the *window*, a banded product with the
weights ``exp(b(δ))`` (the depth-wise convolution of AFT-conv, eq. 5). The tokens at distance ``>= s`` form the
*far sums* ``F``: with ``uniform`` a plain running sum; with ``decay`` ``F_{t+1} = exp(-λ) (F_t + z_{t+1-s})``
(every step multiplies the whole far past by ``exp(-λ) <= 1``, and the token that leaves the window enters with
``exp(-λ)``). The memory of a stream (:class:`Memory`) is therefore: the far sums of the next token ``(num,
den)``, the terms ``[exp(K - ref) V, exp(K - ref)]`` of the last ``s - 1`` tokens, and the reference ``ref`` both
are relative to: O(channels x s) per layer, whatever the length of the stream. Zeros are the empty memory, and a new
maximum rescales all of it with one multiplication, so a single-token step touches each remembered term about three
times (rescale, append, sum).

Parallel form (:func:`aft_parallel`). The queries are cut into blocks of :data:`BAND_BLOCK`. For a block, the
window is one Toeplitz matrix ``A[i, j] = f(M + i - j)`` (``f(δ) = exp(b(δ))`` on the window, 0 for the future)
applied to the block's keys: one matrix product per block (:class:`_BlockToeplitz`). ``uniform``: the same matrix
also holds the far terms inside the block (``f = exp(0)`` beyond the window, one weight per head) and the far sums
of everything before the block are added as a vector. ``decay``: the far weights differ per channel, so the far
entries of ``A`` are 0 and :func:`decayed_far` computes ``F`` for every query: the blocks step together through the
recurrence ``S_i = exp(-λ) (S_{i-1} + z_{i-1})`` inside a block (element-wise, Q steps) and a vector carried from
block to block adds ``exp(-λ i) P``; all its factors are ``exp(-λ k)``, k >= 0. No loop over single tokens of the
segment, no cumulative sum along time (slow on the CPU).

Stability (the paper's max subtraction, done as in online softmax). Every exponential is taken relative to a
reference that is at least as large as its argument, so no term exceeds 1 and nothing overflows, whatever the keys:

* keys, per channel: ``ref`` is the running maximum of every key read so far; the memory is kept relative to it
  and rescaled by ``exp(ref_old - ref_new) <= 1`` when it grows (the recurrent form does this at every token);
* biases, per row: ``β = max(0, max_δ b(δ))`` is subtracted from the bias of every distance (``exp(b - β) <= 1``);
  it is the row maximum of every row that reaches beyond the window, and an upper bound for the first ``s - 1``
  rows of a stream. A constant per row cancels in ``num / den``, so this changes nothing but the range.
* decay: the far bias ``-λ (δ - s + 1)`` is < 0 and only ever applied as factors ``exp(-λ k) <= 1`` to terms that
  are already relative to ``ref``, so the scheme above is unchanged (never a factor ``exp(+λ k)``).

Within a segment the parallel form needs one reference per matrix product, while the exact reference of query t is
its running maximum ``m_t``, which grows along the segment. Using the segment maximum ``R`` for every query is exact
as long as the terms that matter do not underflow, i.e. as long as ``R - m_t`` stays well inside the float32 exponent
range. Queries are therefore grouped in *levels*: query t uses ``R - l * LEVEL_STEP`` with ``l = floor((R - m_t) /
LEVEL_STEP)``, a reference less than ``LEVEL_STEP`` above its own running maximum. Since ``m_t`` only grows, the
queries of levels >= 1 are a prefix of the segment (the tokens before the keys reach their maximum), and the extra
passes only cover that prefix; after the first segment of a stream the running maximum is rarely exceeded by much, so
one pass is the rule. What is exact: a query whose largest term ``K + b`` is within ~50 of its reference: that term
is then above ``exp(-LEVEL_STEP - 50)``, and every term within float32 rounding of it (a factor ``exp(-17)``) is
still a normal number (``> exp(-87)``). With ``uniform`` this holds for keys of any size (up to ``MAX_LEVELS *
LEVEL_STEP`` of spread per segment) with learned biases spanning up to ~50 (``max(0, max b) - min(0, min b)``),
because the key that set the running maximum stays in every later sum with a weight of at least ``exp(min b)``.
With ``decay`` that key fades, so the condition becomes: the keys a query relies on (its own and its window's, or
a decayed far one) are within ~50 of the channel's running maximum, minus the bias span. Keys from normalised
inputs are a few units apart, far inside that; a key that towers 100 above every later one leaves the later queries
with underflowed sums once the decay has removed it (they stay finite, but lose accuracy). The recurrent form uses
``m_t`` itself and has 16 more in range. Beyond that, results stay finite (denominators are clamped at
``DEN_FLOOR``) but lose accuracy (the tests check biases of ±20 with keys of ±200). Over long streams the uniform far
sums grow like the token count (each term is <= 1): a million tokens is ~1e6 in float32, rounded at ~6e-8 relative
per addition (tested: 2^20 tokens match a float64 sum to 1e-5); the decayed ones are bounded by ~1/λ + 1, and the
factor of a term far back is a product of one ``exp(-λ Q)`` per block (tested the same way with 1/λ = 1e5 tokens).

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
    far: Tensor  # (H, B, C) far sums of the next token: Σ of the same terms over every older token (distance >= s),
    #              each times exp(-λ (δ - s + 1)) with decay (δ its distance from the next token)
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
    def forward(
        ctx,
        z: Tensor,
        weights: Tensor,
        far0: Tensor,
        far_w: Tensor,  # type: ignore[override]
        n_queries: int,
    ) -> Tensor:
        H, L, N = z.shape
        M, block = L - n_queries, weights.shape[1]
        y = z.new_empty(H, n_queries, N)
        prefix = far0.clone()  # (H, N): far sums of every key before the current block
        for q0 in range(0, n_queries, block):
            rows = min(block, n_queries - q0)
            torch.baddbmm(
                (prefix * far_w)[:, None],
                weights[:, :rows, : rows + M],
                z[:, q0 : q0 + rows + M],
                out=y[:, q0 : q0 + rows],
            )  # (H, rows, N)
            prefix += z[:, q0 : q0 + rows].sum(dim=1)  # these keys are beyond the window of the next block
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
            dyb = dy[:, q0 : q0 + rows]  # (H, rows, N)
            dz[:, q0 : q0 + rows + M].baddbmm_(weights[:, :rows, : rows + M].transpose(1, 2), dyb)
            dw[:, :rows, : rows + M].baddbmm_(dyb, z[:, q0 : q0 + rows + M].transpose(1, 2))
            dz[:, q0 : q0 + rows] += later[:, None]
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


def widen(per_key: Tensor, n_values: int) -> Tensor:
    """(..., Dk) per key channel -> (..., Dh + Dk) per term channel: numerator channel d uses key channel d (Dk =
    Dh) or the head's single key channel (Dk = 1), the denominator channels use their own."""
    Dk = per_key.shape[-1]
    return torch.cat([per_key.expand(*per_key.shape[:-1], n_values) if Dk == 1 else per_key, per_key], dim=-1)


def decayed_far(z: Tensor, far0: Tensor, decay: Tensor) -> Tensor:
    """The decayed far sums of every query of a segment and of the next token: F (H, T + 1, B, C) with
    ``F_p = exp(-λ p) far0 + Σ_{j < p} exp(-λ (p - j)) z_j`` (per channel; F_T is the memory's next ``far``).

    z (H, T, B, C): the terms that leave the window during the segment (``z_j`` is at distance ``s`` from query j+1),
    far0 (H, B, C), decay λ (H, Dk). The segment is cut into blocks of :data:`BAND_BLOCK` rows, all blocks stepping
    together through the recurrence ``S_i = exp(-λ) (S_{i-1} + z_{i-1})`` (Q element-wise steps over (H, blocks, B,
    C), in the layout of z); between blocks a carried vector ``P <- exp(-λ Q) P + S_Q`` adds ``exp(-λ i) P`` to row
    i. Every factor is ``exp(-λ k)`` with k >= 0, i.e. <= 1, and a factor is rounded at most Q times in a row
    before the carry takes over with ``exp(-λ Q)`` rounded once per block.
    """
    H, T, B, C = z.shape
    Q = BAND_BLOCK
    nb = max(1, -(-T // Q))
    if nb * Q != T:
        z = torch.nn.functional.pad(z, (0, 0, 0, 0, 0, nb * Q - T))
    zb = z.view(H, nb, Q, B, C)
    lam = widen(decay.to(z.dtype), C - decay.shape[-1])[:, None, None]  # (H, 1, 1, C)
    step = torch.exp(-lam)
    rows = [torch.zeros_like(zb[:, :, 0])]  # S_0 = 0: row i of a block holds Σ_{j < i} exp(-λ (i - j)) z_j
    for zi in zb.unbind(dim=2):  # unbind, not slices: one gradient tensor for all rows, not one per row
        rows.append(step * (rows[-1] + zi))
    intra = torch.stack(rows[:Q], dim=2)  # (H, nb, Q, B, C)
    powers = torch.exp(-lam[:, :, None] * torch.arange(Q + 1, device=z.device, dtype=z.dtype)[:, None, None])
    carry, carries = far0, []  # (H, B, C): F at the first query of a block
    for total in rows[Q].unbind(dim=1):
        carries.append(carry)
        carry = powers[:, 0, Q] * carry + total
    F = intra + powers[:, :, :Q] * torch.stack(carries, dim=1)[:, :, None]  # (H, nb, Q, B, C)
    return torch.cat([F.view(H, nb * Q, B, C), carry[:, None]], dim=1)[:, : T + 1]


def _pass(
    memory: Memory,
    keys: Tensor,
    values: Tensor,
    prev: Tensor,
    ref: Tensor,
    weights: Tensor,
    far_w: Tensor,
    clamp: bool,
    decay: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass of the parallel form over the T new tokens with the reference ``ref`` (H, B, Dk). Returns y (H, T, B,
    Dh), the terms of ``[window ; segment]`` (H, M + T, B, C) and the far sums of the next token (H, B, C)."""
    H, T, B, Dk = keys.shape
    Dh = values.shape[-1]
    scale = _rescale(memory.far, prev, ref)  # (H, B, C)
    z = torch.cat([memory.window * scale[:, None], _terms(keys, values, ref, clamp)], dim=1)  # (H, M + T, B, C)
    far0 = memory.far * scale  # (H, B, C)
    if decay is None:  # uniform: the far sums inside a block are part of the Toeplitz product
        total = _BlockToeplitz.apply(z.flatten(2), weights, far0.flatten(1), far_w, T).view(H, T, B, Dh + Dk)
        far_next = far0 + z[:, :T].sum(dim=1)  # the first T terms leave the window (distance >= s from the next token)
    else:  # decay: the Toeplitz product covers the window only (its far entries are 0), the far sums come apart
        zero = far_w.new_zeros(far_w.shape)
        window = _BlockToeplitz.apply(z.flatten(2), weights, far0.new_zeros(H, far0[0].numel()), zero, T)
        F = decayed_far(z[:, :T], far0, decay)  # (H, T + 1, B, C)
        total = window.view(H, T, B, Dh + Dk) + far_w[:, :, None, None] * F[:, :T]
        far_next = F[:, T]
    y = total[..., :Dh] / total[..., Dh:].clamp_min(DEN_FLOOR)  # (H, T, B, Dh); Dk = 1 broadcasts over the head
    return y, z, far_next


def aft_parallel(
    memory: Memory, keys: Tensor, values: Tensor, started: Tensor, log_w: Tensor | None, decay: Tensor | None = None
) -> tuple[Tensor, Memory]:
    """Parallel form over a segment: ``y = num / den`` for its T queries and the memory after it.

    keys (H, T, B, Dk) and values (H, T, B, Dh) of the new tokens, in float32; started (B,) is false for streams
    that have read nothing (their ``memory.ref`` is meaningless). ``log_w`` (H, M + 1), or None for no bias (then
    M = 0). ``decay`` (H, Dk): λ > 0 of the far bias ``-λ (δ - M)`` per key channel, or None for the far bias 0
    (uniform). Returns y (H, T, B, Dh) and the memory after the segment, relative to the new running maximum.
    """
    H, T = keys.shape[:2]
    if T == 0:  # nothing new: nothing changes
        return values.new_zeros(values.shape), memory
    window_w, far_w = bias_weights(log_w, H, keys)  # (H, s), (H, 1)
    inner_far = far_w if decay is None else far_w.new_zeros(far_w.shape)  # decay: far terms are added apart
    weights = toeplitz_weights(window_w, inner_far, min(BAND_BLOCK, T))  # (H, Q, Q + M)
    prev = torch.where(started[:, None], memory.ref, float("-inf"))  # (H, B, Dk)
    top, level, n_levels = _levels(prev, keys)
    y, z, far_next = _pass(memory, keys, values, prev, top, weights, far_w, False, decay)
    for lv in range(1, n_levels):  # rare: queries whose running maximum is >= LEVEL_STEP below the segment's
        n = int((level >= lv).flatten(2).any(dim=2).any(dim=0).sum())  # a prefix: the running maximum only grows
        y_lv = _pass(memory, keys[:, :n], values[:, :n], prev, top - lv * LEVEL_STEP, weights, far_w, True, decay)[0]
        y = torch.cat([torch.where(level[:, :n] == lv, y_lv, y[:, :n]), y[:, n:]], dim=1)  # (H, T, B, Dh)
    return y, Memory(window=z[:, T:], far=far_next, ref=top)


def aft_recurrent(
    memory: Memory, keys: Tensor, values: Tensor, started: Tensor, log_w: Tensor | None, decay: Tensor | None = None
) -> tuple[Tensor, Memory]:
    """Recurrent form for one new token: the same arguments and result as :func:`aft_parallel` with T = 1.

    The running maximum absorbs the new key, the memory is rescaled to it (one multiplication), the window is a
    weighted sum over the M remembered tokens and the new one, and the oldest token moves into the far sums
    (decay: ``far <- exp(-λ) (far + oldest)``, so the far sums are always those of the next query).
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
    far_next = far0 + z[:, 0]
    if decay is not None:
        far_next = far_next * torch.exp(-widen(decay.to(far0.dtype), Dh))[:, None]  # (H, 1, C) factors <= 1
    return y[:, None], Memory(window=z[:, 1:], far=far_next, ref=top)
