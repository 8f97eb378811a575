"""The Attention Free Transformer decoder (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103).

AFT replaces attention by an element-wise, per-channel weighted average of the values (eq. 2)::

    Y_t = σ(Q_t) ⊙ Σ_{t'} exp(K_{t'} + w_{t,t'}) ⊙ V_{t'} / Σ_{t'} exp(K_{t'} + w_{t,t'})

here always causal (the sums run over ``t' <= t``, the paper's footnote on the masked mode) and with a bias that
depends on the distance ``δ = t - t'`` only. ``model.aft.variant`` selects the bias of the first ``s`` distances
(the *window*):

* ``simple`` (eq. 4): no bias (s = 1, ``w(0) = 0``); with ``far = "uniform"``
  ``Y_t = σ(Q_t) ⊙ cumsum(e^K ⊙ V)_t / cumsum(e^K)_t``.
* ``local`` (eq. 3): a learned ``w(δ)`` for ``δ < window``; ``heads`` groups of channels may have their own ``w``
  (the paper uses one).
* ``conv`` (eq. 5, AFT-conv-h-s): ``heads`` heads with one key channel each (K is (T, h), Q and V (T, h, d/h)) and a
  filter per head with the paper's reparameterisation ``w = γ (w - mean(w)) / std(w) + β``, ``γ = β = 0`` at
  initialisation, so its window starts flat. Causal: the filter covers ``δ = 0 .. window - 1``.
* ``full``: a learned ``w(δ)`` for every ``δ < max_distance``.

``model.aft.far`` selects the bias of the distances ``δ >= s``:

* ``uniform`` (the paper): 0, not -inf, so every past token keeps contributing through ``e^K``. Over a long stream
  the far past is then an undecayed average over every token read, which drowns the window.
* ``decay`` (default): ``w(δ) = -λ_c (δ - s + 1)`` with ``λ_c = exp(θ_c)`` learned per key channel (simple, local,
  full: Dk = Dh, value channel c uses key channel c) or per head (conv: one key per head), as RWKV's per-channel time
  decay (Peng et al. 2023, arXiv 2305.13048). θ starts with time constants ``1/λ`` log-spaced from 1 to 4096 tokens
  over the channels of each head (over the heads for conv), so every scale exists from the first step; the window
  of local/full then starts as the ramp ``w(δ) = -0.3 min(δ, 31)`` instead of 0 (measured better, see the
  presets; flat beyond 31 so that a long full window does not start at biases whose exp underflows).
  The window biases, conv's γ and β and θ are :meth:`AFTDecoder.position_parameters`: no weight decay, a larger
  learning rate.

How ``full`` relates to the paper's AFT-full. The paper learns an absolute ``w_{t,t'}``, a T x T table (or its
factorisation ``u_t^T v_{t'}``) over the positions of one training sequence. That form cannot stream: the
bias of a pair depends on where both tokens sit, so positions beyond the trained T have no bias at all, and because
``exp(K_{t'} + w_{t,t'})`` does not factorise into a part of t' that can be summed once and reused by every later
query, each new query needs every past key and value again: O(t) memory and time per token, unbounded. Our
``full`` keeps the paper's reach (every pair of a training segment of up to ``max_distance`` tokens has its own
learned bias) but ties the bias to the distance, a Toeplitz ``w_{t,t'} = w(t - t')``, and treats the distances
beyond ``max_distance`` exactly like ``local`` treats those beyond its window (0, or the linear decay): then the
terms of all tokens further than ``max_distance`` fold into running (decayed) sums, and the memory is bounded.
With ``max_distance >=`` the segment length, every pair inside a training segment is distinct, as in the paper; it
is the causal, streamable reading of AFT-full.

Memory of a stream, per layer (the numerics are in :mod:`longctx.layers.aft`): the far sums ``Σ e^{K - ref + w} V``
and ``Σ e^{K - ref + w}`` over the tokens at distance ``>= s`` from the next token (s = window, max_distance, or 1 for
simple; w = 0 or the decay, which multiplies them by ``exp(-λ) <= 1`` per token), the terms ``e^{K - ref}`` of the
last ``s - 1`` tokens one by one, and their reference ``ref`` = the running maximum of the keys (zeros = empty
memory; a new maximum rescales the memory, as online softmax rescales its accumulators). Windows are defined
per query by absolute position, so any chunking of a stream gives the same outputs; segments use the parallel form
(one Toeplitz matrix product per block of queries for the window, plus the far sums: inside the product with
``uniform``, a blocked decayed recurrence with ``decay``), single tokens the recurrent form. The memory's size never
depends on the stream. The blocks run time-major, (T, B, D)
inside the decoder, so that one head's terms form a (time, batch x channels) matrix; the state keeps the batch first.

Block (pre-norm, as the transformer baseline; no position embedding, the biases carry the order)::

    x ──┬─ LayerNorm ─ Q,K,V ─ AFT over [memory ; segment] ─ ⊙σ(Q) ─ proj ─(+)──┬─ LayerNorm ─ MLP ─(+)── x'
        └───────────────────────────────────────────────────────────────────────┘└──────────────────┘
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.layers import init_linear
from longctx.layers.aft import Memory, aft_parallel, aft_recurrent
from longctx.layers.block import PreNormBlock

REPARAM_EPS = 1e-5  # conv: std(w) + eps in the reparameterisation (a filter of one tap has std 0)
DECAY_TAU_RANGE = (1.0, 4096.0)  # far="decay": initial time constants 1/λ, log-spaced over the channels of a head
DECAY_WINDOW_SLOPE = 0.3  # far="decay", local/full: initial window bias -0.3 δ (measured: better than 0, 0.1 and 1)
DECAY_RAMP_END = 31  # ... for δ <= 31 and flat (-9.3) beyond: a ramp over a long full window would reach biases
#                      whose exp is 0 or denormal (no gradient, and denormal arithmetic is slow on CPUs)


def initial_window_ramp(span: int) -> Tensor:
    """The initial window bias of local/full with far="decay": ``-0.3 min(δ, 31)`` for δ = 0 .. span - 1, (span,)."""
    delta = torch.arange(span, dtype=torch.float32).clamp(max=DECAY_RAMP_END)
    return -DECAY_WINDOW_SLOPE * delta


def initial_log_decay(heads: int, key_dim: int) -> Tensor:
    """θ (H, Dk) with λ = exp(θ): time constants log-spaced over ``DECAY_TAU_RANGE``, over the key channels of
    each head (Dk > 1) or over the heads (Dk = 1, conv), so that every scale exists from the first step."""
    n = key_dim if key_dim > 1 else heads
    lo, hi = DECAY_TAU_RANGE
    theta = -torch.linspace(math.log(lo), math.log(hi), n)  # θ = -log τ
    return theta.repeat(heads, 1) if key_dim > 1 else theta[:, None]


@dataclass(frozen=True)
class AFTState(State):
    """Per layer: window terms and far sums relative to the running key maximum ``ref`` (zeros = empty memory).

    C = Dh + Dk: the numerator terms ``exp(K - ref) V`` (Dh channels) and the denominator terms ``exp(K - ref)`` (Dk).
    """

    window: Tensor  # (B, L, H, M, C) terms of the last M = s - 1 tokens, oldest first (float32)
    far: Tensor  # (B, L, H, C) sum of the terms of every older token
    ref: Tensor  # (B, L, H, Dk) running maximum of every key read (0 and unused while position == 0)
    position: Tensor  # (B,) int64: tokens read so far = absolute position of the next token


def bias_span(cfg: ModelConfig) -> int:
    """s: the number of distances 0..s-1 with a learned bias (the window including the query); 1 for simple."""
    aft = cfg.aft
    return {"simple": 1, "full": aft.max_distance}.get(aft.variant, aft.window)


class AFTMixer(nn.Module):
    """The AFT token mixer of one layer: ``out_proj(σ(Q) ⊙ num / den)`` over ``[memory ; segment]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        aft = cfg.aft
        self.variant = aft.variant
        self.heads = 1 if aft.variant == "simple" else aft.heads
        self.head_dim = cfg.d_model // self.heads  # Dh
        self.key_dim = 1 if aft.variant == "conv" else self.head_dim  # Dk: conv has one key per head
        self.span = bias_span(cfg)
        self.qkv = nn.Linear(cfg.d_model, 2 * cfg.d_model + self.heads * self.key_dim)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.qkv, cfg.init_std)
        init_linear(self.out_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if aft.variant == "simple":
            self.bias = None
        elif aft.variant == "conv":  # raw filter (any spread; it is standardised) and γ = β = 0: starts as simple
            self.bias = nn.Parameter(torch.randn(self.heads, self.span))
            self.bias_gain = nn.Parameter(torch.zeros(self.heads))  # γ (1-D: no weight decay, like a norm gain)
            self.bias_shift = nn.Parameter(torch.zeros(self.heads))  # β
        else:  # local, full: w(δ) = 0 at initialisation (the paper's u^T v with N(0, 1e-2) entries is ~0 too)
            self.bias = nn.Parameter(torch.zeros(self.heads, self.span))
            if aft.far == "decay":  # a decreasing ramp: nearer tokens count more from the first step
                with torch.no_grad():
                    self.bias.copy_(initial_window_ramp(self.span))
        self.far = aft.far
        # decay: θ (H, Dk), λ = exp(θ) per key channel; the far bias is -λ (δ - s + 1) for δ >= s
        self.log_decay = nn.Parameter(initial_log_decay(self.heads, self.key_dim)) if aft.far == "decay" else None

    def log_bias(self) -> Tensor | None:
        """The bias b(δ) of distances 0..s-1 per head, (H, s); None for simple (b = 0)."""
        if self.bias is None:
            return None
        if self.variant != "conv":
            return self.bias
        w = self.bias  # (H, s)
        standard = (w - w.mean(dim=1, keepdim=True)) / (w.std(dim=1, keepdim=True, unbiased=False) + REPARAM_EPS)
        return self.bias_gain[:, None] * standard + self.bias_shift[:, None]  # (H, s) γ (w - mean) / std + β

    def forward(self, x: Tensor, memory: Memory, started: Tensor) -> tuple[Tensor, Memory]:
        """x (T, B, D) time-major, memory of this layer (float32), started (B,) -> output (T, B, D), new memory."""
        T, B, D = x.shape
        H, Dh, Dk = self.heads, self.head_dim, self.key_dim
        q, k, v = self.qkv(x).split([D, H * Dk, D], dim=-1)  # (T, B, D), (T, B, H * Dk), (T, B, D)
        with torch.autocast(x.device.type, enabled=False):  # exponentials and sums in float32 (float64 stays)
            wide = memory.far.dtype
            k = k.view(T, B, H, Dk).permute(2, 0, 1, 3).to(wide)  # (H, T, B, Dk)
            v = v.view(T, B, H, Dh).permute(2, 0, 1, 3).to(wide)  # (H, T, B, Dh)
            kernel = aft_recurrent if T == 1 else aft_parallel
            decay = None if self.log_decay is None else torch.exp(self.log_decay)  # (H, Dk) λ
            y, memory = kernel(memory, k, v, started, self.log_bias(), decay)  # (H, T, B, Dh)
            y = y.permute(1, 2, 0, 3).reshape(T, B, D) * torch.sigmoid(q.to(wide))  # (T, B, D) σ(Q) gating
        return self.dropout(self.out_proj(y.to(x.dtype))), memory


class AFTDecoder(Decoder[AFTState]):
    """AFT-simple/local/conv/full, far past uniform or decayed; state = far sums + terms of the last ``s - 1`` tokens
    + running key maximum."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_len = bias_span(cfg) - 1  # M
        self.blocks = nn.ModuleList(PreNormBlock(cfg, AFTMixer(cfg)) for _ in range(cfg.n_layer))

    def init_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> AFTState:
        mix = self.blocks[0].mix
        L, H, M, C, Dk = self.cfg.n_layer, mix.heads, self.cache_len, mix.head_dim + mix.key_dim, mix.key_dim
        wide = torch.promote_types(dtype, torch.float32)  # accumulators are never below float32
        return AFTState(
            window=torch.zeros(batch_size, L, H, M, C, dtype=wide, device=device),
            far=torch.zeros(batch_size, L, H, C, dtype=wide, device=device),
            ref=torch.zeros(batch_size, L, H, Dk, dtype=wide, device=device),
            position=torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def forward(self, x: Tensor, state: AFTState) -> DecoderOutput[AFTState]:
        T = x.shape[1]
        started = state.position > 0  # (B,) ref is meaningful
        x = x.transpose(0, 1).contiguous()  # (T, B, D): time-major, so that one head's terms are a (T, B*C) matrix
        windows, fars, refs = [], [], []
        for layer, block in enumerate(self.blocks):
            memory = Memory(
                window=state.window[:, layer].permute(1, 2, 0, 3),  # (H, M, B, C)
                far=state.far[:, layer].transpose(0, 1),
                ref=state.ref[:, layer].transpose(0, 1),
            )
            x, memory = block(x, memory, started)
            windows.append(memory.window)
            fars.append(memory.far)
            refs.append(memory.ref)
        next_state = AFTState(
            window=torch.stack(windows).permute(3, 0, 1, 2, 4),  # (L, H, M, B, C) -> (B, L, H, M, C)
            far=torch.stack(fars).permute(2, 0, 1, 3),  # (L, H, B, C) -> (B, L, H, C)
            ref=torch.stack(refs).permute(2, 0, 1, 3),
            position=state.position + T,
        )
        return DecoderOutput(hidden=x.transpose(0, 1), state=next_state, aux_loss=x.new_zeros(()), stats={})

    def position_parameters(self) -> list[nn.Parameter]:
        """The window bias rows, conv's γ and β, and the far decays θ: no weight decay, a larger learning rate."""
        names = ("bias", "bias_gain", "bias_shift", "log_decay")
        return [
            p
            for block in self.blocks
            for name in names
            if isinstance(p := getattr(block.mix, name, None), nn.Parameter)
        ]

    @torch.no_grad()
    def describe(self) -> dict[str, Any]:
        """Variant, far rule and, per layer, the mean window bias at distance 0 and s - 1 (nats) and the min / median
        / max time constant 1/λ of the far decay (tokens)."""
        aft = self.cfg.aft
        out: dict[str, Any] = {"aft_variant": aft.variant, "aft_far": aft.far, "aft_bias_span": self.cache_len + 1}
        layers = []
        for block in self.blocks:
            mix: AFTMixer = block.mix
            info: dict[str, Any] = {}
            bias = mix.log_bias()
            if bias is not None:
                info["bias_d0"] = round(float(bias[:, 0].mean()), 4)
                info["bias_last"] = round(float(bias[:, -1].mean()), 4)
            if mix.log_decay is not None:
                tau = torch.exp(-mix.log_decay.detach().float()).flatten()
                info["tau_min"], info["tau_median"], info["tau_max"] = (
                    round(float(x), 3) for x in (tau.min(), tau.median(), tau.max())
                )
            layers.append(info)
        out["aft_layers"] = layers
        return out

    # facts (see Decoder)
    TINY = {"aft": {"variant": "local", "window": 4, "heads": 2, "max_distance": 6}}  # the cases add the others

    @classmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        # the distances with a learned position bias; every earlier token still enters the running sums
        variant = cfg.aft.variant
        if variant in ("local", "conv"):
            return cfg.aft.window, f"aft.window (position biases of aft-{variant})"
        if variant == "full":
            return cfg.aft.max_distance, "aft.max_distance (position biases of aft-full)"
        return seq_len, "train.seq_len (aft-simple has no window, only running sums)"

    @classmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        return None, f"aft-{cfg.aft.variant}: running sums over the whole past (far = {cfg.aft.far!r})"

    @classmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        return max(4, bias_span(cfg))  # the biased distances, the query's own included; at least 4 (aft-simple)
