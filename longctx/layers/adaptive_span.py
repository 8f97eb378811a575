"""Soft attention-span masks: adaptive span and dynamic span (Sukhbaatar et al. 2019, arXiv 1905.07799, §2.2).

Each head attends only over a learned span ``z``. The soft mask over the distance ``x`` between query and key is

    m_z(x) = min(max((R + z - x) / R, 0), 1)                         (the masking function of §2.2)

with ``R`` the ramp, and the attention weights are renormalised over the masked keys,

    a_tr = m_z(t - r) exp(s_tr) / sum_q m_z(t - q) exp(s_tq)         (the masked form of the softmax, §2.2)

which is ``softmax_r(s_tr + log m_z(t - r))``: :func:`log_span_mask` gives that additive term (``-inf`` where the mask
is 0), so that any softmax kernel applies the paper's renormalisation exactly. The loss adds ``lambda / M sum_i z_i``
(M heads per layer), i.e. ``lambda * mean z`` per layer, in training only.

* :class:`AdaptiveSpan`: one learned ratio ``c`` per head, ``z = S c`` with ``S`` the maximum span; ``c`` is clamped
  to [0, 1] after every optimizer step (as the official code does), never inside the forward.
* :class:`DynamicSpan` (§2.2, "dynamic attention span"; absent from the official code): ``z_t = S sigmoid(v^T x_t +
  b)`` per head from the current input ``x_t``.

Keys at a distance ``x >= z + R`` have mask 0 and no influence at all, which is what makes trimming a cache to
``span + ramp`` exact (:func:`span_reach`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# log() of the mask is taken on max(m, TINY): where m > 0 this is log(m) (m >= ~1e-9 for any float32 span and ramp),
# and where m == 0 the branch is discarded by torch.where, so its gradient (1 / TINY times a zero) stays finite.
TINY = 1e-30


def soft_span_mask(spans: Tensor, distances: Tensor, ramp: float) -> Tensor:
    """m_z(x) = clamp((R + z - x) / R, 0, 1) for spans (...,) and distances (W,) -> (..., W)."""
    return ((ramp + spans[..., None] - distances) / ramp).clamp(0.0, 1.0)


def log_span_mask(spans: Tensor, distances: Tensor, ramp: float) -> Tensor:
    """log m_z(x) (..., W), ``-inf`` where the mask is 0; add it to the attention scores before the softmax."""
    mask = soft_span_mask(spans, distances, ramp)
    return torch.where(mask > 0, mask.clamp_min(TINY).log(), torch.full_like(mask, float("-inf")))


def span_reach(max_span: float, ramp: float) -> int:
    """The largest integer distance whose mask can be non-zero: ``floor(z + R)`` (the mask is 0 from ``z + R`` on).

    ``floor`` rather than ``ceil(z + R) - 1`` on purpose: when ``z + R`` is an integer in float64 but rounds up to
    it in float32, the key at that distance has mask exactly 0, so one extra key is harmless and none is missed.
    """
    return int(math.floor(max_span + ramp))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class AdaptiveSpan(nn.Module):
    """Learned span per head: ``z_h = S c_h`` with ``c`` (H,) a parameter clamped to [0, 1] after each step."""

    def __init__(self, n_head: int, max_span: int, ramp: float, init: float, loss_coef: float) -> None:
        super().__init__()
        self.max_span, self.ramp, self.loss_coef = max_span, ramp, loss_coef
        self.ratio = nn.Parameter(torch.full((n_head,), float(init)))  # c; 1-D: no weight decay in the trainer

    def spans(self) -> Tensor:
        """z (H,) in tokens."""
        return self.ratio * self.max_span

    def log_mask(self, distances: Tensor) -> Tensor:
        """log m_z(x) for each head and distance: (1, H, 1, W)."""
        return log_span_mask(self.spans().float(), distances, self.ramp)[None, :, None, :]

    def penalty(self) -> Tensor:
        """lambda * mean_h z_h (scalar, float32)."""
        return self.loss_coef * self.spans().float().mean()

    def reach(self) -> int:
        """The largest distance any head of this layer can see (host value: one device sync)."""
        return span_reach(float(self.spans().detach().max()), self.ramp)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.ratio.clamp_(0.0, 1.0)


class DynamicSpan(nn.Module):
    """Input-dependent span per head and token: ``z_t = S sigmoid(v^T x_t + b)`` (one ``v``, ``b`` per head).

    ``b`` starts at ``logit(init)`` (``init`` clipped to [0.01, 0.99] so that it is finite), ``v`` small (N(0,
    ``init_std``)), so every head starts with a span of about ``S * init``.
    """

    def __init__(
        self, d_model: int, n_head: int, max_span: int, ramp: float, init: float, loss_coef: float, init_std: float
    ) -> None:
        super().__init__()
        self.max_span, self.ramp, self.loss_coef = max_span, ramp, loss_coef
        self.proj = nn.Linear(d_model, n_head)
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)
        p = min(max(init, 0.01), 0.99)
        nn.init.constant_(self.proj.bias, math.log(p / (1.0 - p)))

    def spans(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> z (B, H, T) float32, in tokens."""
        return self.max_span * torch.sigmoid(self.proj(x).float()).transpose(1, 2)

    def log_mask(self, spans: Tensor, distances: Tensor) -> Tensor:
        """spans (B, H, T) -> log m_z(x) (B, H, T, W)."""
        return log_span_mask(spans, distances, self.ramp)

    def penalty(self, spans: Tensor) -> Tensor:
        """lambda * mean z over heads, tokens and lanes (scalar, float32)."""
        return self.loss_coef * spans.mean()

    def reach(self) -> int:
        """The largest distance a head can ever see: ``floor(S + R)``, i.e. no trimming."""
        return span_reach(float(self.max_span), self.ramp)
