"""Banded sliding-window attention (the transformer decoder's CPU kernel, with a hand-written backward) against
dense softmax attention with the full window mask, for outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.layers.attention import additive_mask, banded_attention, window_blocks, window_mask


def dense(q, keys, values, mask):
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, M + T)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values


@pytest.mark.parametrize("T, M, window, block", [(13, 7, 8, 4), (20, 0, 5, 8), (6, 9, 10, 64), (1, 9, 10, 4)])
def test_banded_equals_dense_with_gradients(T, M, window, block):
    torch.manual_seed(T + M)
    B, H, Dh = 2, 2, 8
    q = torch.randn(B, H, T, Dh, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, H, M + T, Dh, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, H, M + T, Dh, dtype=torch.float64, requires_grad=True)
    cache_valid = torch.arange(M)[None, :] >= torch.tensor([[M - 3], [0]])  # row 0: 3 real cache slots; row 1: all
    blocks = [(q0, q1, k0, k1, additive_mask(a, torch.float64))
              for q0, q1, k0, k1, a in window_blocks(T, M, window, cache_valid, block, align=4)]
    out = banded_attention(q, keys, values, blocks)
    ref = dense(q, keys, values, window_mask(T, M, window, cache_valid))
    # float64 throughout: both sides agree to rounding (~1e-15); 1e-10 leaves room and still catches any real error
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_grad_start_skips_only_the_cache_rows():
    torch.manual_seed(0)
    T, M, window = 10, 6, 7
    q = torch.randn(1, 2, T, 8, requires_grad=True)
    keys = torch.randn(1, 2, M + T, 8, requires_grad=True)
    values = torch.randn(1, 2, M + T, 8, requires_grad=True)
    valid = torch.ones(1, M, dtype=torch.bool)
    blocks = [(a, b, c, d, additive_mask(m)) for a, b, c, d, m in window_blocks(T, M, window, valid, 4)]
    out = banded_attention(q, keys, values, blocks, grad_start=M)
    ref = dense(q, keys, values, window_mask(T, M, window, valid))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad)
    # float32: 1e-5 is a few hundred ulps of the O(1) values involved
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g[:, :, M:], w[:, :, M:], atol=1e-5, rtol=0)
        assert (g[:, :, :M] == 0).all()


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(1)
    T, M, window = 16, 8, 9
    q, keys, values = (torch.randn(1, 2, n, 16) for n in (T, M + T, M + T))
    valid = torch.ones(1, M, dtype=torch.bool)
    blocks = [(a, b, c, d, additive_mask(m)) for a, b, c, d, m in window_blocks(T, M, window, valid, 8)]
    ref = banded_attention(q, keys, values, blocks)
    low = banded_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), blocks)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: outputs (weighted means of N(0,1) values) agree to a few 1e-2
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=0)
