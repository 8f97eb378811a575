"""∞-former decoder: relative-position short-term memory plus an unbounded continuous long-term memory.

Paper: Martins, Marinho & Martins 2022, "∞-former: Infinite Memory Transformer" (arXiv 2109.00301): §3.1 (long-term
memory: RBF signal, ridge regression, continuous attention), §3.2 (unbounded memory), §3.3 (sticky memories). The LTM
maths lives in :mod:`longctx.layers.continuous`, the Transformer-XL relative attention (Dai et al. 2019, arXiv
1901.02860, §3.3) in :mod:`longctx.layers.relative`; this file is the schedule, the wiring and the streaming state.

Schedule (by absolute positions only, so the outputs do not depend on how the stream is cut). With ``m = mem_len``
and ``L = ltm_block``, a query at position p

* attends exactly (short-term memory, relative attention) to itself and the tokens ``b(p) .. p - 1``, where
  ``b(p) = max(0, L * floor((p - m) / L))`` is its last refit boundary: between ``m`` and ``m + L - 1`` previous
  tokens once the stream is long enough;
* attends continuously to the LTM fitted on the tokens before ``b(p)``: version ``b(p) / L``. Version 1 fits the
  first block ``[0, L)`` alone on [0, 1]; version k + 1 contracts version k into [0, tau] and places the block
  ``[kL, (k+1)L)`` in (tau, 1] (paper §3.2). Version 0 is empty: no LTM output.

Refits are lazy: the state holds the version of the last token read, ``b(p - 1) / L``, and a version is fitted in the
call that holds its first reader (position ``kL + m``), so the refit is in the graph of the segment that reads it, as
in the official code (which updates the memory at the start of each segment's forward). With truncated backprop (the
state detached between steps) and ``m = L = seq_len`` every block comes from the previous segment, detached, yet the
parameters applied in the refit (the gate) still get a gradient.

A block leaves the exact window when its first reader arrives, so the pending blocks need no storage of their own:
the cache holds, per layer, the keys and values of the last ``C = m + L - 1`` tokens (the exact window) and the LTM
inputs of the last ``C + 1 = m + L`` tokens (the oldest block token is needed by the call of its first reader). A
segment may cross several boundaries. Per layer, the blocks of all its refits are gated and regressed at once; the
versions are then computed in order (version k + 1 needs version k and, with sticky memories, the attention of
version k's queries). Uniform memories then attend all groups of queries at once, each query over its own version;
sticky memories attend each group before the refit that follows it. Rows of a batch may sit at different positions
(after a reset): every row has its own boundaries, a group is the union of the rows' queries with a mask.

The LTM input of a token is the normalised layer input (the text the short-term keys and values are projected from);
the LTM query is the short-term query ``q`` (before the position biases), as in the official code. Old coefficients
enter each update detached (no gradient into them, §3.2); the newest block keeps its gradient where it is in the
graph (a block from the cache is detached like the cache).

Input gate (``gate``, on in the official configurations): before its regression a block X (L, D) becomes
``X * sigmoid(Conv1d_k3(X))``, a centred kernel-3 convolution over the block zero-padded at its two ends (PyTorch's
default initialisation), as the official code does. It is causal: the block is complete and older than every query
that reads the version, and it is cut by absolute positions (chunking-invariant).

Output of the LTM (``ltm_out``): "shared" adds the continuous attention context ``V^T r`` per head to the short-term
attention output before the shared output projection; "separate" (the official code) gives it its own bias-free
``Linear(d_model, d_model)`` output projection (initialised as the attention's output projection here, PyTorch's
default there) and adds the result after the attention's output projection.

Sticky memories (§3.3): the state accumulates, per layer, the attention mass over ``sticky_bins`` bins of [0, 1] of
every query that read the current version; the update samples the old signal at the quantiles of that histogram
(deterministic: a function of the stream, not of a random draw). KL regulariser (the official code): ``kl_weight *
sum over layers of mean KL(N(mu, sigma^2) || N(mu_0, sigma_0^2))``, in ``aux_loss`` in training mode.

State (:class:`InfiniteState`), per layer: keys and values of the last C tokens, LTM inputs of the last C + 1, the
N x D coefficients of the current version, the sticky histogram; plus the position. All fixed-size: ``nbytes()``
never changes.

Block (pre-norm, as the other decoders; "shared" output form)::

    x ──┬─ LN ─ h ─┬─ Q,K,V ─ relative attention over [cache ; segment] ──(+)─ proj ─(+)──┬─ LN ─ MLP ─(+)── x'
        │          │           continuous attention over the LTM version of each query ─┘   │  │               │
        │          └─ LTM inputs (cache) ─ gate ─ refit at every boundary                   │  └───────────────┘
        └──────────────────────────────────────────────────────────────────────────────────┘

"separate": ``proj(relative attention) + proj_LTM(continuous attention)`` takes the place of ``proj(... (+) ...)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.layers.attention import BLOCK, band_attention
from longctx.layers.block import PreNormBlock
from longctx.layers.cache import grown_buffers, join, next_cache
from longctx.layers.continuous import (
    ContinuousAttention,
    ContinuousMemory,
    attended_mass,
    gaussian_kl,
    histogram_quantiles,
)
from longctx.layers.mlp import init_linear
from longctx.layers.relative import RelativeProjections, sinusoid_table


@dataclass(frozen=True)
class InfiniteState(State):
    keys: Tensor  # (B, L, H, C, Dh) projected keys of the last C = mem_len + ltm_block - 1 tokens, oldest first
    values: Tensor  # (B, L, H, C, Dh)
    inputs: Tensor  # (B, L, C + 1, D) LTM inputs (normalised layer inputs) of the last C + 1 tokens: pending blocks
    coeffs: Tensor  # (B, L, N, D) LTM coefficients fitted on the tokens before b(position - 1); zeros = empty
    mass: Tensor  # (B, L, bins) sticky: attention mass over [0, 1] of the queries that read `coeffs` so far
    position: Tensor  # (B,) int64: tokens read so far = absolute position of the next token


# --------------------------------------------------------------------------------------------------------------------
# schedule


@dataclass(frozen=True)
class _Group:
    """The queries of version k of every row: mask (B, T) and the union range ``t0:t1`` of their indices."""

    t0: int
    t1: int
    mask: Tensor  # (B, t1 - t0) bool: queries of this version whose LTM is not empty
    count: int  # number of true entries of mask


@dataclass(frozen=True)
class _Refit:
    """Update from version k to k + 1 in the rows that cross a boundary."""

    rows: Tensor  # (B,) bool: the row crosses this boundary
    first: Tensor  # (B,) bool: the new version is version 1 (fit the block alone)
    slots: Tensor  # (B, ltm_block) int64: indices of the block in [cache ; segment]
    any_first: bool
    any_update: bool
    every_row: bool  # every row crosses it (no row keeps its version)
    in_cache: bool  # every row's block lies in the input cache (not in the segment)


@dataclass(frozen=True)
class _Schedule:
    valid: Tensor  # (B, 1, T, W) float32: 0 where the key at that distance is in the query's exact window, else -inf
    floors: list[int]  # (T,) per query, its first key in [cache ; segment] that any row's window holds
    groups: list[_Group | None] = field(default_factory=list)  # per version k = 0..K (None: no query reads it)
    refits: list[_Refit] = field(default_factory=list)  # per boundary k -> k + 1, k = 0..K - 1
    version: Tensor | None = None  # (B, T) int64: the version k each query reads; -1 where its LTM is empty


def _boundary(p: int, mem_len: int, block: int) -> int:
    """b(p) = max(0, block * floor((p - mem_len) / block)): the tokens before it are in the LTM of query p."""
    return max(0, block * ((p - mem_len) // block))


SCHEDULES_KEPT = 1024  # small calls' schedules kept (decoding cycles through ltm_block of them per stream)
KEPT_QUERIES = 16  # calls of at most this many queries (rows x tokens) keep their schedules


def make_schedule(positions: list[int], T: int, mem_len: int, block: int, device: torch.device | str) -> _Schedule:
    """The windows, query groups and refits of a segment of T tokens for rows starting at ``positions``.

    The schedule depends on a position only through its place in the refit cycle once the row's LTM holds a version
    after the first (``p >= mem_len + 2 block``): such positions are replaced by the one of the same phase in the
    cycle after that (:func:`_periodic`), and the schedules of small calls (single tokens of decoding) are kept, so
    a token of decoding does not build its windows and groups again (they are never changed in place).
    """
    if len(positions) * T <= KEPT_QUERIES:
        canonical = tuple(_periodic(p, mem_len, block) for p in positions)
        return _kept_schedule(canonical, T, mem_len, block, torch.device(device))
    return _make_schedule(positions, T, mem_len, block, torch.device(device))


def _periodic(p: int, mem_len: int, block: int) -> int:
    """The position of the same phase as ``p`` in the refit cycle, for positions past the second version."""
    start = mem_len + 2 * block
    return p if p < start else start + (p - mem_len) % block


@functools.lru_cache(maxsize=SCHEDULES_KEPT)
def _kept_schedule(positions: tuple[int, ...], T: int, mem_len: int, block: int, device: torch.device) -> _Schedule:
    with torch.inference_mode(False):  # plain tensors, which a later training call may also save for its backward
        return _make_schedule(list(positions), T, mem_len, block, device)


def _make_schedule(positions: list[int], T: int, mem_len: int, block: int, device: torch.device) -> _Schedule:
    """:func:`make_schedule`, built.

    A row's state holds the version of its last token read, b(p - 1) / L; a refit runs in the call of the first query
    that reads the new version (lazily: its graph then holds the refit, so the gate gets a gradient).
    """
    W = mem_len + block
    pos = torch.tensor(positions, dtype=torch.int64)[:, None] + torch.arange(T)  # (B, T), on the CPU
    reach = pos - torch.clamp(block * torch.div(pos - mem_len, block, rounding_mode="floor"), min=0)  # p - b(p)
    floors = (torch.arange(T) + W - 1 - reach).amin(0).tolist()  # query t's oldest key sits at t + W - 1 - reach
    reach = reach.to(device)
    distances = torch.arange(W - 1, -1, -1, device=device)  # (W,) band order
    valid = torch.zeros(pos.shape + (W,), device=device).masked_fill_(distances > reach[..., None], float("-inf"))
    bases = [_boundary(p - 1, mem_len, block) for p in positions]  # the state's version (0 for a fresh row)
    starts = []  # per row: the index of the first query of each version k = 0..K_i (K_i boundaries crossed)
    for p, base in zip(positions, bases, strict=True):
        n_new = max(0, (T - 1 + p - mem_len - base) // block)  # boundaries in [p, p + T): version k starts at p'
        starts.append([0] + [base + k * block + mem_len - p for k in range(1, n_new + 1)])  # with b(p') = base + k L
    version = torch.full((len(positions), T), -1, dtype=torch.int64)  # (B, T)
    groups = _groups(bases, starts, version, device)
    refits = [_refit(positions, bases, starts, k, T, mem_len, block, device) for k in range(len(groups) - 1)]
    return _Schedule(valid[:, None], floors, groups, refits, version.to(device))


def _groups(bases: list[int], starts: list[list[int]], version: Tensor, device: torch.device) -> list[_Group | None]:
    """Per version k, the queries of every row that read it (None where no query of any row does); writes k into
    ``version`` (B, T) at those queries."""
    groups: list[_Group | None] = []
    T = version.shape[1]
    for k in range(max(len(row) for row in starts)):
        mask = torch.zeros(len(bases), T, dtype=torch.bool)  # (B, T)
        for i, (base, row) in enumerate(zip(bases, starts, strict=True)):
            if k < len(row) and (base > 0 or k > 0):  # version k of row i is not empty
                mask[i, row[k] : row[k + 1] if k + 1 < len(row) else T] = True
        hit = mask.any(0).nonzero()
        if hit.numel() == 0:
            groups.append(None)
            continue
        version.masked_fill_(mask, k)
        t0, t1 = int(hit[0]), int(hit[-1]) + 1
        groups.append(_Group(t0, t1, mask[:, t0:t1].to(device), int(mask.sum())))
    return groups


def _refit(
    positions: list[int],
    bases: list[int],
    starts: list[list[int]],
    k: int,
    T: int,
    mem_len: int,
    block: int,
    device: torch.device,
) -> _Refit:
    """The update from version k to k + 1: which rows cross that boundary, and where their block sits in
    ``[input cache of C + 1 = mem_len + block tokens ; segment]``."""
    C = mem_len + block
    rows, first, slots = [], [], []
    for p, base, row in zip(positions, bases, starts, strict=True):
        end = base + (k + 1) * block  # the new version covers the tokens before `end`
        rows.append(k + 1 < len(row))
        first.append(rows[-1] and end == block)
        slots.append(min(max(0, end - block - p + C), C + T - block))  # slot of token `end - block`
    index = torch.tensor(slots, device=device)[:, None] + torch.arange(block, device=device)  # (B, L)
    return _Refit(
        torch.tensor(rows, device=device),
        torch.tensor(first, device=device),
        index,
        any(first),
        any(r and not f for r, f in zip(rows, first, strict=True)),
        all(rows),
        all(slot + block <= C for slot in slots),
    )


# --------------------------------------------------------------------------------------------------------------------
# layers


@dataclass
class _LTMOut:
    """One layer's long-term memory results for a segment."""

    context: Tensor  # (B, H, T, Dh)
    coeffs: Tensor  # (B, N, D) the version for the next position
    mass: Tensor  # (B, bins)
    means: Tensor | None  # (3,) mean KL, mu, sigma (the last two detached) over the layer's (query, head) pairs that
    # read a non-empty LTM; training mode only (None otherwise)
    count: int  # number of such queries (all rows)


class InfiniteAttention(RelativeProjections):
    """Relative attention over the exact window plus continuous attention over the LTM version of each query."""

    def __init__(self, cfg: ModelConfig, own_bias: bool) -> None:
        super().__init__(cfg, own_bias)
        inf = cfg.infinite
        self.cfg, self.inf = cfg, inf
        self.ltm = ContinuousAttention(cfg.d_model, cfg.n_head, inf.n_basis, inf.min_var)
        self.gate = nn.Conv1d(cfg.d_model, cfg.d_model, 3, padding=1) if inf.gate else None  # PyTorch default init
        self.ltm_proj: nn.Linear | None = None  # "separate": the LTM's own output projection (bias-free, official)
        if inf.ltm_out == "separate":
            self.ltm_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            init_linear(self.ltm_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))  # as out_proj

    def forward(
        self,
        h: Tensor,
        layer_state: tuple[Tensor, ...],
        sched: _Schedule,
        memory: ContinuousMemory,
        table: Tensor,
        u: Tensor,
        v: Tensor,
        out: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], _LTMOut]:
        """h (B, T, D) normalised input; layer_state = cache keys/values (B, H, C, Dh), inputs (B, C + 1, D), coeffs
        (B, N, D), mass (B, bins). Returns the output (B, T, D), keys/values (B, H, C + T, Dh) and inputs
        (B, C + 1 + T, D) of ``[cache ; segment]`` (written into ``out`` when given), and the LTM results."""
        cache_k, cache_v, cache_x, coeffs, mass = layer_state
        B, T, D = h.shape
        H, Dh = self.n_head, self.head_dim
        q, k, val = self.qkv(h).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        out_k, out_v, out_x = out if out is not None else (None, None, None)
        keys = join(cache_k, k, 2, out_k)  # (B, H, C + T, Dh)
        values = join(cache_v, val, 2, out_v)
        pos = self.position_term(q + v.to(q.dtype).view(H, 1, Dh), table)  # (B, H, T, W)
        block = BLOCK if h.device.type == "cpu" else max(T, 1)
        cache_grad = cache_k.requires_grad or cache_v.requires_grad
        y = band_attention(
            q + u.to(q.dtype).view(H, 1, Dh),
            keys,
            values,
            pos,
            block,
            grad_start=0 if cache_grad else cache_k.shape[2],
            mask=sched.valid,
            bias_scale=1.0 / math.sqrt(Dh),
            floors=sched.floors,
        )  # (B, H, T, Dh)
        inputs = join(cache_x, h, 1, out_x)  # (B, C + 1 + T, D)
        ltm = self.long_term(q, inputs, coeffs, mass, sched, memory, cache_x.requires_grad)
        if self.ltm_proj is None:  # "shared": V^T r joins the heads' outputs before the output projection
            y = (y + ltm.context.to(y.dtype)).transpose(1, 2).reshape(B, T, D)
            return self.dropout(self.out_proj(y)), (keys, values, inputs), ltm
        out = self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # "separate": W_O^LTM (V^T r) after it
        if ltm.count:  # otherwise the context is all zeros (no query reads a non-empty LTM)
            out = out + self.ltm_proj(ltm.context.to(out.dtype).transpose(1, 2).reshape(B, T, D))
        return self.dropout(out), (keys, values, inputs), ltm

    def long_term(
        self,
        q: Tensor,
        inputs: Tensor,
        coeffs: Tensor,
        mass: Tensor,
        sched: _Schedule,
        memory: ContinuousMemory,
        cache_grad: bool = False,
    ) -> _LTMOut:
        """Continuous attention of every query group over its LTM version, with the refits in between.

        The blocks of all refits of the call are gated and regressed at once (one convolution, one product), so a
        refit's own work is the contraction of the version before it. Uniform memories know every version before any
        query reads one: all groups are then attended at once (one density product, one expectation). Sticky memories
        sample the old signal where the queries of the version before attended, so each group is attended before the
        refit that follows it.
        """
        B, H, T, Dh = q.shape
        terms = self._block_terms(inputs, T, cache_grad, sched.refits, memory)
        versions = [coeffs]
        pieces: list[tuple[_Group, Tensor]] = []
        sums: list[Tensor] = []  # training: sums of kl, mu, sigma over (query, head) pairs, per attended call
        if not self.inf.sticky:
            for k, refit in enumerate(sched.refits):
                versions.append(self._next_version(versions[k], refit, k, terms, memory, None))
            read = [k for k, group in enumerate(sched.groups) if group is not None]
            if read:
                sums += self._attend(q, read, versions, sched, memory, pieces)[0]
        for k, group in enumerate(sched.groups if self.inf.sticky else []):
            if group is not None:
                found, mu, sigma_sq = self._attend(q, [k], versions, sched, memory, pieces)
                sums += found
                with torch.no_grad():  # the histogram steers sampling only: no gradient
                    mask = None if group.count == B * (group.t1 - group.t0) else group.mask[:, None]  # (B, 1, n)
                    hist = attended_mass(mu, sigma_sq.sqrt(), self.inf.sticky_bins, mask)
                    mass = mass + hist.to(mass.dtype)  # (B, bins)
            if k < len(sched.refits):
                refit = sched.refits[k]
                samples = histogram_quantiles(mass, memory.n_samples) if refit.any_update else None  # (B, M)
                versions.append(self._next_version(versions[k], refit, k, terms, memory, samples))
                empty = torch.zeros_like(mass)
                mass = empty if refit.every_row else torch.where(refit.rows[:, None], empty, mass)
        count = H * sum(group.count for group, _ in pieces)
        means = torch.stack(sums).sum(0) / max(count, 1) if sums else None
        context = _assemble(pieces, q.new_zeros(B, H, T, Dh) if not pieces else None, T)
        return _LTMOut(context, versions[-1], mass, means, count)

    def _attend(
        self,
        q: Tensor,
        read: list[int],
        versions: list[Tensor],
        sched: _Schedule,
        memory: ContinuousMemory,
        pieces: list[tuple[_Group, Tensor]],
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Continuous attention of the groups of the versions ``read`` (each with its version), over the union range
        ``t0:t1`` of their queries. Appends (group, context (B, H, n_k, Dh)) per group to ``pieces``; returns the
        sums (3,) of :meth:`_masked_sums` in a list (training mode; else an empty list) and mu, sigma^2 (B, H, t1 - t0)
        float32."""
        groups = [sched.groups[k] for k in read]
        t0, t1 = min(g.t0 for g in groups if g is not None), max(g.t1 for g in groups if g is not None)
        qs = q[:, :, t0:t1]
        if len(read) == 1:
            mu, sigma_sq = self.ltm.density(qs, versions[read[0]])  # (B, H, n) x 2
        else:
            assert sched.version is not None
            mu, sigma_sq = self.ltm.density(qs, versions, sched.version[:, t0:t1])
        with torch.autocast(q.device.type, enabled=False):
            r = memory.expectation(mu, sigma_sq)  # (B, H, n, N) float32
        for k, group in zip(read, groups, strict=True):
            assert group is not None
            pieces.append((group, self.ltm.context(r[:, :, group.t0 - t0 : group.t1 - t0], versions[k], q.dtype)))
        if not self.training:
            return [], mu, sigma_sq
        assert sched.version is not None and groups[0] is not None  # the queries of these groups:
        mask = groups[0].mask if len(read) == 1 else sched.version[:, t0:t1] >= 0  # one group's, or all with a version
        return [self._masked_sums(mu, sigma_sq, mask[:, None])], mu, sigma_sq

    def _masked_sums(self, mu: Tensor, sigma_sq: Tensor, mask: Tensor) -> Tensor:
        """Sums of KL, mu and sigma over the masked (query, head) pairs: (B, H, n) x 2, mask (B, 1, n) -> (3,)."""
        inf = self.inf
        kl = gaussian_kl(mu, sigma_sq, inf.kl_sigma0, inf.kl_mu0 if inf.kl_mu_term else None)
        mask = mask.expand_as(mu)
        zero = mu.new_zeros(())
        return torch.stack(
            [
                torch.where(mask, kl, zero).sum(),
                torch.where(mask, mu, zero).sum().detach(),
                torch.where(mask, sigma_sq.sqrt(), zero).sum().detach(),
            ]
        )

    def gated(self, block: Tensor) -> Tensor:
        """The official input gate ``X * sigmoid(Conv1d_k3(X))`` over completed blocks (..., L, D), each zero-padded at
        its two ends (identity without the gate). A centred kernel is causal here: every token of a block is older
        than the queries that read the version fitted on it, and the block is cut by absolute positions."""
        if self.gate is None:
            return block
        flat = block.reshape(-1, *block.shape[-2:])  # (blocks, L, D)
        gated = flat * torch.sigmoid(self.gate(flat.transpose(1, 2))).transpose(1, 2)
        return gated.view(block.shape)

    def _block_terms(
        self, inputs: Tensor, T: int, cache_grad: bool, refits: list[_Refit], memory: ContinuousMemory
    ) -> dict[str, Tensor]:
        """The regression terms of the blocks that leave the window in this call, all refits at once: gated in one
        convolution, ``fit_block^T X`` (a first version) and ``fit_new^T X`` (an update) each one product; (B, K, N, D)
        float32 by name ("first", "update"), for the refits that need them. ``inputs`` (B, C + 1 + T, D) is ``[cache ;
        segment]``; where every block lies in a cache without gradient (training with ``mem_len = ltm_block =
        seq_len``: each block is the previous segment's), the blocks are read from the cache alone, so that the
        backward pass does not make the gate's input gradient, which no parameter would receive."""
        if not refits:
            return {}
        if not cache_grad and all(refit.in_cache for refit in refits):
            inputs = inputs[:, : inputs.shape[1] - T].detach()
        B, D, L = inputs.shape[0], inputs.shape[-1], refits[0].slots.shape[1]
        slots = torch.cat([refit.slots for refit in refits], 1)  # (B, K L): the K blocks in [cache ; segment]
        blocks = self.gated(inputs.gather(1, slots[..., None].expand(-1, -1, D)).view(B, len(refits), L, D))
        terms = {}
        if any(refit.any_first for refit in refits):
            terms["first"] = memory.fit(blocks)
        if any(refit.any_update for refit in refits):
            terms["update"] = memory.appended(blocks)
        return terms

    def _next_version(
        self,
        coeffs: Tensor,
        refit: _Refit,
        k: int,
        terms: dict[str, Tensor],
        memory: ContinuousMemory,
        samples: Tensor | None,
    ) -> Tensor:
        """Version k + 1 from version k (B, N, D) in the rows that cross boundary k; ``samples`` (B, M): where the
        sticky update samples the old signal (None: uniformly)."""
        new = coeffs
        if refit.any_update:
            new = (memory.contracted(coeffs, samples) + terms["update"][:, k]).to(coeffs.dtype)
        if refit.any_first:
            new = torch.where(refit.first[:, None, None], terms["first"][:, k].to(coeffs.dtype), new)
        return new if refit.every_row else torch.where(refit.rows[:, None, None], new, coeffs)


def _assemble(pieces: list[tuple[_Group, Tensor]], empty: Tensor | None, T: int) -> Tensor:
    """The context (B, H, T, Dh) from each group's (B, H, n_k, Dh), 0 for the queries of no group; ``empty``: the
    context where there are no pieces.

    Where every row reads a group's version at each of its queries (one stream, or rows in step) the groups are
    disjoint ranges and the context is their concatenation; otherwise each group's masked rows are added in."""
    if not pieces:
        assert empty is not None
        return empty
    ctx0 = pieces[0][1]
    B, H, _, Dh = ctx0.shape

    def zeros(n: int) -> Tensor:
        return ctx0.new_zeros(B, H, n, Dh)

    if all(group.count == B * (group.t1 - group.t0) for group, _ in pieces):
        parts, at = [], 0
        for group, ctx in sorted(pieces, key=lambda piece: piece[0].t0):
            if group.t0 > at:
                parts.append(zeros(group.t0 - at))
            parts.append(ctx)
            at = group.t1
        if at < T:
            parts.append(zeros(T - at))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    context = zeros(T)
    for group, ctx in pieces:
        index = torch.arange(group.t0, group.t1, device=ctx.device)
        context = context.index_add(2, index, torch.where(group.mask[:, None, :, None], ctx, 0.0))
    return context


# --------------------------------------------------------------------------------------------------------------------
# decoder


class InfiniteDecoder(Decoder[InfiniteState]):
    """∞-former: exact relative attention over the last ``mem_len .. mem_len + ltm_block - 1`` tokens plus
    continuous attention over an unbounded long-term memory refitted every ``ltm_block`` tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inf = cfg.infinite
        self.cfg, self.inf = cfg, inf
        self.cache_len = inf.mem_len + inf.ltm_block - 1  # C: keys and values; the LTM inputs keep C + 1 tokens
        self.memory = ContinuousMemory(
            inf.n_basis, inf.sigmas, inf.ridge, inf.tau, inf.n_samples, inf.ltm_block, pad=inf.zero_pad
        )
        own_bias = not cfg.infinite.share_bias
        self.blocks = nn.ModuleList(PreNormBlock(cfg, InfiniteAttention(cfg, own_bias)) for _ in range(cfg.n_layer))
        shared = inf.share_bias
        self.pos_bias_u = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if shared else None
        self.pos_bias_v = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if shared else None
        distances = torch.arange(self.cache_len, -1, -1, dtype=torch.float32)  # (W,) band order: oldest first
        self.register_buffer("table", sinusoid_table(distances, cfg.d_model), persistent=False)  # (W, D)

    def init_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> InfiniteState:
        cfg, inf = self.cfg, self.inf
        L, H, C, Dh, D = cfg.n_layer, cfg.n_head, self.cache_len, cfg.head_dim, cfg.d_model

        def zeros(*shape: int) -> Tensor:
            return torch.zeros((batch_size, *shape), dtype=dtype, device=device)

        return InfiniteState(
            keys=zeros(L, H, C, Dh),
            values=zeros(L, H, C, Dh),
            inputs=zeros(L, C + 1, D),
            coeffs=zeros(L, inf.n_basis, D),
            mass=zeros(L, inf.sticky_bins),
            position=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def forward(self, x: Tensor, state: InfiniteState) -> DecoderOutput[InfiniteState]:
        B, T, _ = x.shape
        C = self.cache_len
        sched = make_schedule(state.position.tolist(), T, self.inf.mem_len, self.inf.ltm_block, x.device)
        new: dict[str, list[Tensor]] = {"keys": [], "values": [], "inputs": [], "coeffs": [], "mass": []}
        ltms = []
        bufs = grown_buffers(state, {"keys": 3, "values": 3, "inputs": 2}, T)  # inference: one copy of the caches
        for layer, block in enumerate(self.blocks):
            u = self.pos_bias_u if self.pos_bias_u is not None else block.mix.pos_bias_u
            v = self.pos_bias_v if self.pos_bias_v is not None else block.mix.pos_bias_v
            layer_state = (
                state.keys[:, layer],
                state.values[:, layer],
                state.inputs[:, layer],
                state.coeffs[:, layer],
                state.mass[:, layer],
            )
            out = None if bufs is None else (bufs["keys"][:, layer], bufs["values"][:, layer], bufs["inputs"][:, layer])
            x, (keys, values, inputs), ltm = block(x, layer_state, sched, self.memory, self.table, u, v, out)
            if bufs is None:  # recording autograd: keep the newest entries of each layer, stacked below
                new["keys"].append(keys[:, :, keys.shape[2] - C :])  # (B, H, C, Dh)
                new["values"].append(values[:, :, values.shape[2] - C :])
                new["inputs"].append(inputs[:, inputs.shape[1] - C - 1 :])  # (B, C + 1, D)
            new["coeffs"].append(ltm.coeffs)
            new["mass"].append(ltm.mass)
            ltms.append(ltm)
        if not sched.refits:  # no version first read (most single tokens): the coefficients are unchanged, no copy
            del new["coeffs"]
        if not self.inf.sticky:  # the histogram stays empty
            del new["mass"]
        caches = {"keys": (3, C), "values": (3, C), "inputs": (2, C + 1)}  # name: (sequence dim, entries kept)
        fields = {
            name: next_cache(new.pop(name), bufs, name, dim, keep, getattr(state, name).dtype)
            for name, (dim, keep) in caches.items()
        }
        fields |= {name: torch.stack(parts, dim=1).to(getattr(state, name).dtype) for name, parts in new.items()}
        fields = {"coeffs": state.coeffs, "mass": state.mass, **fields}
        next_state = InfiniteState(**fields, position=state.position + T)
        aux, stats = self._kl_and_stats(ltms, x)
        return DecoderOutput(hidden=x, state=next_state, aux_loss=aux, stats=stats)

    def _kl_and_stats(self, ltms: list[_LTMOut], x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """KL regulariser (training only) and per-layer mean mu / sigma of the LTM densities (training only)."""
        aux = x.new_zeros((), dtype=torch.float32)
        if not self.training or not any(ltm.count for ltm in ltms):
            return aux, {}
        parts = [ltm.means for ltm in ltms if ltm.means is not None]
        assert len(parts) == len(ltms)  # every layer reads the same schedule
        means = torch.stack(parts)  # (layers, 3)
        if self.inf.kl_weight > 0:
            aux = aux + self.inf.kl_weight * means[:, 0].sum()
        values = means[:, 1:].detach().tolist()  # one device sync
        stats = {}
        for layer, (mu, sigma) in enumerate(values):
            stats[f"ltm/layer{layer}_mu"], stats[f"ltm/layer{layer}_sigma"] = float(mu), float(sigma)
        return aux, stats

    def describe(self) -> dict[str, Any]:
        """Long-term memory settings and the size of its part of the state; with "separate", per layer the ratio of
        the Frobenius norms of the LTM's and the attention's output projections (how loud the learned LTM path is)."""
        inf, cfg = self.inf, self.cfg
        info: dict[str, Any] = {
            "mem_len": inf.mem_len,
            "ltm_block": inf.ltm_block,
            "exact_window_max": self.cache_len,
            "n_basis": inf.n_basis,
            "sigmas": list(inf.sigmas),
            "ridge": inf.ridge,
            "tau": inf.tau,
            "n_samples": inf.n_samples,
            "sticky": inf.sticky,
            "gate": inf.gate,
            "ltm_out": inf.ltm_out,
            "kl_weight": inf.kl_weight,
            "ltm_coeff_bytes_per_stream": 4 * cfg.n_layer * inf.n_basis * cfg.d_model,
        }
        if inf.ltm_out == "separate":
            with torch.no_grad():
                ratios = [b.mix.ltm_proj.weight.norm() / b.mix.out_proj.weight.norm() for b in self.blocks]
            info["ltm_out_norm_ratio"] = [round(float(r), 4) for r in ratios]
        return info

    # facts (see Decoder)
    PROJECTED = ("keys", "values")
    # refits every 4 tokens from position 8 on: several LTM versions within every contract stream (and segment)
    TINY = {
        "infinite": {
            "mem_len": 4,
            "ltm_block": 4,
            "n_basis": 16,
            "sigmas": [0.05, 0.1],
            "n_samples": 16,
            "sticky_bins": 8,
        }
    }

    @classmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        # every query is guaranteed mem_len tokens; up to mem_len + ltm_block - 1 depending on its position
        return cfg.infinite.mem_len, "infinite.mem_len (short-term memory)"

    @classmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        return None, "the continuous long-term memory holds the whole past"

    @classmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        return cfg.infinite.mem_len + cfg.infinite.ltm_block  # the largest exact window, plus the query itself

    @classmethod
    def attended_keys(cls, cfg: ModelConfig) -> int:
        # short-term: mem_len .. mem_len + ltm_block - 1 keys, the middle on average; long-term: the context V^T r
        # over the N basis functions is one product (the scores are never formed), counted as N / 2 keys
        inf = cfg.infinite
        return round(inf.mem_len + (inf.ltm_block - 1) / 2 + inf.n_basis / 2)
