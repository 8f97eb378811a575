"""Transformer-XL decoder: relative attention with a cache, optional adaptive or dynamic attention span.

Papers: Dai et al. 2019, "Transformer-XL" (arXiv 1901.02860), §3.2 (segment recurrence with a cache) and §3.3
(relative positional encodings); Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers" (arXiv
1905.07799), §2.2 (adaptive span, dynamic span). The maths lives in :mod:`longctx.layers.relative` and
:mod:`longctx.layers.adaptive_span`; this file wires it into pre-norm blocks and a streaming state.

Attention. Query ``i`` scores key ``j`` with ``(q_i + u)^T k_j + (q_i + v)^T W_R R_{i-j}``, scaled by ``1/sqrt(Dh)``
(§3.3); ``u``, ``v`` are shared by all layers (the paper) or per layer (``model.xl.share_bias = false``). Each query
at absolute position ``p`` sees the keys in ``(p - mem_len, p]``: the window is defined per query, so the outputs do
not depend on how the stream is cut into segments (unlike the paper's per-segment memory, where the first query of a
segment sees ``mem_len`` keys more than the last one of the previous segment's).

Spans (``model.xl.span_mode``). ``fixed``: the whole window. ``adaptive``: a learned span per head, soft mask
``m_z(x) = clamp((R + z - x) / R, 0, 1)`` over the distance, weights renormalised over the masked keys, penalty
``span_loss * mean z`` per layer in training. ``dynamic``: ``z_t = S sigmoid(v^T x_t + b)`` per head from the
block's normalised input. Keys at distance ``>= z + R`` have mask 0, so each forward only computes scores over the
``floor(max z + R) + 1`` most recent keys (rounded up to a multiple of 8) a layer can see.

State (:class:`XLState`). Per layer, the projected keys and values of the last ``C_l`` tokens, ``C_l <= mem_len - 1``
(the query at ``p`` needs keys back to ``p - mem_len + 1``). Keys and values after projection, not the layer
inputs as in the paper: a token read one at a time then costs one projection instead of re-projecting the whole
memory in every layer (the price: 2 x D numbers per token and layer instead of D). Positions enter only through
relative distances, so cached keys never need re-encoding. ``C_l`` is fixed when the state is created and never
changes along a stream, so ``nbytes()`` is constant:

* in training mode (and for ``fixed``/``dynamic`` spans): ``C_l = mem_len - 1``. The spans change at every
  optimizer step, and the trainer carries its lanes' states across steps, so the state keeps the full window.
* adaptive span, state created in eval mode: ``C_l`` = the largest distance the layer's widest head can see,
  ``floor(max_h z + R)``, rounded up to ``span_cache_multiple`` (64) and capped at ``mem_len - 1``. Dropping
  older keys does not change any output (their mask is 0). Such a state belongs to the spans it was made with: if
  the spans later grow beyond ``C_l`` the missing keys are treated as absent, so make a new state after training.
* dynamic span: a head can always reach ``S + R > mem_len - 1``, so nothing is trimmed.

Block (pre-norm, as the baseline; Transformer-XL itself is post-norm)::

    x ──┬─ LayerNorm ─ Q,K,V ─ rel. attention over [cache ; segment] (+ span mask) ─ proj ─(+)──┬─ LN ─ MLP ─(+)── x'
        └──────────────────────────────────────────────────────────────────────────────────┘└──────────────┘
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.layers.adaptive_span import AdaptiveSpan, DynamicSpan, round_up, span_reach
from longctx.layers.attention import BLOCK, band_attention
from longctx.layers.block import PreNormBlock
from longctx.layers.relative import RelativeProjections, sinusoid_table

WINDOW_MULTIPLE = 8  # a trimmed compute window is rounded up to this (fewer distinct shapes, aligned matmuls)


@dataclass(frozen=True)
class XLState(State):
    """Per-layer key/value caches packed along the slot axis: layer ``l`` owns slots ``sum(C[:l]) : sum(C[:l + 1])``."""

    keys: Tensor  # (B, H, sum_l C_l, Dh) projected keys of the last C_l tokens of each layer, oldest first
    values: Tensor  # (B, H, sum_l C_l, Dh) projected values, same layout
    capacity: Tensor  # (B, L) int64: C_l, the cache slots of layer l (the same in every row, fixed for the stream)
    position: Tensor  # (B,) int64: tokens read so far; the newest min(position, C_l) slots of layer l are real

    def reset(self, mask: Tensor) -> XLState:
        """Rows where ``mask`` is true become empty memory; the layout (``capacity``) is kept."""
        keep = ~mask.to(device=self.position.device, dtype=torch.bool)  # (B,)
        rows = keep.view(-1, 1, 1, 1)
        return dataclasses.replace(
            self,
            keys=torch.where(rows, self.keys, torch.zeros_like(self.keys)),  # not keys * keep: NaN * 0 is NaN
            values=torch.where(rows, self.values, torch.zeros_like(self.values)),
            position=torch.where(keep, self.position, torch.zeros_like(self.position)),
        )


@dataclass(frozen=True)
class _Window:
    """What one layer's attention needs to know about the cache and the window in this forward."""

    size: int  # W: each query scores the W keys at distances W - 1 .. 0
    table: Tensor  # (W, D) R_d for d = W - 1 .. 0 (band order)
    valid: Tensor  # (B, 1, T, W) additive: 0 for keys that exist, -inf for the others
    distances: Tensor  # (W,) float32: W - 1 .. 0


class XLAttention(RelativeProjections):
    """Multi-head relative attention of a segment over ``[cache ; segment]`` with an optional span mask."""

    def __init__(self, cfg: ModelConfig, own_bias: bool) -> None:
        super().__init__(cfg, own_bias)
        xl = cfg.xl
        self.span: AdaptiveSpan | DynamicSpan | None = None
        if xl.span_mode == "adaptive":
            self.span = AdaptiveSpan(cfg.n_head, xl.mem_len, xl.span_ramp, xl.span_init, xl.span_loss)
        elif xl.span_mode == "dynamic":
            self.span = DynamicSpan(
                cfg.d_model, cfg.n_head, xl.mem_len, xl.span_ramp, xl.span_init, xl.span_loss, cfg.init_std
            )

    def forward(
        self,
        h: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        window: _Window,
        u: Tensor,
        v: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """h (B, T, D) normalised input, cache_k/v (B, H, C, Dh) -> output (B, T, D), keys and values
        (B, H, C + T, Dh) of ``[cache ; segment]``, and the dynamic spans (B, H, T) (None otherwise)."""
        B, T, D = h.shape
        H, Dh, W = self.n_head, self.head_dim, window.size
        q, k, val = self.qkv(h).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        keys = torch.cat([cache_k.to(k.dtype), k], dim=2)  # (B, H, C + T, Dh)
        values = torch.cat([cache_v.to(val.dtype), val], dim=2)
        ctx_k, ctx_v = _last_slots(keys, W - 1 + T), _last_slots(values, W - 1 + T)  # (B, H, W - 1 + T, Dh)

        pos = self.position_term(q + v.to(q.dtype).view(H, 1, Dh), window.table)  # (B, H, T, W)
        scale, spans = 1.0 / math.sqrt(Dh), None
        if isinstance(self.span, AdaptiveSpan):  # the soft span mask log m joins the position term
            pos = torch.add(self.span.log_mask(window.distances), pos.float(), alpha=scale)  # (B, H, T, W)
            scale = 1.0
        elif isinstance(self.span, DynamicSpan):
            spans = self.span.spans(h)  # (B, H, T)
            pos = torch.add(self.span.log_mask(spans, window.distances), pos.float(), alpha=scale)
            scale = 1.0
        block = BLOCK if h.device.type == "cpu" else max(T, 1)
        cache_grad = cache_k.requires_grad or cache_v.requires_grad  # else: no gradient for the W - 1 cache rows
        y = band_attention(
            q + u.to(q.dtype).view(H, 1, Dh),
            ctx_k,
            ctx_v,
            pos,
            block,
            grad_start=0 if cache_grad else W - 1,
            mask=window.valid,
            bias_scale=scale,
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.dropout(self.out_proj(y)), keys, values, spans


def _last_slots(seq: Tensor, n: int) -> Tensor:
    """The last ``n`` entries of seq (B, H, S, Dh) along dim 2, left-padded with zeros if S < n (masked slots)."""
    S = seq.shape[2]
    return seq[:, :, S - n :] if S >= n else F.pad(seq, (0, 0, n - S, 0))


class XLDecoder(Decoder[XLState]):
    """Transformer-XL relative attention with a per-query window of ``mem_len``; optional adaptive/dynamic span."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mem_len = cfg.xl.mem_len
        self.span_mode = cfg.xl.span_mode
        own_bias = not cfg.xl.share_bias
        self.blocks = nn.ModuleList(PreNormBlock(cfg, XLAttention(cfg, own_bias)) for _ in range(cfg.n_layer))
        shared = cfg.xl.share_bias
        self.pos_bias_u = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if shared else None
        self.pos_bias_v = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std) if shared else None
        distances = torch.arange(self.mem_len - 1, -1, -1, dtype=torch.float32)  # band order: oldest first
        self.register_buffer("table", sinusoid_table(distances, cfg.d_model), persistent=False)  # (mem_len, D)

    # ------------------------------------------------------------------------------------------ spans and windows

    def reaches(self) -> list[int]:
        """Per layer, the largest distance a head can see (``mem_len - 1`` without a span mask)."""
        full = self.mem_len - 1
        if self.span_mode != "adaptive":  # fixed: the window; dynamic: S + R > mem_len - 1, the window again
            return [full] * len(self.blocks)
        with torch.no_grad():  # one device sync for all layers
            widest = torch.stack([b.mix.span.spans().max() for b in self.blocks]).tolist()  # type: ignore[union-attr]
        return [min(full, span_reach(z, self.cfg.xl.span_ramp)) for z in widest]

    def state_slots(self, trim: bool) -> list[int]:
        """Cache slots per layer: ``mem_len - 1``, or for adaptive spans with ``trim`` the reach rounded up."""
        full = self.mem_len - 1
        if not (trim and self.span_mode == "adaptive"):
            return [full] * len(self.blocks)
        return [min(full, round_up(r, self.cfg.xl.span_cache_multiple)) for r in self.reaches()]

    def _windows(self, slots: list[int], position: Tensor, T: int) -> list[_Window]:
        """The window of each layer for a segment of T tokens after a cache of ``slots`` per layer."""
        t = torch.arange(T, device=position.device)
        made: dict[tuple[int, int], _Window] = {}  # layers with the same window and cache share one
        out = []
        for reach, slots_l in zip(self.reaches(), slots, strict=True):
            size = min(self.mem_len, round_up(reach + 1, WINDOW_MULTIPLE))
            if slots_l >= reach:  # the cache holds everything visible: no need to look past it
                size = min(size, slots_l + 1)
            if (size, slots_l) not in made:
                distances = torch.arange(size - 1, -1, -1, dtype=torch.float32, device=position.device)  # (W,)
                limit = t[None, :] + torch.clamp(position, max=slots_l)[:, None]  # (B, T): farthest existing key
                valid = torch.zeros(limit.shape + (size,), device=position.device)  # (B, T, W)
                valid.masked_fill_(distances > limit[..., None], float("-inf"))
                made[size, slots_l] = _Window(size, self.table[self.mem_len - size :], valid[:, None], distances)
            out.append(made[size, slots_l])
        return out

    # ------------------------------------------------------------------------------------------ contract

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype, trim: bool | None = None
    ) -> XLState:
        """Empty memory; ``trim`` (default: in eval mode) trims adaptive-span caches to the current spans."""
        cfg = self.cfg
        slots = self.state_slots(not self.training if trim is None else trim)
        shape = (batch_size, cfg.n_head, sum(slots), cfg.head_dim)
        capacity = torch.tensor(slots, dtype=torch.int64, device=device).expand(batch_size, -1).contiguous()
        return XLState(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            capacity=capacity,
            position=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def forward(self, x: Tensor, state: XLState) -> DecoderOutput[XLState]:
        B, T, _ = x.shape
        slots = state.capacity[0].tolist() if B else self.state_slots(not self.training)
        starts = [sum(slots[:i]) for i in range(len(slots) + 1)]
        windows = self._windows(slots, state.position, T)
        u, v = self.pos_bias_u, self.pos_bias_v
        new_keys, new_values, dyn_spans = [], [], []
        for layer, block in enumerate(self.blocks):
            s0, s1 = starts[layer], starts[layer + 1]
            lu = u if u is not None else block.mix.pos_bias_u
            lv = v if v is not None else block.mix.pos_bias_v
            x, keys, values, spans = block(
                x, state.keys[:, :, s0:s1], state.values[:, :, s0:s1], windows[layer], lu, lv
            )
            n = keys.shape[2]
            new_keys.append(keys[:, :, n - slots[layer] :].to(state.keys.dtype))  # (B, H, C_l, Dh)
            new_values.append(values[:, :, n - slots[layer] :].to(state.values.dtype))
            dyn_spans.append(spans)
        next_state = XLState(
            keys=torch.cat(new_keys, dim=2),  # (B, H, sum C, Dh)
            values=torch.cat(new_values, dim=2),
            capacity=state.capacity,
            position=state.position + T,
        )
        aux, stats = self._span_loss_and_stats(dyn_spans, x)
        return DecoderOutput(hidden=x, state=next_state, aux_loss=aux, stats=stats)

    def _span_loss_and_stats(self, dyn_spans: list[Tensor | None], x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Span penalty (training only) and per-layer span mean/max stats (training only: one device sync)."""
        aux = x.new_zeros((), dtype=torch.float32)
        if self.span_mode == "fixed" or not self.training:
            return aux, {}
        per_layer = []  # (mean, max) per layer
        for block, spans in zip(self.blocks, dyn_spans, strict=True):
            span = block.mix.span
            if isinstance(span, AdaptiveSpan):
                z = span.spans()
                aux = aux + span.penalty()
            else:
                assert isinstance(span, DynamicSpan) and spans is not None
                z = spans
                aux = aux + span.penalty(spans)
            per_layer.append(torch.stack([z.detach().float().mean(), z.detach().float().max()]))
        values = torch.stack(per_layer).tolist()  # [[mean, max], ...]
        stats = {}
        for layer, (mean, top) in enumerate(values):
            stats[f"span/layer{layer}_mean"], stats[f"span/layer{layer}_max"] = float(mean), float(top)
        return aux, stats

    def after_optimizer_step(self) -> None:
        """Adaptive span: clamp every head's ratio ``c`` to [0, 1] (after each step, never inside the forward)."""
        for block in self.blocks:
            if isinstance(block.mix.span, AdaptiveSpan):
                block.mix.span.clamp_()

    @torch.no_grad()
    def position_parameters(self) -> list[nn.Parameter]:
        """Adaptive: the span ratio of every head; dynamic: the span's offset (the bias of its projection)."""
        if self.span_mode == "adaptive":
            return [b.mix.span.ratio for b in self.blocks]  # type: ignore[union-attr]
        if self.span_mode == "dynamic":
            return [b.mix.span.proj.bias for b in self.blocks]  # type: ignore[union-attr]
        return []

    def describe(self) -> dict[str, Any]:
        """Span mode and, for adaptive spans, the learned span of every head (tokens) and the trimmed cache."""
        out: dict[str, Any] = {"span_mode": self.span_mode, "mem_len": self.mem_len}
        if self.span_mode == "adaptive":
            spans = [
                [round(float(z), 2) for z in b.mix.span.spans().detach()]  # type: ignore[union-attr]
                for b in self.blocks
            ]
            out["spans"] = spans
            out["span_mean"] = round(sum(map(sum, spans)) / max(1, sum(map(len, spans))), 2)
            out["cache_slots_per_layer"] = self.state_slots(trim=True)
        elif self.span_mode == "dynamic":  # the span of each head for a zero input: S sigmoid(b)
            out["spans_at_zero_input"] = [
                [round(float(z), 2) for z in self.mem_len * torch.sigmoid(b.mix.span.proj.bias.detach())]  # type: ignore
                for b in self.blocks
            ]
        return out

    # facts (see Decoder)
    PROJECTED = ("keys", "values")
    TINY = {"xl": {"mem_len": 8}}  # fixed span; the contract cases add adaptive and dynamic spans

    @classmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        return cfg.xl.mem_len, "xl.mem_len (the largest span; adaptive spans may learn less)"

    @classmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        return cfg.n_layer * (cfg.xl.mem_len - 1), f"{cfg.n_layer} layers x (xl.mem_len - 1)"

    @classmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        return cfg.xl.mem_len

    @classmethod
    def attended_keys(cls, cfg: ModelConfig) -> int:
        return cfg.xl.mem_len  # the largest span
