"""AFT decoder (longctx/decoders/aft.py) and kernels (longctx/layers/aft.py).

The references are naive O(T^2) loops written straight from eq. (2) of Zhai et al. 2021 in its causal, relative
reading: ``y_t = Σ_{t' <= t} exp(K_{t'} + b(t - t')) V_{t'} / Σ_{t' <= t} exp(K_{t'} + b(t - t'))`` with ``b`` the
learned bias below the window and, beyond it, 0 (far="uniform") or ``-λ_c (δ - s + 1)`` (far="decay"), computed in
float64 without any stabilisation (float64 holds exp(±700)). The shared contract checks (test_contract.py) run for
``local`` with its initial biases and decays, and for every variant and far rule with random ones (the contract cases
of conftest.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_contract as contract  # the shared contract checks (same folder; pytest puts it on sys.path)
import torch
from conftest import AFT_FARS, AFT_VARIANTS, randomise_aft_biases
from torch import Tensor

from longctx.config import load_config
from longctx.decoders.aft import AFTDecoder, AFTMixer, AFTState
from longctx.errors import ConfigError
from longctx.layers import aft as aft_layers
from longctx.layers.aft import (
    Memory,
    _BlockToeplitz,
    aft_parallel,
    aft_recurrent,
    toeplitz_weights,
)
from longctx.model import LongContextLM

VARIANTS = AFT_VARIANTS
FARS = AFT_FARS
F64 = torch.float64


# --------------------------------------------------------------------------------------------------------------------
# references and drivers


def naive_kernel(k: Tensor, v: Tensor, log_w: Tensor | None, decay: Tensor | None = None) -> Tensor:
    """Eq. (2), causal, relative bias: k (B, T, H, Dk), v (B, T, H, Dh), log_w (H, s) -> y (B, T, H, Dh), float64.

    ``decay`` (H, Dk): λ of the far bias ``-λ (δ - s + 1)`` for ``δ >= s`` (numerator channel d uses key channel d,
    or the head's key when Dk = 1); None: the far bias is 0."""
    k, v = k.to(F64), v.to(F64)
    B, T, H, Dh = v.shape
    k = k.expand(B, T, H, Dh)  # conv: one key per head, shared by the head's channels
    s = 1 if log_w is None else log_w.shape[1]
    lam = None if decay is None else decay.to(F64).expand(H, Dh)  # (H, Dh)
    y = torch.empty_like(v)
    for t in range(T):
        num, den = torch.zeros(B, H, Dh, dtype=F64), torch.zeros(B, H, Dh, dtype=F64)
        for tp in range(t + 1):
            delta = t - tp
            if delta < s:
                b = log_w[:, delta].to(F64)[:, None] if log_w is not None else 0.0  # (H, 1)
            else:
                b = 0.0 if lam is None else -lam * (delta - s + 1)  # (H, Dh)
            e = torch.exp(k[:, tp] + b)  # (B, H, Dh)
            num += e * v[:, tp]
            den += e
        y[:, t] = num / den
    return y


def run_kernel(
    k: Tensor,
    v: Tensor,
    log_w: Tensor | None,
    sizes: list[int],
    parallel_only: bool = False,
    decay: Tensor | None = None,
) -> tuple[Tensor, Memory]:
    """Stream k (B, T, H, Dk), v (B, T, H, Dh) through the kernels in chunks of ``sizes``, threading the memory as
    the decoder does (single tokens take the recurrent form unless ``parallel_only``). Returns y (B, T, H, Dh)."""
    B, T, H, Dk = k.shape
    Dh = v.shape[-1]
    M = 0 if log_w is None else log_w.shape[1] - 1
    k, v = k.permute(2, 1, 0, 3), v.permute(2, 1, 0, 3)  # (H, T, B, D*): the kernels' time-major layout
    memory = Memory(window=v.new_zeros(H, M, B, Dh + Dk), far=v.new_zeros(H, B, Dh + Dk), ref=k.new_zeros(H, B, Dk))
    outs, start = [], 0
    for size in sizes:
        kernel = aft_recurrent if size == 1 and not parallel_only else aft_parallel
        seg = slice(start, start + size)
        y, memory = kernel(memory, k[:, seg], v[:, seg], torch.full((B,), start > 0), log_w, decay)
        outs.append(y.permute(2, 1, 0, 3))
        start += size
    assert start == T
    return torch.cat(outs, dim=1), memory


def naive_decoder(decoder: AFTDecoder, x: Tensor) -> Tensor:
    """The decoder's blocks with the mixer computed by :func:`naive_kernel`: x (B, T, D) -> hidden (B, T, D)."""
    for block in decoder.blocks:
        mix: AFTMixer = block.mix
        h = block.norm_mix(x)
        B, T, D = h.shape
        q, k, v = mix.qkv(h).split([D, mix.heads * mix.key_dim, D], dim=-1)
        decay = None if mix.log_decay is None else torch.exp(mix.log_decay)
        y = naive_kernel(k.view(B, T, mix.heads, -1), v.view(B, T, mix.heads, -1), mix.log_bias(), decay)
        x = x + mix.out_proj(torch.sigmoid(q) * y.reshape(B, T, D).to(x.dtype))
        x = x + block.mlp(block.norm_mlp(x))
    return x


def run_decoder(decoder: AFTDecoder, x: Tensor, sizes: list[int], state: AFTState | None = None) -> Tensor:
    state = state or decoder.init_state(x.shape[0], x.device, x.dtype)
    outs, start = [], 0
    for size in sizes:
        out = decoder(x[:, start : start + size], state)
        outs.append(out.hidden)
        state, start = out.state, start + size
    return torch.cat(outs, dim=1)


def aft_model(make_tiny_model, variant: str, far: str = "decay", **aft: Any) -> LongContextLM:
    return randomise_aft_biases(make_tiny_model("aft", aft={"variant": variant, "far": far, **aft}))


# --------------------------------------------------------------------------------------------------------------------
# each variant against the naive loop


def random_sizes(T: int, g: torch.Generator) -> list[int]:
    """A random chunking of T tokens (single tokens take the recurrent form, longer chunks the parallel one)."""
    sizes, left = [], T
    while left:
        sizes.append(min(left, int(torch.randint(1, 40, (1,), generator=g))))
        left -= sizes[-1]
    return sizes


@pytest.mark.parametrize("far", FARS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_matches_naive_loop(make_tiny_model, variant: str, far: str) -> None:
    """Every variant and far rule, fp64, one call / fixed and random chunks / token by token, the state carried from
    call to call, against eq. (2) computed by a double loop (far="decay": the bias -λ (δ - s + 1) beyond the window,
    λ per key channel). T = 3 s + 70 > BAND_BLOCK: several blocks of the parallel form and, with λ from ~0.05 to ~3
    per token, far terms decayed by up to e^-200. Tolerance 1e-10: both sides run in float64, so the only
    difference is the order of the additions and the rescaling by exp(ref - key) (relative ~1e-16 per operation
    over < 10^3 terms of outputs of order 1, i.e. < 1e-12), far below any error of the formula (>= 1e-3)."""
    model = aft_model(make_tiny_model, variant, far).double()
    decoder: AFTDecoder = model.decoder
    T = 3 * (decoder.cache_len + 1) + 70
    x = torch.randn(2, T, model.cfg.d_model, dtype=F64)
    g = torch.Generator().manual_seed(len(variant))
    with torch.no_grad():
        expected = naive_decoder(decoder, x)
        for sizes in ([T], [1] * T, [2, 5, 1, T - 8], random_sizes(T, g), random_sizes(T, g)):
            torch.testing.assert_close(run_decoder(decoder, x, sizes), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("far", FARS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_decoder_close_to_naive_loop(make_tiny_model, variant: str, far: str) -> None:
    """float32 against the float64 loop: 1e-5 is ~100 float32 roundings (6e-8) of outputs of order 1."""
    model = aft_model(make_tiny_model, variant, far)
    x = torch.randn(2, 20, model.cfg.d_model)
    with torch.no_grad():
        expected = naive_decoder(model.double().decoder, x.double())
        got = run_decoder(model.float().decoder, x, [20])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("far", FARS)
def test_bias_beyond_the_window_is_finite_not_minus_infinity(make_tiny_model, far: str) -> None:
    """AFT-local keeps global connectivity: with one layer, a token far beyond the window still changes the output
    (uniform: bias 0; decay: a finite -λ (δ - s + 1))."""
    model = aft_model(make_tiny_model, "local", far, window=3)
    model.decoder.blocks = model.decoder.blocks[:1]
    x = torch.randn(1, 12, model.cfg.d_model)
    x2 = x.clone()
    x2[:, 0] = torch.randn(model.cfg.d_model)
    with torch.no_grad():
        a, b = (run_decoder(model.decoder, inp, [12]) for inp in (x, x2))
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4  # distance 11 > window 3


# --------------------------------------------------------------------------------------------------------------------
# relations between the variants


@pytest.mark.parametrize("far", FARS)
def test_conv_with_zero_gain_and_shift_equals_simple(make_tiny_model, far: str) -> None:
    """γ = β = 0 (the initialisation) makes AFT-conv's bias 0: it is AFT-simple with the head's key on every channel
    (decay: and the head's λ on every channel; the far bias starts at distance window on conv, 1 on simple, so the
    conv filter must be 1 tap here)."""
    window = 5 if far == "uniform" else 1
    conv = make_tiny_model("aft", aft={"variant": "conv", "heads": 4, "window": window, "far": far})
    simple = make_tiny_model("aft", aft={"variant": "simple", "far": far})
    D, H = conv.cfg.d_model, 4
    with torch.no_grad():
        for bc, bs in zip(conv.decoder.blocks, simple.decoder.blocks, strict=True):
            bc.mix.bias.normal_()  # any raw filter: γ = 0 removes it
            assert torch.equal(bc.mix.log_bias(), torch.zeros(H, window))
            if far == "decay":
                bc.mix.log_decay.uniform_(-3.0, 1.0)
                bs.mix.log_decay.copy_(bc.mix.log_decay.repeat_interleave(D // H, 1).view(1, D))
            wq, wk, wv = bc.mix.qkv.weight.split([D, H, D])
            bq, bk, bv = bc.mix.qkv.bias.split([D, H, D])
            bs.mix.qkv.weight.copy_(torch.cat([wq, wk.repeat_interleave(D // H, 0), wv]))
            bs.mix.qkv.bias.copy_(torch.cat([bq, bk.repeat_interleave(D // H, 0), bv]))
            bs.mix.out_proj.load_state_dict(bc.mix.out_proj.state_dict())
            for name in ("norm_mix", "norm_mlp", "mlp"):
                getattr(bs, name).load_state_dict(getattr(bc, name).state_dict())
        simple.load_state_dict({k: v for k, v in conv.state_dict().items() if "decoder" not in k}, strict=False)
        tokens = torch.randint(0, conv.cfg.vocab_size, (2, 17))
        a = contract._run(conv, tokens, conv.init_state(2), [3, 1, 13])[0]
        b = contract._run(simple, tokens, simple.init_state(2), [17])[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_local_window_one_and_simple(make_tiny_model) -> None:
    """Window 1 learns only w(0), the bias of the query itself. With w(0) = 0 it is AFT-simple everywhere; with
    w(0) != 0 the two still agree on the first token of a stream (a single term: the bias cancels) and differ after."""
    local = make_tiny_model("aft", aft={"variant": "local", "window": 1, "heads": 1})
    simple = make_tiny_model("aft", aft={"variant": "simple"})
    simple.load_state_dict(local.state_dict(), strict=False)  # same weights; simple has no bias parameter
    tokens = torch.randint(0, local.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        same = simple(tokens, simple.init_state(2)).logits
        torch.testing.assert_close(local(tokens, local.init_state(2)).logits, same, atol=1e-6, rtol=0)
        for block in local.decoder.blocks:
            block.mix.bias.fill_(2.0)
        other = local(tokens, local.init_state(2)).logits
    torch.testing.assert_close(other[:, 0], same[:, 0], atol=1e-6, rtol=0)
    assert (other[:, 1:] - same[:, 1:]).abs().amax() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# kernels: two forms, one result; extreme keys; long streams


def random_decay(heads: int, key_dim: int, g: torch.Generator, low: float = -5.0, high: float = 1.0) -> Tensor:
    """λ = exp(θ) (H, Dk), θ uniform in [low, high]: time constants from e^-high to e^-low tokens."""
    return torch.exp(torch.empty(heads, key_dim).uniform_(low, high, generator=g))


@pytest.mark.parametrize("far", FARS)
@pytest.mark.parametrize("window,heads,key_dim", [(1, 1, 3), (4, 2, 3), (5, 2, 1), (9, 1, 3)])
def test_kernel_forms_match_naive(window: int, heads: int, key_dim: int, far: str) -> None:
    """Parallel (one call, chunks, T > block so the blocked band runs) and recurrent forms against the loop.
    2e-6: float32 (6e-8 per rounding) over sums of up to 75 terms of outputs of order 1."""
    g = torch.Generator().manual_seed(window)
    T, Dh = 75, 3
    k = 3 * torch.randn(2, T, heads, key_dim, generator=g)
    v = torch.randn(2, T, heads, Dh, generator=g)
    log_w = torch.randn(heads, window, generator=g)
    decay = random_decay(heads, key_dim, g) if far == "decay" else None
    expected = naive_kernel(k, v, log_w, decay)
    for sizes, parallel_only in (
        ([T], False),
        ([1] * T, False),
        ([1] * 5 + [40, 30], True),
        ([7, 1, 33, 34], False),
        (random_sizes(T, g), False),
        (random_sizes(T, g), True),
    ):
        y, _ = run_kernel(k, v, log_w, sizes, parallel_only, decay)
        torch.testing.assert_close(y.double(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("T", [1, 5, 32, 33, 70])
def test_decayed_far_is_the_direct_sum(T: int) -> None:
    """decayed_far (blocks, carried vector) against F_p = exp(-λ p) far0 + Σ_{j<p} exp(-λ (p - j)) z_j, fp64,
    with one λ per key channel (Dk = 3, numerator and denominator channels) and per head (Dk = 1)."""
    g = torch.Generator().manual_seed(T)
    for Dk, C in ((3, 6), (1, 5)):
        z = torch.randn(2, T, 3, C, generator=g, dtype=F64)
        far0 = torch.randn(2, 3, C, generator=g, dtype=F64)
        lam = random_decay(2, Dk, g).double()
        lam_c = aft_layers.widen(lam, C - Dk)[:, None]  # (H, 1, C)
        expected = torch.stack(
            [
                torch.exp(-lam_c * p) * far0
                + sum((torch.exp(-lam_c * (p - j)) * z[:, j] for j in range(p)), torch.zeros_like(far0))
                for p in range(T + 1)
            ],
            dim=1,
        )
        torch.testing.assert_close(aft_layers.decayed_far(z, far0, lam), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "M,T,block", [(0, 70, 32), (3, 100, 32), (31, 70, 32), (40, 33, 32), (5, 1, 32), (0, 9, 4), (3, 11, 4), (6, 10, 4)]
)
def test_block_toeplitz_equals_dense_product(monkeypatch, M: int, T: int, block: int) -> None:
    """Blocks of queries (a partial last one included) give the dense product; gradients checked numerically."""
    monkeypatch.setattr(aft_layers, "BAND_BLOCK", block)
    g = torch.Generator().manual_seed(M + T)
    H, N = 2, 5 if block > 4 else 2
    z = torch.rand(H, M + T, N, generator=g, dtype=F64, requires_grad=True)
    window_w = torch.rand(H, M + 1, generator=g, dtype=F64, requires_grad=True)
    far_w, far0 = torch.rand(H, 1, generator=g, dtype=F64), torch.rand(H, N, generator=g, dtype=F64)
    far0.requires_grad_()

    def block_form(z: Tensor, window_w: Tensor, far0: Tensor) -> Tensor:
        weights = toeplitz_weights(window_w, far_w, min(aft_layers.BAND_BLOCK, T))
        return _BlockToeplitz.apply(z, weights, far0, far_w, T)

    dense = toeplitz_weights(window_w, far_w, T)  # (H, T, M + T): the same rule over the whole segment at once
    expected = torch.matmul(dense, z) + (far_w * far0)[:, None]
    torch.testing.assert_close(block_form(z, window_w, far0), expected)
    if block == 4:
        assert torch.autograd.gradcheck(block_form, (z, window_w, far0))


@pytest.mark.parametrize("far", FARS)
@pytest.mark.parametrize("magnitude", [80.0, 200.0])
def test_extreme_keys_stay_exact(magnitude: float, far: str) -> None:
    """Keys of ±80 and ±200 (spread up to 600 within a segment) with biases of ±20: no overflow, no 0/0 on the first
    token, and exact in every form (several levels, each over a prefix of the segment). Decay: λ <= e^-3 per token,
    so the largest key loses at most ~2 within the 40 tokens. The terms stay relative to the running maximum, so
    with keys this spread a stronger decay would let every term of a late query underflow (the exact range of the
    decayed form: each query's largest term within ~50 of the running maximum; the kernel test above checks decays
    up to e per token with keys of ±10)."""
    g = torch.Generator().manual_seed(int(magnitude))
    T = 40
    signs = torch.where(torch.rand(1, T, 2, 3, generator=g) < 0.5, -1.0, 1.0)
    k = magnitude * signs * torch.rand(1, T, 2, 3, generator=g).add(0.5)  # |k| in [m/2, 3m/2], random signs
    k[:, 0] = -magnitude  # the first token far below the rest of its segment
    k[:, 1] = magnitude
    v = torch.randn(1, T, 2, 3, generator=g)
    log_w = 40 * torch.rand(2, 4, generator=g) - 20  # biases within ±20 (a spread of 40: inside the exact range)
    log_w[:, 0], log_w[:, 1] = -20.0, 20.0
    decay = random_decay(2, 3, g, -5.0, -3.0) if far == "decay" else None
    expected = naive_kernel(k, v, log_w, decay)
    for sizes in ([T], [1] * T, [3, 17, 20]):
        y, memory = run_kernel(k, v, log_w, sizes, decay=decay)
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in memory)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("far", FARS)
def test_first_token_of_a_stream_with_huge_key(far: str) -> None:
    decay = torch.tensor([[0.5, 2.0]]) if far == "decay" else None
    factor = torch.ones(1, 1, 4) if decay is None else torch.exp(-aft_layers.widen(decay, 2))[:, None]
    for key in (-1e4, 1e4, 0.0):
        k, v = torch.full((1, 1, 1, 2), key), torch.randn(1, 1, 1, 2)  # (H, T, B, D)
        for kernel in (aft_parallel, aft_recurrent):
            memory = Memory(window=torch.zeros(1, 0, 1, 4), far=torch.zeros(1, 1, 4), ref=torch.zeros(1, 1, 2))
            y, after = kernel(memory, k, v, torch.zeros(1, dtype=torch.bool), None, decay)
            torch.testing.assert_close(y, v)  # a single term: y = v
            assert torch.equal(after.ref, k[:, 0])
            # exp(k - ref) = 1, decayed once on its way to the next token
            torch.testing.assert_close(after.far, torch.cat([v[:, 0], torch.ones(1, 1, 2)], dim=-1) * factor)


@pytest.mark.parametrize("far", FARS)
def test_gradients_match_naive(far: str) -> None:
    """Backward through the stabilised parallel form (with several levels) equals backward through the loop, the
    gradient of the decays λ included."""
    g = torch.Generator().manual_seed(3)
    T = 40
    k = (40 * torch.randn(1, T, 2, 2, generator=g, dtype=F64)).requires_grad_()
    v = torch.randn(1, T, 2, 2, generator=g, dtype=F64, requires_grad=True)
    log_w = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    weights = torch.randn(1, T, 2, 2, generator=g, dtype=F64)
    inputs = [k, v, log_w]
    decay = None
    if far == "decay":
        k.data /= 10  # keys of ±4: far terms that matter, so that the gradient of λ is not ~0
        decay = random_decay(2, 2, g, -3.0, 0.0).double().requires_grad_()
        inputs.append(decay)
    for sizes in ([T], [5, 1, 6, 28], [1] * 7 + [33]):
        y, _ = run_kernel(k, v, log_w, sizes, decay=decay)
        got = torch.autograd.grad((y * weights).sum(), inputs)
        expected = torch.autograd.grad((naive_kernel(k, v, log_w, decay) * weights).sum(), inputs)
        for a, b in zip(got, expected, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("far", FARS)
def test_a_million_tokens(far: str) -> None:
    """2^20 tokens through the kernels in big segments, keys drifting up to ~100: finite, and the last query (whose
    far sums hold ~10^6 tokens) matches a float64 sum over the whole stream. Decay: time constants of 1e5 and 3e3
    tokens (the far sums then hold ~10^5 and ~3e3 tokens' worth of weight, each decayed ~2^15 times block to block)."""
    g = torch.Generator().manual_seed(0)
    N, seg, window = 2**20, 2**16, 4
    k = torch.linspace(0, 100, N)[None, :, None, None] + torch.randn(1, N, 1, 2, generator=g)  # (1, N, 1, 2)
    v = torch.randn(1, N, 1, 2, generator=g)
    log_w = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    decay = torch.tensor([[1e-5, 3e-4]]) if far == "decay" else None
    y, memory = run_kernel(k, v, log_w, [seg] * (N // seg - 1) + [seg - 1, 1], decay=decay)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in memory)
    bias = torch.zeros(N, 2, dtype=F64)
    if decay is not None:  # δ - s + 1 for the far tokens (δ = N - 1 - t' >= s)
        far_steps = torch.arange(N - window, 0, -1, dtype=F64)
        bias[: N - window] = -decay.double() * far_steps[:, None]
    bias[-window:] = log_w[0].flip(0).double()[:, None]
    e = torch.exp(k[0, :, 0].double() + bias - 100)  # (N, 2)
    expected = (e * v[0, :, 0].double()).sum(0) / e.sum(0)
    torch.testing.assert_close(y[0, -1, 0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("far", FARS)
def test_a_long_stream_through_a_model(make_tiny_model, far: str) -> None:
    """A one-layer model reads 2^18 tokens in segments of 2^16: the state stays finite and does not grow (the kernel
    test above covers 2^20 tokens)."""
    model = aft_model(make_tiny_model, "local", far, window=4)
    model.decoder.blocks = model.decoder.blocks[:1]
    model.cfg.n_layer = 1
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 2**16))
    state = model.init_state(1)
    size = state.nbytes()
    with torch.no_grad():
        for _ in range(4):
            out = model(tokens, state)
            state = out.state
    assert int(state.position) == 2**18 and state.nbytes() == size
    assert torch.isfinite(out.logits).all() and all(torch.isfinite(t).all() for t in state.tensors().values())


# --------------------------------------------------------------------------------------------------------------------
# precision, state, config


def test_bf16_autocast_keeps_float32_accumulators(make_tiny_model) -> None:
    model = aft_model(make_tiny_model, "conv", heads=4)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        ref = model(tokens, model.init_state(2)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, model.init_state(2))
    assert all(t.dtype in (torch.float32, torch.int64) for t in out.state.tensors().values())
    assert torch.isfinite(out.logits).all()
    assert (out.logits.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_layout(make_tiny_model, variant: str) -> None:
    model = make_tiny_model("aft", aft={"variant": variant, "window": 4, "heads": 2, "max_distance": 6})
    state = model.init_state(3)
    L, H = model.cfg.n_layer, 1 if variant == "simple" else 2
    M = {"simple": 0, "full": 5}.get(variant, 3)
    Dh, Dk = model.cfg.d_model // H, 1 if variant == "conv" else model.cfg.d_model // H
    assert state.window.shape == (3, L, H, M, Dh + Dk) and state.far.shape == (3, L, H, Dh + Dk)
    assert state.ref.shape == (3, L, H, Dk) and state.position.shape == (3,)
    with torch.no_grad():
        later = model(torch.randint(0, 61, (3, 50)), state).state
    assert later.nbytes() == state.nbytes()


@pytest.mark.parametrize(
    "preset,variant",
    [
        ("aft-simple-small", "simple"),
        ("aft-local-small", "local"),
        ("aft-conv-small", "conv"),
        ("aft-full-small", "full"),
    ],
)
def test_presets_build(preset: str, variant: str) -> None:
    config = load_config(preset)
    assert config.model.decoder == "aft" and config.model.aft.variant == variant and config.model.aft.far == "decay"
    assert (config.model.n_layer, config.model.d_model, config.model.d_ff) == (6, 256, 1024)
    assert config.train.seq_len == 256 and config.train.batch_size == 8
    assert AFTDecoder(config.model).init_state(1, "cpu", torch.float32).nbytes() < 8 * 2**20


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.aft.heads"):
        load_config("aft-conv-small", {"model.aft.heads": "3"})
    with pytest.raises(ConfigError, match="model.aft.variant"):
        load_config("aft-local-small", {"model.aft.variant": "global"})
    with pytest.raises(ConfigError, match="model.aft.window"):
        load_config("aft-local-small", {"model.aft.window": "0"})
    with pytest.raises(ConfigError, match="model.aft.far"):
        load_config("aft-local-small", {"model.aft.far": "exponential"})
    assert load_config("aft-local-small", {"model.aft.far": "uniform"}).model.aft.far == "uniform"


@pytest.mark.parametrize("far", FARS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_position_parameters_and_describe(make_tiny_model, variant: str, far: str) -> None:
    """Every bias row, γ, β and θ is a position parameter (no weight decay, larger learning rate); describe() reports
    the window biases and the time constants as JSON-friendly numbers."""
    model = make_tiny_model("aft", aft={"variant": variant, "far": far, "heads": 2, "window": 4})
    decoder: AFTDecoder = model.decoder
    expected = [
        p
        for name, p in decoder.named_parameters()
        if name.rsplit(".", 1)[-1] in ("bias", "bias_gain", "bias_shift", "log_decay")
        and ".mix." in name
        and "qkv" not in name
        and "out_proj" not in name
    ]
    assert {id(p) for p in decoder.position_parameters()} == {id(p) for p in expected}
    per_layer = {"simple": 0, "local": 1, "conv": 3, "full": 1}[variant] + (far == "decay")
    assert len(decoder.position_parameters()) == per_layer * model.cfg.n_layer
    info = decoder.describe()
    json.dumps(info)
    assert info["aft_far"] == far and len(info["aft_layers"]) == model.cfg.n_layer
    layer = info["aft_layers"][0]
    assert ("bias_d0" in layer) == (variant != "simple")
    if variant in ("local", "full"):  # decay: the window starts as the ramp -0.3 min(δ, 31); uniform: at 0 (the paper)
        assert layer["bias_d0"] == 0.0
        last = -0.3 * min(decoder.cache_len, 31) if far == "decay" else 0.0
        assert layer["bias_last"] == pytest.approx(last, abs=1e-4)
    if far == "decay":  # initial time constants: log-spaced from 1 token to several thousand
        assert layer["tau_min"] == pytest.approx(1.0) and layer["tau_max"] == pytest.approx(4096.0)
        assert layer["tau_min"] <= layer["tau_median"] <= layer["tau_max"]
    else:
        assert "tau_min" not in layer
