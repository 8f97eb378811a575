"""The Combiner decoder, causal Combiner-Fixed (Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse
Computation Cost", NeurIPS 2021, arXiv 2107.05768), streamed with a bounded memory.

Section markers (§4.x) number the parts of the method as this file discusses them (principle, factorisation,
causal form); variants keep the paper's names, and the official code is combiner/ in google-research/google-research.

Principle (§4.1). Attention is the conditional expectation ``A(x_i) = E_{p(j|i)}[v_j]``. Combiner splits the support
of query i into a direct part ``Ω_i^0`` and regions ``Ω_i^r`` and assumes ``j ⟂ i | Ω_i^r``::

    A(x_i) = Σ_{j ∈ Ω_i^0} p(j|i) v_j  +  Σ_r p(Ω_i^r|i) Σ_{j ∈ Ω_i^r} p(j|Ω_i^r) v_j

The inner sum (the "local expectation") does not depend on i: it is computed once per region and reused by every
later query. Parameterisation (§4.1; the "max" local summary of the official code):

* ``p(j|i) ∝ exp(q_i · k_j / √Dh)`` for the direct keys;
* ``p(Ω^r|i) ∝ exp(q_i · k̂_r / √Dh)`` with ``k̂_r = maxpool_{j ∈ Ω^r} k_j`` (element-wise max);
* ``p(j|Ω^r) = softmax_{j ∈ Ω^r}(q̂_r · k_j / √Dh)`` with ``q̂_r = maxpool_{j ∈ Ω^r} q_j``, normalised inside the
  region and not causal (a finished region lies wholly in the past of every query that reads it);
* one softmax over the direct logits and the region logits together (the joint normaliser ``Z(x_i)``).

Combiner-Fixed (§4.2, after the Sparse Transformer's "fixed" pattern). The regions are segments of ``s = segment``
tokens fixed by absolute position: token p belongs to segment ``p // s``, however the stream is cut into calls. A
query at p in segment g sees its own segment's tokens up to p directly and one summary ``(k̂_r, v̂_r)`` per earlier
segment r, ``v̂_r = Σ_j p(j|Ω^r) v_j``. Bounded memory: only the last ``S = max_summaries`` summaries are kept, so the
query sees segments ``g - S .. g - 1`` through summaries (older ones are dropped) and reaches back between
``S * s + 1`` and ``(S + 1) * s`` tokens. Cost per segment ``O(s^2 + s * S)``.

Positions (rotary, RoPE, as the baseline). Direct keys and queries are rotated at their absolute positions, so a
direct logit depends on the distance only. A summary stands for a whole segment; it is placed at the segment's last
position ``e_r = (r + 1) s - 1``: ``k̂_r`` and ``q̂_r`` are max-pooled from the *unrotated* keys and queries (pooling
rotated vectors would mix the phases of different positions) and then rotated at ``e_r``. Thus ``q_p · k̂_r``
depends on ``p - e_r`` only: summaries keep their order and their distance to the query, translation invariant
(unrotated summaries against rotated queries would see the query's absolute phase). The region's own attention
``q̂_r · k_j`` compares the pooled query at ``e_r`` with the rotated keys, i.e. by the offset inside the segment. The
most recent summary sits right before the current segment, continuous with the direct keys.

Streaming state (§4.5; the official code has none and reruns the whole prefix), per layer: the rotated keys and the
values of the current unfinished segment (at most ``s - 1`` tokens), the running max of its unrotated queries and
keys, and the last S summaries ``(k̂, v̂)``; plus the absolute position. When a segment completes, its summary is
appended and the oldest one dropped. Everything is zero in an empty memory, and which slots are real follows from the
position, so :meth:`State.reset` (all zeros) gives a fresh row.

Vectorised forward. Per row, ``[buffered tokens of the current segment ; the call's tokens]`` is viewed as G aligned
segments of s (``_Take``: a slice when every row is at the same offset, else one gather). The G summaries of the call
come from one batched attention of the pooled queries; each segment's keys are ``[its s keys | the S summaries before
it]`` (an ``unfold`` of ``[old summaries ; this call's]``), so one ``(B, H, G, s, s + S)`` score tensor, one float32
softmax and one product with the values give every output. No loop over tokens or segments.

Decoding. A call of one token that does not finish its segment (every row) takes a short path
(:func:`combiner_token_attention`): one query against ``[the s - 1 buffered keys ; its own key | the S summaries]``
under a per-row mask, the pools updated by one max, no summary made. It gives the same outputs and memory as the
vectorised forward (tested), without the ``s``-row score tensor and the layout of a whole segment.

Combiner-Axial (§4.3) is left out: its summaries are per column (``row_attn_out[v, c]`` for every column c of every
earlier row), i.e. one key/value pair per past token. A bounded memory then holds as many pairs as a sliding window of
the same reach and gains nothing over the ``transformer`` baseline's cache (its ``proj`` row summary would also need a
separate Dense + LayerNorm path). Combiner-Fixed is the variant whose memory is compressed: one pair per s tokens.

Block (pre-norm, as the baseline)::

    x ──┬─ LayerNorm ─ Q,K,V ─ RoPE ─ softmax[ own segment (causal) | S summaries ] ─ proj ─(+)──┬─ LN ─ MLP ─(+)── x'
        └───────────────────────────────────────────────────────────────────────────────────┘└──────────────┘
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.layers import RotaryEmbedding, init_linear
from longctx.layers.attention import additive_mask, apply_rotary_full, rotary_tables
from longctx.layers.block import PreNormBlock


@dataclass(frozen=True)
class CombinerState(State):
    """Per layer: the unfinished segment (keys, values, running max-pools) and the last S summaries.

    Valid slots follow from ``position``: the newest ``position % s`` slots of ``keys``/``values`` (and the pools, when
    that is > 0), and the newest ``min(position // s, S)`` summaries. Zeros everywhere is the empty memory.
    """

    keys: Tensor  # (B, L, H, s - 1, Dh) rotated keys of the current segment's tokens, oldest first, right-aligned
    values: Tensor  # (B, L, H, s - 1, Dh)
    pool_q: Tensor  # (B, L, H, Dh) running max of the current segment's unrotated queries
    pool_k: Tensor  # (B, L, H, Dh) running max of its unrotated keys
    summary_keys: Tensor  # (B, L, H, S, Dh) k̂ of the last S finished segments, oldest first, rotated at their end
    summary_values: Tensor  # (B, L, H, S, Dh) v̂ of the same segments
    position: Tensor  # (B,) int64: tokens read so far = absolute position of the next token


class SegmentMemory(NamedTuple):
    """One layer's part of :class:`CombinerState`, batch first (Dv: value width, Dh in the model)."""

    keys: Tensor  # (B, H, s - 1, Dh)
    values: Tensor  # (B, H, s - 1, Dv)
    pool_q: Tensor  # (B, H, Dh)
    pool_k: Tensor  # (B, H, Dh)
    summary_keys: Tensor  # (B, H, S, Dh)
    summary_values: Tensor  # (B, H, S, Dv)

    @staticmethod
    def empty(
        batch: int,
        heads: int,
        segment: int,
        max_summaries: int,
        head_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> SegmentMemory:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        B, H, s, S, Dh, Dv = batch, heads, segment, max_summaries, head_dim, value_dim
        return SegmentMemory(
            zeros(B, H, s - 1, Dh),
            zeros(B, H, s - 1, Dv),
            zeros(B, H, Dh),
            zeros(B, H, Dh),
            zeros(B, H, S, Dh),
            zeros(B, H, S, Dv),
        )


# --------------------------------------------------------------------------------------------------------------------
# layout of one call: where each row's segments are


@dataclass(frozen=True)
class _Take:
    """Per-row ranges along dim 2: row b takes ``x[b, :, index[b]]``; a slice when every row takes the same range."""

    index: Tensor  # (B, N) int64
    start: int | None  # every row takes start .. start + N - 1 - pad: narrow (and pad) instead of gather
    pad: int = 0  # with start: the index is clamped for the last `pad` entries, which repeat the last one

    def __call__(self, x: Tensor) -> Tensor:  # (B, H, L, C) -> (B, H, N, C)
        if self.start is not None:
            part = x.narrow(2, self.start, self.index.shape[1] - self.pad)
            if not self.pad:
                return part
            with torch.autocast(x.device.type, enabled=False):  # CPU autocast would run replication_pad in float32
                return F.pad(part, (0, 0, 0, self.pad), mode="replicate")
        B, H, _, C = x.shape
        return torch.gather(x, 2, self.index[:, None, :, None].expand(B, H, -1, C))


@dataclass(frozen=True)
class SegmentLayout:
    """Everything about a call of T tokens that all layers share (built once per forward by :func:`segment_layout`).

    The aligned view: per row, ``[buffered tokens of the current segment ; the T new tokens]`` cut into G segments
    of s (the current one first), padded at the end by repeating the row's last token (a repeat never changes a
    max-pool, and only padding queries, whose outputs are dropped, can see padding keys).
    """

    segment: int  # s
    n_segments: int  # G
    aligned: _Take  # [buffer (s - 1) ; new (T)] -> aligned view (G * s)
    out: _Take  # aligned view -> the T new tokens
    carry: _Take  # [old summaries (S) ; the G summaries of this call] -> the S summaries to keep
    open_segment: Tensor  # (B,) int64: aligned segment that is unfinished after the call (clamped to G - 1)
    open_count: Tensor  # (B,) int64: its tokens (0: no unfinished segment, the pools restart empty)
    cos: Tensor  # (B, 1, T, Dh) rotary tables of the new tokens (rotary_tables layout)
    sin: Tensor
    summary_cos: Tensor  # (B, 1, G, Dh) at the last position of each aligned segment
    summary_sin: Tensor
    mask: Tensor  # (B, 1, G, s, s + S) additive float32: [causal inside the segment | summaries of real segments]


def segment_layout(
    position: Tensor, n_tokens: int, segment: int, max_summaries: int, rotary: RotaryEmbedding, dtype: torch.dtype
) -> SegmentLayout:
    """The layout of ``n_tokens`` >= 1 new tokens after ``position`` (B,) tokens (one host sync for the offsets)."""
    s, S, T = segment, max_summaries, n_tokens
    device = position.device
    offsets = position % s  # (B,) tokens of the current segment already in the memory
    off = offsets.tolist()
    uniform = min(off) == max(off) if off else True
    o = off[0] if off else 0
    G = -(-(max(off, default=0) + T) // s)  # ceil
    aligned_index = (s - 1 - offsets)[:, None] + torch.arange(G * s, device=device)  # (B, G * s)
    aligned = _Take(aligned_index.clamp(max=s - 2 + T), s - 1 - o if uniform else None, G * s - (o + T))
    out = _Take(offsets[:, None] + torch.arange(T, device=device), o if uniform else None)  # (B, T)
    finished = (offsets + T) // s  # (B,) segments completed by this call
    carry = _Take(finished[:, None] + torch.arange(S, device=device), (o + T) // s if uniform else None)  # (B, S)

    cos, sin = rotary_tables(*rotary(position[:, None] + torch.arange(T, device=device), dtype))  # (B, 1, T, Dh)
    ends = (position - offsets)[:, None] + torch.arange(G, device=device) * s + (s - 1)  # (B, G) last positions
    summary_cos, summary_sin = rotary_tables(*rotary(ends, dtype))  # (B, 1, G, Dh)

    B = position.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril().expand(B, G, s, s)
    n_old = torch.clamp(position // s, max=S)  # (B,) real slots among the S old summaries (the newest ones)
    entry = torch.arange(G, device=device)[:, None] + torch.arange(S, device=device)  # (G, S) in [old ; new]
    real = entry[None] >= (S - n_old)[:, None, None]  # (B, G, S): new summaries (entry >= S) are always real
    allowed = torch.cat([causal, real[:, :, None].expand(B, G, s, S)], dim=-1)  # (B, G, s, s + S)
    return SegmentLayout(
        segment=s,
        n_segments=G,
        aligned=aligned,
        out=out,
        carry=carry,
        open_segment=finished.clamp(max=G - 1),
        open_count=(offsets + T) % s,
        cos=cos,
        sin=sin,
        summary_cos=summary_cos,
        summary_sin=summary_sin,
        mask=additive_mask(allowed)[:, None],
    )


@dataclass(frozen=True)
class TokenLayout:
    """One new token per row that does not finish its segment (built once per forward by :func:`token_layout`)."""

    cos: Tensor  # (B, 1, 1, Dh) rotary tables of the new token
    sin: Tensor
    mask: Tensor  # (B, 1, 1, s + S) additive float32: [s - 1 buffered keys ; the new key | the S summaries]
    continues: Tensor  # (B, 1, 1) bool: the token continues a segment (offset > 0), so the pools take a max


def token_layout(
    position: Tensor, segment: int, max_summaries: int, rotary: RotaryEmbedding, dtype: torch.dtype
) -> TokenLayout:
    """The layout of one new token after ``position`` (B,) tokens, when ``position % segment < segment - 1``."""
    s, S, device = segment, max_summaries, position.device
    offsets = position % s  # (B,) earlier tokens of the token's segment: the newest `offsets` buffered slots
    cos, sin = rotary_tables(*rotary(position[:, None], dtype))  # (B, 1, 1, Dh)
    buffered = torch.arange(s - 1, device=device) >= (s - 1 - offsets)[:, None]  # (B, s - 1)
    n_old = torch.clamp(position // s, max=S)  # (B,) real summaries, the newest ones
    real = torch.arange(S, device=device) >= (S - n_old)[:, None]  # (B, S)
    itself = torch.ones_like(offsets, dtype=torch.bool)[:, None]  # (B, 1)
    allowed = torch.cat([buffered, itself, real], dim=-1)  # (B, s + S)
    return TokenLayout(
        cos=cos, sin=sin, mask=additive_mask(allowed)[:, None, None], continues=(offsets > 0)[:, None, None]
    )


# --------------------------------------------------------------------------------------------------------------------
# the attention


def _summarise(
    pooled_q: Tensor, pooled_k: Tensor, keys: Tensor, values: Tensor, layout: SegmentLayout, scale: float
) -> tuple[Tensor, Tensor]:
    """Summaries of the G aligned segments: ``k̂`` (B, H, G, Dh) and ``v̂`` (B, H, G, Dv).

    pooled_q/k (B, H, G, Dh) unrotated max-pools; keys/values (B, H, G, s, Dh/Dv) rotated keys and values.
    ``v̂_g = softmax_j(q̂_g · k_j * scale) v_j`` over the whole segment (no causal mask), in float32 or wider.
    """
    k_hat = apply_rotary_full(pooled_k, layout.summary_cos, layout.summary_sin)  # rotated at the segment's end
    q_hat = apply_rotary_full(pooled_q, layout.summary_cos, layout.summary_sin)
    wide = torch.promote_types(values.dtype, torch.float32)
    with torch.autocast(values.device.type, enabled=False):
        logits = torch.matmul(q_hat.to(wide)[:, :, :, None] * scale, keys.to(wide).transpose(-1, -2))  # (B,H,G,1,s)
        probs = torch.softmax(logits, dim=-1).to(values.dtype)
        v_hat = torch.matmul(probs, values)[:, :, :, 0]  # (B, H, G, Dv)
    return k_hat, v_hat


def combiner_attention(
    q: Tensor, k: Tensor, v: Tensor, memory: SegmentMemory, layout: SegmentLayout
) -> tuple[Tensor, SegmentMemory]:
    """Causal Combiner-Fixed attention of T new tokens after ``memory``.

    q, k (B, H, T, Dh) unrotated, v (B, H, T, Dv) -> output (B, H, T, Dv) and the next memory. Output i is
    ``Σ_direct p v_j + Σ_r p_r v̂_r`` with one softmax over ``[q_i k_j (own segment, j <= i) | q_i k̂_r (last S)]``.
    """
    B, H, T, Dh = q.shape
    Dv = v.shape[-1]
    s, G, S = layout.segment, layout.n_segments, memory.summary_keys.shape[2]
    scale = 1.0 / math.sqrt(Dh)
    q_rot = apply_rotary_full(q, layout.cos, layout.sin)
    k_rot = apply_rotary_full(k, layout.cos, layout.sin)
    keys = torch.cat([memory.keys.to(k_rot.dtype), k_rot], dim=2)  # (B, H, s - 1 + T, Dh)
    values = torch.cat([memory.values.to(v.dtype), v], dim=2)  # (B, H, s - 1 + T, Dv)

    # aligned view (B, H, G, s, .); the buffered tokens enter the pools through the running max they left
    qb = layout.aligned(F.pad(q_rot, (0, 0, s - 1, 0))).view(B, H, G, s, Dh)  # buffered queries: unused zeros
    kb = layout.aligned(keys).view(B, H, G, s, Dh)
    vb = layout.aligned(values).view(B, H, G, s, Dv)
    pooled = []
    for pool, new in ((memory.pool_q, q), (memory.pool_k, k)):
        seq = torch.cat([pool.to(new.dtype)[:, :, None].expand(B, H, s - 1, Dh), new], dim=2)  # (B, H, s-1+T, Dh)
        pooled.append(layout.aligned(seq).view(B, H, G, s, Dh).amax(dim=3))  # (B, H, G, Dh)
    k_hat, v_hat = _summarise(pooled[0], pooled[1], kb, vb, layout, scale)

    # each aligned segment g reads entries g .. g + S - 1 of [old S ; new G]: the S segments before it
    all_k = torch.cat([memory.summary_keys.to(k_hat.dtype), k_hat], dim=2)  # (B, H, S + G, Dh)
    all_v = torch.cat([memory.summary_values.to(v_hat.dtype), v_hat], dim=2)  # (B, H, S + G, Dv)
    window_k = all_k.unfold(2, S, 1)[:, :, :G].transpose(-1, -2)  # (B, H, G, S, Dh) view
    window_v = all_v.unfold(2, S, 1)[:, :, :G].transpose(-1, -2)  # (B, H, G, S, Dv)
    ctx_k = torch.cat([kb, window_k.to(kb.dtype)], dim=3)  # (B, H, G, s + S, Dh): [own segment | S summaries]
    ctx_v = torch.cat([vb, window_v.to(vb.dtype)], dim=3)  # (B, H, G, s + S, Dv)

    wide = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(v.device.type, enabled=False):  # scores and softmax in float32 (the official code does too)
        scores = torch.matmul(qb.to(wide) * scale, ctx_k.to(wide).transpose(-1, -2))  # (B, H, G, s, s + S)
        probs = torch.softmax(scores + layout.mask.to(wide), dim=-1).to(v.dtype)  # one softmax over both parts
        y = torch.matmul(probs, ctx_v)  # (B, H, G, s, Dv)
    y = layout.out(y.view(B, H, G * s, Dv))  # (B, H, T, Dv)

    open_at = layout.open_segment[:, None, None, None]  # (B, 1, 1, 1)
    is_open = (layout.open_count > 0)[:, None, None]  # (B, 1, 1)
    next_pools = [torch.where(is_open, p.gather(2, open_at.expand(B, H, 1, Dh))[:, :, 0], 0.0) for p in pooled]
    n_keep = s - 1
    next_memory = SegmentMemory(
        keys=keys.narrow(2, keys.shape[2] - n_keep, n_keep),
        values=values.narrow(2, values.shape[2] - n_keep, n_keep),
        pool_q=next_pools[0],
        pool_k=next_pools[1],
        summary_keys=layout.carry(all_k),
        summary_values=layout.carry(all_v),
    )
    return y, next_memory


def combiner_token_attention(
    q: Tensor, k: Tensor, v: Tensor, memory: SegmentMemory, layout: TokenLayout
) -> tuple[Tensor, SegmentMemory]:
    """:func:`combiner_attention` of one token that does not finish its segment.

    q, k (B, H, 1, Dh) unrotated, v (B, H, 1, Dv) -> output (B, H, 1, Dv) and the next memory, the same as the
    vectorised path's (dtypes included), from one row of scores over ``[s - 1 buffered ; the token | S summaries]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_rot = apply_rotary_full(q, layout.cos, layout.sin)  # (B, H, 1, Dh)
    k_rot = apply_rotary_full(k, layout.cos, layout.sin)  # (B, H, 1, Dh)
    keys = torch.cat([memory.keys.to(k_rot.dtype), k_rot], dim=2)  # (B, H, s, Dh): buffered slots, then the token
    values = torch.cat([memory.values.to(v.dtype), v], dim=2)  # (B, H, s, Dv)
    summary_keys = memory.summary_keys.to(k.dtype)  # (B, H, S, Dh) in the dtype the vectorised path keeps them
    summary_values = memory.summary_values.to(v.dtype)  # (B, H, S, Dv)
    ctx_k = torch.cat([keys, summary_keys.to(keys.dtype)], dim=2)  # (B, H, s + S, Dh)
    ctx_v = torch.cat([values, summary_values], dim=2)  # (B, H, s + S, Dv)
    wide = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(v.device.type, enabled=False):  # float32 scores, as the vectorised path
        scores = torch.matmul(q_rot.to(wide) * scale, ctx_k.to(wide).transpose(-1, -2))  # (B, H, 1, s + S)
        probs = torch.softmax(scores + layout.mask.to(wide), dim=-1).to(v.dtype)  # (B, H, 1, s + S)
        y = torch.matmul(probs, ctx_v)  # (B, H, 1, Dv)
    pools = [
        torch.where(layout.continues, torch.maximum(pool.to(new.dtype), new[:, :, 0]), new[:, :, 0])
        for pool, new in ((memory.pool_q, q), (memory.pool_k, k))
    ]  # (B, H, Dh) each
    next_memory = SegmentMemory(
        keys=keys[:, :, 1:],
        values=values[:, :, 1:],
        pool_q=pools[0],
        pool_k=pools[1],
        summary_keys=summary_keys,
        summary_values=summary_values,
    )
    return y, next_memory


# --------------------------------------------------------------------------------------------------------------------
# the decoder


class CombinerAttention(nn.Module):
    """Multi-head causal Combiner-Fixed attention of one layer: projections around :func:`combiner_attention`, or
    :func:`combiner_token_attention` for a one-token call that finishes no segment."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # the baseline's names: the weights load either way
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.qkv, cfg.init_std)
        init_linear(self.out_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(
        self, x: Tensor, memory: SegmentMemory, layout: SegmentLayout | TokenLayout
    ) -> tuple[Tensor, SegmentMemory]:
        """x (B, T, D) -> output (B, T, D) and this layer's next memory (T = 1 with a :class:`TokenLayout`)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        attend = combiner_token_attention if isinstance(layout, TokenLayout) else combiner_attention
        y, memory = attend(q, k, v, memory, layout)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.dropout(self.out_proj(y)), memory


class CombinerDecoder(Decoder[CombinerState]):
    """Causal Combiner-Fixed; state = the unfinished segment + the last ``max_summaries`` segment summaries."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.segment = cfg.combiner.segment
        self.max_summaries = cfg.combiner.max_summaries
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.combiner.rope_base)
        self.blocks = nn.ModuleList(PreNormBlock(cfg, CombinerAttention(cfg)) for _ in range(cfg.n_layer))

    def init_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> CombinerState:
        cfg = self.cfg
        B, L, H, Dh = batch_size, cfg.n_layer, cfg.n_head, cfg.head_dim
        s, S = self.segment, self.max_summaries

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return CombinerState(
            keys=zeros(B, L, H, s - 1, Dh),
            values=zeros(B, L, H, s - 1, Dh),
            pool_q=zeros(B, L, H, Dh),
            pool_k=zeros(B, L, H, Dh),
            summary_keys=zeros(B, L, H, S, Dh),
            summary_values=zeros(B, L, H, S, Dh),
            position=torch.zeros(B, dtype=torch.int64, device=device),
        )

    def _layout(self, position: Tensor, n_tokens: int, dtype: torch.dtype) -> SegmentLayout | TokenLayout:
        """The layout of a call: the short decoding path's for one token that finishes no row's segment.

        Deciding costs one host sync; otherwise the vectorised forward's (:func:`segment_layout`).
        """
        s = self.segment
        if n_tokens == 1 and not bool(((position % s) == s - 1).any()):
            return token_layout(position, s, self.max_summaries, self.rotary, dtype)
        return segment_layout(position, n_tokens, s, self.max_summaries, self.rotary, dtype)

    def forward(self, x: Tensor, state: CombinerState) -> DecoderOutput[CombinerState]:
        T = x.shape[1]
        if T == 0:
            return DecoderOutput(hidden=x, state=state, aux_loss=x.new_zeros(()), stats={})
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        layout = self._layout(state.position, T, compute)
        fields = SegmentMemory._fields
        per_layer: list[SegmentMemory] = []
        for layer, block in enumerate(self.blocks):
            memory = SegmentMemory(*(getattr(state, name)[:, layer] for name in fields))
            x, memory = block(x, memory, layout)
            per_layer.append(memory)
        stacked = {
            name: torch.stack([getattr(m, name) for m in per_layer], dim=1).to(getattr(state, name).dtype)
            for name in fields
        }  # each (B, L, ...)
        next_state = CombinerState(**stacked, position=state.position + T)
        return DecoderOutput(hidden=x, state=next_state, aux_loss=x.new_zeros(()), stats={})

    # facts (see Decoder)
    PROJECTED = ("keys", "values")
    TINY = {"combiner": {"segment": 4, "max_summaries": 3}}  # every contract stream drops old summaries

    @classmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        return cfg.combiner.segment, "combiner.segment (direct attention; older segments through summaries)"

    @classmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        c, L = cfg.combiner, cfg.n_layer
        return L * (c.segment * (c.max_summaries + 1) - 1), f"{L} layers x (segment x (max_summaries + 1) - 1)"

    @classmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        return cfg.combiner.segment * (cfg.combiner.max_summaries + 1)  # own segment + the kept summaries

    @classmethod
    def attended_keys(cls, cfg: ModelConfig) -> int:
        return round((cfg.combiner.segment + 1) / 2 + cfg.combiner.max_summaries)  # half a segment + summaries
