"""Banded sliding-window attention (the transformer decoder's CPU kernel, with a hand-written backward) against
dense softmax attention with the full window mask, for outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.layers.attention import (
    additive_mask,
    banded_attention,
    kernel_blocks,
    resolve_kernel,
    window_attention,
    window_blocks,
    window_mask,
)


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
    blocks = [
        (q0, q1, k0, k1, additive_mask(a, torch.float64))
        for q0, q1, k0, k1, a in window_blocks(T, M, window, cache_valid, block, align=4)
    ]
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


# --------------------------------------------------------------------------------------------------------------------
# every kernel of model.attention_kernel against the same naive reference (dense above, in float64)


def _kernel_inputs(T: int, M: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q (2, 2, T, 16), keys/values (2, 2, M + T, 16) ~ N(0, 1) in ``dtype``; cache_valid (2, M): 3 real slots in
    row 0, all in row 1."""
    g = torch.Generator().manual_seed(T * 100 + M)
    q, keys, values = (torch.randn(2, 2, n, 16, generator=g).to(dtype) for n in (T, M + T, M + T))
    cache_valid = torch.arange(M)[None, :] >= torch.tensor([[M - 3], [0]])
    return q, keys, values, cache_valid


def _reference(q, keys, values, cache_valid, window):
    """The naive masked softmax attention in float64 on the CPU on the very inputs the kernel got (bf16 inputs are
    exact in float64), so the tolerances below only cover the kernel's own rounding."""
    T, M = q.shape[2], cache_valid.shape[1]
    q64, k64, v64 = (t.cpu().double() for t in (q, keys, values))  # on the CPU, whatever the kernel's device
    return dense(q64, k64, v64, window_mask(T, M, window, cache_valid.cpu())).to(q.device)


KERNELS = ["banded", "sdpa"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: the path `auto` takes on a GPU


def test_auto_is_banded_on_the_cpu_and_sdpa_elsewhere():
    assert resolve_kernel("auto", torch.device("cpu")) == "banded"
    assert resolve_kernel("auto", torch.device("cuda")) == "sdpa"
    assert resolve_kernel("sdpa", torch.device("cpu")) == "sdpa"
    assert resolve_kernel("banded", torch.device("cuda")) == "banded"
    with pytest.raises(ValueError, match="flash"):
        resolve_kernel("flash", torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T, M, window", [(70, 7, 8), (150, 0, 5), (6, 9, 10), (1, 9, 10)])
def test_kernel_equals_the_reference_in_fp32_with_gradients(kernel, T, M, window, device):
    q, keys, values, cache_valid = (t.to(device) for t in _kernel_inputs(T, M, torch.float32))
    q, keys, values = (t.requires_grad_() for t in (q, keys, values))
    out = window_attention(kernel, q, keys, values, kernel_blocks(kernel, T, M, window, cache_valid))
    ref = _reference(q, keys, values, cache_valid, window)
    # float32 against float64: ~1e-7 relative rounding on O(1) outputs and gradients; 1e-5 is 100x that and far
    # below the effect of a mask one key off (checked below: > 1e-2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)  # both float32 (the reference casts back)
    if T > 1:  # the check can fail: a window one key shorter moves the outputs far beyond the tolerance
        assert (_reference(q, keys, values, cache_valid, window - 1) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_the_reference_under_bf16_autocast(kernel, device):
    T, M, window = 70, 7, 8
    # bf16 inputs: what the layers feed the kernel under autocast
    q, keys, values, cache_valid = (t.to(device) for t in _kernel_inputs(T, M, torch.bfloat16))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = window_attention(kernel, q, keys, values, kernel_blocks(kernel, T, M, window, cache_valid))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _reference(q, keys, values, cache_valid, window)
    # bf16 keeps 8 significant bits. The kernels round the probabilities (banded: relative 2^-9 each, an error of at
    # most 2^-9 * max|v| ~ 0.009 for N(0, 1) values, max |v| < 4.5) and the output (half an ulp: 2^-8 for |y| < 2):
    # at most ~0.013 in all; 2e-2 covers it, and a mask one key off still moves the outputs by more (checked)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)
    assert (_reference(q, keys, values, cache_valid, window - 1) - ref).abs().max() > 0.1
