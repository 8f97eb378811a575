"""The band kernel (sliding-window attention with a hand-written backward) and the ``sdpa`` path of
:class:`~longctx.layers.attention.WindowAttention` against dense softmax attention with the full window mask, for
outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.layers.attention import (
    LONG_WINDOW,
    WindowPattern,
    _block_floor,
    _key_start,
    band_attention,
    resolve_kernel,
    window_attention,
    window_mask,
)


def dense(q, keys, values, mask):
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, M + T)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values


def _pattern(T: int, window: int, real: list[int]) -> WindowPattern:
    """Rows with ``real`` cache slots each (the newest ones)."""
    return WindowPattern.of(T, window, torch.tensor(real))


@pytest.mark.parametrize("T, window, block", [(13, 8, 4), (20, 1, 8), (6, 10, 64), (1, 10, 4), (70, 8, 16)])
def test_band_kernel_equals_dense_with_gradients(T, window, block):
    torch.manual_seed(T + window)
    B, H, Dh, M = 2, 2, 8, window - 1
    q = torch.randn(B, H, T, Dh, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, H, M + T, Dh, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, H, M + T, Dh, dtype=torch.float64, requires_grad=True)
    pattern = _pattern(T, window, [min(3, M), M])  # row 0: 3 real cache slots; row 1: all
    out = band_attention(q, keys, values, None, block, key_mask=pattern.key_mask())
    ref = dense(q, keys, values, pattern.allowed())
    # float64 throughout: both sides agree to rounding (~1e-15); 1e-10 leaves room and still catches any real error
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_the_pattern_is_the_window_mask():
    pattern = _pattern(5, 4, [1, 3])
    expected = window_mask(5, 3, 4, torch.tensor([[False, False, True], [True, True, True]]))
    assert torch.equal(pattern.allowed(), expected)
    assert pattern.key_mask().tolist() == [[True, True, False] + [False] * 5, [False] * 8]
    assert _pattern(5, 4, [3, 3]).key_mask() is None  # full caches: nothing to hide


def test_grad_start_skips_only_the_cache_rows():
    torch.manual_seed(0)
    T, window = 10, 7
    M = window - 1
    q = torch.randn(1, 2, T, 8, requires_grad=True)
    keys = torch.randn(1, 2, M + T, 8, requires_grad=True)
    values = torch.randn(1, 2, M + T, 8, requires_grad=True)
    pattern = _pattern(T, window, [M])
    out = band_attention(q, keys, values, None, 4, grad_start=M, key_mask=pattern.key_mask())
    ref = dense(q, keys, values, pattern.allowed())
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad)
    # float32: 1e-5 is a few hundred ulps of the O(1) values involved
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g[:, :, M:], w[:, :, M:], atol=1e-5, rtol=0)
        assert (g[:, :, :M] == 0).all()


def test_bf16_stays_close_to_fp32():
    torch.manual_seed(1)
    T, window = 16, 9
    q, keys, values = (torch.randn(1, 2, n, 16) for n in (T, window - 1 + T, window - 1 + T))
    ref = band_attention(q, keys, values, None, 8)
    low = band_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), None, 8)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: outputs (weighted means of N(0,1) values) agree to a few 1e-2
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# every kernel of model.attention_kernel against the same naive reference (dense above, in float64)


def _kernel_inputs(T: int, window: int, dtype: torch.dtype, device: str) -> tuple:
    """q (2, 2, T, 16), keys/values (2, 2, W - 1 + T, 16) ~ N(0, 1) in ``dtype``; the pattern: 3 real cache slots in
    row 0, all in row 1."""
    M = window - 1
    g = torch.Generator().manual_seed(T * 100 + M)
    q, keys, values = (torch.randn(2, 2, n, 16, generator=g).to(dtype).to(device) for n in (T, M + T, M + T))
    return q, keys, values, WindowPattern.of(T, window, torch.tensor([min(3, M), M], device=device))


def _reference(q, keys, values, pattern, window=None):
    """The naive masked softmax attention in float64 on the CPU on the very inputs the kernel got (bf16 inputs are
    exact in float64), so the tolerances below only cover the kernel's own rounding. ``window``: a shorter window
    over the same keys (the tests' check that a wrong mask is caught)."""
    T, M = q.shape[2], pattern.window - 1
    allowed = window_mask(T, M, window or pattern.window, pattern.cache_valid.cpu())
    q64, k64, v64 = (t.cpu().double() for t in (q, keys, values))  # on the CPU, whatever the kernel's device
    return dense(q64, k64, v64, allowed).to(q.device)


KERNELS = ["banded", "sdpa"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: the path `auto` takes on a GPU


def test_auto_is_banded_on_the_cpu_and_sdpa_elsewhere():
    assert resolve_kernel("auto", torch.device("cpu")) == "banded"
    assert resolve_kernel("auto", torch.device("cpu"), LONG_WINDOW - 1) == "banded"
    assert resolve_kernel("auto", torch.device("cpu"), LONG_WINDOW) == "sdpa"
    assert resolve_kernel("banded", torch.device("cpu"), LONG_WINDOW) == "banded"
    assert resolve_kernel("auto", torch.device("cuda")) == "sdpa"
    assert resolve_kernel("sdpa", torch.device("cpu")) == "sdpa"
    assert resolve_kernel("banded", torch.device("cuda")) == "banded"
    with pytest.raises(ValueError, match="flash"):
        resolve_kernel("flash", torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T, window", [(70, 8), (150, 1), (6, 10), (1, 10), (150, 5)])
def test_kernel_equals_the_reference_in_fp32_with_gradients(kernel, T, window, device):
    q, keys, values, pattern = _kernel_inputs(T, window, torch.float32, device)
    q, keys, values = (t.requires_grad_() for t in (q, keys, values))
    out = window_attention(kernel, q, keys, values, pattern)
    ref = _reference(q, keys, values, pattern)
    # float32 against float64: ~1e-7 relative rounding on O(1) outputs and gradients; 1e-5 is 100x that and far
    # below the effect of a mask one key off (checked below: > 1e-2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
    got = torch.autograd.grad(out, (q, keys, values), grad)
    want = torch.autograd.grad(ref, (q, keys, values), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)  # both float32 (the reference casts back)
    if T > 1 and window > 1:  # the check can fail: a window one key shorter moves the outputs beyond the tolerance
        assert (_reference(q, keys, values, pattern, window - 1) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_the_reference_under_bf16_autocast(kernel, device):
    T, window = 70, 8
    # bf16 inputs: what the layers feed the kernel under autocast
    q, keys, values, pattern = _kernel_inputs(T, window, torch.bfloat16, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = window_attention(kernel, q, keys, values, pattern)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _reference(q, keys, values, pattern)
    # bf16 keeps 8 significant bits. The kernels round the probabilities (banded: relative 2^-9 each, an error of at
    # most 2^-9 * max|v| ~ 0.009 for N(0, 1) values, max |v| < 4.5) and the output (half an ulp: 2^-8 for |y| < 2):
    # at most ~0.013 in all; 2e-2 covers it, and a mask one key off still moves the outputs by more (checked)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)
    assert (_reference(q, keys, values, pattern, window - 1) - ref).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_without_autograd_gives_the_kernels_bits(dtype):
    """A single query with autograd off (one token of decoding) skips the autograd function and the block loop; it must
    run the same products in the same order, so the output is bitwise the kernel's, with a bias, a mask and empty
    cache slots."""
    torch.manual_seed(0)
    B, H, W, Dh = 2, 3, 12, 8
    q = torch.randn(B, H, 1, Dh, dtype=dtype)
    keys, values = torch.randn(B, H, W, Dh, dtype=dtype), torch.randn(B, H, W, Dh, dtype=dtype)
    bias = torch.randn(B, H, 1, W)
    mask = torch.zeros(B, 1, 1, W).masked_fill_(torch.arange(W) < 3, float("-inf"))
    key_mask = torch.zeros(B, W, dtype=torch.bool)
    key_mask[0, :5] = True  # row 0: five empty cache slots
    with torch.no_grad():
        fast = band_attention(q, keys, values, bias, 4, mask=mask, bias_scale=0.5, key_mask=key_mask)
    with torch.enable_grad():
        kernel = band_attention(q, keys, values, bias, 4, mask=mask, bias_scale=0.5, key_mask=key_mask)
    assert fast.dtype == dtype and torch.equal(fast, kernel.detach())


def _floored_inputs(B: int, H: int, T: int, W: int, Dh: int, seed: int = 0):
    """Random inputs whose ``mask`` hides, per row and query, the keys older than a random reach, and the per-query
    floors (first key any row may see) that follow from it."""
    g = torch.Generator().manual_seed(seed)
    q, keys, values = (torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64) for n in (T, W - 1 + T, W - 1 + T))
    bias = torch.randn(B, H, T, W, generator=g, dtype=torch.float64)
    reach = torch.randint(0, W // 2, (B, T), generator=g)  # query t sees the keys at distances 0 .. reach
    distances = torch.arange(W - 1, -1, -1)
    mask = torch.zeros(B, 1, T, W, dtype=torch.float64).masked_fill_(distances > reach[:, None, :, None], -math.inf)
    floors = (torch.arange(T) + W - 1 - reach).amin(0).tolist()
    return q, keys, values, bias, mask, floors


@pytest.mark.parametrize("grad_start", [0, 39])
@pytest.mark.parametrize("block", [1, 3, 4, 30])
def test_floors_leave_out_only_keys_the_mask_hides(block, grad_start):
    """With ``floors`` a block scores only the keys from ``min_r(floors[q0 + r] - r)`` on: outputs and the gradients of
    q, keys, values and bias equal those of the full kernel (float64: the left-out scores are exact zeros of the
    softmax, so only summation order differs), also when the cache's keys get no gradient (``grad_start = W - 1``, as
    in training), and floors that claim a visible key is hidden change the result (the test can fail)."""
    B, H, T, W, Dh = 2, 2, 30, 40, 4
    q, keys, values, bias, mask, floors = _floored_inputs(B, H, T, W, Dh)
    starts = [_key_start(q0, min(T, q0 + block), W, _block_floor(floors, q0, q0 + block)) for q0 in range(0, T, block)]
    assert all(k0 > q0 for k0, q0 in zip(starts, range(0, T, block)))  # every block leaves keys out
    weights = torch.randn(B, H, T, Dh, dtype=torch.float64)

    def run(floors):
        inputs = [t.clone().requires_grad_() for t in (q, keys, values, bias)]
        out = band_attention(*inputs, block, grad_start, mask=mask, bias_scale=0.7, floors=floors)
        return out, torch.autograd.grad((out * weights).sum(), inputs)

    full, full_grads = run(None)
    cut, cut_grads = run(floors)
    torch.testing.assert_close(cut, full, atol=1e-12, rtol=0)
    for a, b in zip(cut_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    wrong = [f + 2 for f in floors]  # two visible keys left out of some windows
    assert (run(wrong)[0] - full).abs().max() > 1e-3


def test_one_query_with_a_floor_gives_the_kernels_bits():
    """Decoding with a floor scores the same keys as the kernel does (from the kernel's aligned start): same bits."""
    B, H, W, Dh = 2, 3, 40, 8
    q, keys, values, bias, mask, floors = _floored_inputs(B, H, 1, W, Dh, seed=1)
    q, keys, values, bias, mask = (t.float() for t in (q, keys, values, bias, mask))
    assert floors[0] > 0
    with torch.no_grad():
        fast = band_attention(q, keys, values, bias, 4, mask=mask, bias_scale=0.5, floors=floors)
    with torch.enable_grad():
        kernel = band_attention(q, keys, values, bias, 4, mask=mask, bias_scale=0.5, floors=floors)
        full = band_attention(q, keys, values, bias, 4, mask=mask, bias_scale=0.5)
    assert torch.equal(fast, kernel.detach())
    torch.testing.assert_close(fast, full.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parts", ["bias and mask", "mask", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_autograd_the_fused_path_gives_the_kernels_outputs(parts, dtype, device):
    """Without autograd (evaluation, prompts) several queries go through PyTorch's fused attention with the band's bias
    and mask written into an additive mask: the kernel's outputs, with floors, empty cache slots and blocks that leave
    keys out. float32: 1e-6 (summation order only); bf16: the mask and the bias are rounded to bf16 before they are
    added (relative 2^-9 of a score of a few units) and the probabilities and outputs round as in the kernel's
    bf16 test, 2e-2 in all. A change that the kernel sees (a window one key shorter; without a mask, the bias taken
    away) moves the fused outputs by more (checked)."""
    B, H, T, W, Dh = 2, 3, 30, 40, 8
    inputs = _floored_inputs(B, H, T, W, Dh)
    q, keys, values, bias, mask = (t.float().to(device) for t in inputs[:5])
    key_mask = torch.zeros(B, W - 1 + T, dtype=torch.bool, device=device)
    key_mask[1, :30] = True  # row 1: thirty empty cache slots
    args = dict(mask=mask, bias_scale=0.5, key_mask=key_mask, floors=inputs[5])
    if parts == "mask":
        bias = None
    if parts == "bias":  # no mask: every key of every window is seen, so no floors either
        args |= {"mask": None, "floors": None}

    def fused(**changed):
        low = None if bias is None else bias.to(dtype)
        with torch.no_grad():
            return band_attention(q.to(dtype), keys.to(dtype), values.to(dtype), low, 8, **(args | changed))

    kernel = band_attention(q, keys, values, bias, 8, **args).detach()
    out = fused()
    assert out.dtype == dtype and out.shape == kernel.shape
    torch.testing.assert_close(out.float(), kernel, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=0)
    if parts == "bias":
        moved = fused(bias_scale=0.0)
    else:
        shorter = mask.clone()
        shorter[..., -2] = -math.inf  # every query loses the key just before it
        moved = fused(mask=shorter)
    assert (moved.float() - kernel).abs().max() > 0.1


def test_fused_path_with_a_long_empty_cache():
    """A row whose first several hundred keys are all empty cache slots (a fresh stream in a long window): the fused
    path gives the kernel's outputs, no NaN from a chunk of keys that is masked whole."""
    B, H, T, W, Dh = 2, 2, 8, 1200, 8
    g = torch.Generator().manual_seed(3)
    q, keys, values = (torch.randn(B, H, n, Dh, generator=g) for n in (T, W - 1 + T, W - 1 + T))
    key_mask = torch.zeros(B, W - 1 + T, dtype=torch.bool)
    key_mask[1, : W - 5] = True  # row 1: only the 4 newest cache slots are real
    kernel = band_attention(q, keys, values, None, 4, key_mask=key_mask).detach()
    with torch.no_grad():
        fused = band_attention(q, keys, values, None, 4, key_mask=key_mask)
    assert not fused.isnan().any()
    torch.testing.assert_close(fused, kernel, atol=1e-6, rtol=0)
