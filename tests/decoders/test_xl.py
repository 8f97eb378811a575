"""Tests of the Transformer-XL decoder (``xl``) and its layers: relative attention, adaptive and dynamic spans.

The shared contract tests (test_contract.py) run for ``xl`` with fixed, adaptive and dynamic spans (the contract
cases of conftest.py); here the decoder is compared with a naive reference that evaluates the Transformer-XL score and
the span mask of the papers with explicit loops over queries and keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import test_contract as contract  # the shared contract checks (same folder; pytest puts it on sys.path)
import torch
from conftest import SPAN_MODES, set_span_ratios
from torch import Tensor

from longctx.config import load_config
from longctx.decoders.xl import XLDecoder, XLState
from longctx.errors import ConfigError
from longctx.layers.adaptive_span import AdaptiveSpan, log_span_mask, soft_span_mask
from longctx.layers.attention import _band_view, band_attention
from longctx.layers.relative import position_scores, sinusoid_table
from longctx.model import LongContextLM, build_model

torch.set_num_threads(1)

ATOL = 1e-5  # the same maths through different kernels and accumulation orders, fp32, logits ~0.1-1


# tiny span settings for the contract checks: spans well inside the window, so the span mask and trimming matter
def _tokens(model: LongContextLM, batch: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g)


# --------------------------------------------------------------------------------------------------------------------
# naive reference: the papers' formulas, one query and one key at a time


def _naive_attention(attn: Any, h: Tensor, u: Tensor, v: Tensor, mem_len: int, mode: str) -> Tensor:
    """Transformer-XL attention of every position over (i - mem_len, i] with the span mask, by explicit loops."""
    B, N, D = h.shape
    H, Dh = attn.n_head, attn.head_dim
    q, k, val = attn.qkv(h).view(B, N, 3, H, Dh).unbind(2)  # (B, N, H, Dh) each
    inv_freq = [10000.0 ** (-2 * i / D) for i in range(D // 2)]
    table = torch.tensor(
        [[math.sin(d * f) for f in inv_freq] + [math.cos(d * f) for f in inv_freq] for d in range(mem_len)]
    )  # (mem_len, D): R_d
    r = attn.r_net(table).view(mem_len, H, Dh)  # W_R R_d
    u, v = u.view(H, Dh), v.view(H, Dh)
    out = torch.zeros(B, N, H, Dh)
    for i in range(N):
        for head in range(H):
            keys = range(max(0, i - mem_len + 1), i + 1)
            s = torch.stack(
                [
                    ((q[:, i, head] + u[head]) * k[:, j, head]).sum(-1)
                    + ((q[:, i, head] + v[head]) * r[i - j, head]).sum(-1)
                    for j in keys
                ],
                -1,
            ) / math.sqrt(Dh)
            if mode == "fixed":
                m = torch.ones(B, len(keys))
            else:
                if mode == "adaptive":
                    z = attn.span.ratio[head].expand(B) * mem_len
                else:  # dynamic: z_t = S sigmoid(v^T x_t + b)
                    z = mem_len * torch.sigmoid(h[:, i] @ attn.span.proj.weight[head] + attn.span.proj.bias[head])
                ramp = attn.span.ramp
                m = torch.stack([torch.clamp((ramp + z - (i - j)) / ramp, 0.0, 1.0) for j in keys], -1)
            a = m * torch.exp(s) / (m * torch.exp(s)).sum(-1, keepdim=True)  # (B, n_keys): the paper's a_tr
            out[:, i, head] = (a[..., None] * torch.stack([val[:, j, head] for j in keys], 1)).sum(1)
    return attn.out_proj(out.reshape(B, N, D))


def _naive_decoder(decoder: XLDecoder, x: Tensor) -> Tensor:
    mem_len, mode = decoder.mem_len, decoder.span_mode
    for block in decoder.blocks:
        u = decoder.pos_bias_u if decoder.pos_bias_u is not None else block.mix.pos_bias_u
        v = decoder.pos_bias_v if decoder.pos_bias_v is not None else block.mix.pos_bias_v
        x = x + _naive_attention(block.mix, block.norm_mix(x), u, v, mem_len, mode)
        x = x + block.mlp(block.norm_mlp(x))
    return x


@pytest.mark.parametrize("mode,share_bias", [("fixed", True), ("fixed", False), ("adaptive", True), ("dynamic", False)])
def test_decoder_matches_naive_reference(
    make_tiny_model: Callable[..., LongContextLM], mode: str, share_bias: bool
) -> None:
    mem_len, n = 16, 40
    model = make_tiny_model(
        "xl",
        xl={
            "mem_len": mem_len,
            "span_mode": mode,
            "span_ramp": 3.0,
            "span_init": 0.4,
            "share_bias": share_bias,
            "span_cache_multiple": 4,
        },
    )
    if mode == "adaptive":  # spans 1.6 .. 9.6 tokens: the mask cuts inside the window, and the window is trimmed
        set_span_ratios(model, [[0.1, 0.6], [0.35, 0.2]])
    decoder = model.decoder
    x = torch.randn(2, n, model.cfg.d_model)
    with torch.no_grad():
        expected = _naive_decoder(decoder, x)
        whole = decoder(x, decoder.init_state(2, None, torch.float32)).hidden
        torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0)
        state, outs = decoder.init_state(2, None, torch.float32), []
        for lo, hi in [(0, 1), (1, 20), (20, 21), (21, 33), (33, 40)]:
            out = decoder(x[:, lo:hi], state)
            outs.append(out.hidden)
            state = out.state
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=ATOL, rtol=0)


def test_full_span_and_tiny_ramp_equal_plain_windowed_attention(make_tiny_model) -> None:
    """c = 1 (z = S) and R -> 0: every key in the window has mask 1, so adaptive span = the plain XL window."""
    xl = {"mem_len": 12, "span_ramp": 1e-3}
    adaptive = make_tiny_model("xl", xl={**xl, "span_mode": "adaptive", "span_init": 1.0})
    plain = make_tiny_model("xl", xl={**xl, "span_mode": "fixed"})
    missing, unexpected = plain.load_state_dict(adaptive.state_dict(), strict=False)
    assert not missing and all(name.endswith("span.ratio") for name in unexpected)
    tokens = _tokens(plain, 2, 40)
    with torch.no_grad():
        a, _ = contract._run(adaptive, tokens, adaptive.init_state(2), [7, 1, 32])
        p, _ = contract._run(plain, tokens, plain.init_state(2), [40])
        torch.testing.assert_close(a, p, atol=ATOL, rtol=0)
        x = plain.embed(tokens)
        torch.testing.assert_close(
            plain.decoder(x, plain.init_state(2)).hidden, _naive_decoder(plain.decoder, x), atol=ATOL, rtol=0
        )


# --------------------------------------------------------------------------------------------------------------------
# layers


def test_soft_span_mask_matches_its_formula() -> None:
    spans = torch.tensor([0.0, 3.3, 7.0, 20.0])
    distances = torch.arange(15, -1, -1, dtype=torch.float32)
    ramp = 4.0
    mask = soft_span_mask(spans, distances, ramp)
    log_mask = log_span_mask(spans, distances, ramp)
    for i, z in enumerate(spans.tolist()):
        for w, x in enumerate(distances.tolist()):
            expected = min(max((ramp + z - x) / ramp, 0.0), 1.0)
            assert mask[i, w].item() == pytest.approx(expected, abs=1e-6)
            if expected == 0:
                assert log_mask[i, w].item() == float("-inf")
            else:
                assert log_mask[i, w].item() == pytest.approx(math.log(expected), abs=1e-5)
    # the gradient of log m is finite everywhere, also where the mask is 0 or at the ramp's edges
    spans = spans.clone().requires_grad_(True)
    log_span_mask(spans, distances, ramp).clamp_min(-50).sum().backward()
    assert torch.isfinite(spans.grad).all()


def test_band_view_matches_a_loop() -> None:
    n, W = 5, 4
    scores = torch.randn(2, n, n + W - 1)
    band = _band_view(scores, W)
    assert band.shape == (2, n, W)
    for r in range(n):
        for w in range(W):
            assert torch.equal(band[:, r, w], scores[:, r, r + w])  # query r sees keys r .. r + W - 1


@pytest.mark.parametrize("batch,tokens", [(1, 1), (4, 64)])  # the two orders of the products (see position_scores)
def test_position_scores_both_orders(batch: int, tokens: int) -> None:
    H, Dh, W = 2, 8, 24
    D = H * Dh
    q = torch.randn(batch, H, tokens, Dh, dtype=torch.float64)
    weight = torch.randn(D, D, dtype=torch.float64)
    table = sinusoid_table(torch.arange(W - 1, -1, -1, dtype=torch.float32), D).double()
    rel = (table @ weight.t()).view(W, H, Dh)  # W_R R_d
    expected = torch.einsum("bhtd,whd->bhtw", q, rel)
    torch.testing.assert_close(position_scores(q, weight, table), expected)


def test_band_attention_blocks_agree_and_match_a_loop() -> None:
    B, H, T, W, Dh = 2, 3, 13, 5, 4
    q, keys, values = torch.randn(B, H, T, Dh), torch.randn(B, H, W - 1 + T, Dh), torch.randn(B, H, W - 1 + T, Dh)
    bias = torch.randn(B, H, T, W)
    bias[:, :, :3, 0] = float("-inf")  # keys that do not exist
    one = band_attention(q, keys, values, bias, block=T)
    for block in (1, 4, 64):
        torch.testing.assert_close(band_attention(q, keys, values, bias, block=block), one, atol=1e-6, rtol=0)
    for t in range(T):
        s = (q[:, :, t, None, :] * keys[:, :, t : t + W]).sum(-1) / math.sqrt(Dh) + bias[:, :, t]  # (B, H, W)
        torch.testing.assert_close(one[:, :, t], (s.softmax(-1)[..., None] * values[:, :, t : t + W]).sum(-2))


@pytest.mark.parametrize("grad_start", [0, 3])
def test_band_attention_gradients(grad_start: int) -> None:
    """The hand-written backward against autograd of a plain implementation (float64)."""
    B, H, T, W, Dh = 2, 2, 7, 4, 3
    g = torch.Generator().manual_seed(0)
    q, keys, values = (
        torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64, requires_grad=True)
        for n in (T, W - 1 + T, W - 1 + T)
    )
    bias = torch.randn(B, H, T, W, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64)

    def plain() -> Tensor:
        idx = torch.arange(T)[:, None] + torch.arange(W)[None, :]  # (T, W): key index of each band slot
        s = torch.einsum("bhtd,bhtwd->bhtw", q, keys[:, :, idx]) / math.sqrt(Dh) + bias
        return torch.einsum("bhtw,bhtwd->bhtd", s.softmax(-1), values[:, :, idx])

    inputs = [q, keys, values, bias]
    expected = torch.autograd.grad((plain() * weights).sum(), inputs)
    actual = torch.autograd.grad((band_attention(q, keys, values, bias, 3, grad_start) * weights).sum(), inputs)
    for name, a, e in zip("q keys values bias".split(), actual, expected, strict=True):
        if name in ("keys", "values"):
            assert (a[:, :, :grad_start] == 0).all()
            a, e = a[:, :, grad_start:], e[:, :, grad_start:]
        torch.testing.assert_close(a, e, msg=name)


def test_band_attention_scaled_bias_and_mask() -> None:
    """``bias_scale * bias + mask`` added block by block equals the same sum passed as one bias, with gradients."""
    B, H, T, W, Dh = 2, 2, 9, 4, 3
    g = torch.Generator().manual_seed(1)
    q, keys, values = (torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64) for n in (T, W - 1 + T, W - 1 + T))
    bias = torch.randn(B, H, T, W, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, 1, T, W, dtype=torch.float64)
    mask[:, :, :2, 0] = float("-inf")  # keys that do not exist
    weights = torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64)
    grads = []
    for split in (True, False):
        b = bias.clone().requires_grad_(True)
        if split:
            y = band_attention(q, keys, values, b, 4, mask=mask, bias_scale=0.3)
        else:
            y = band_attention(q, keys, values, 0.3 * b + mask, 4)
        grads.append((y, *torch.autograd.grad((y * weights).sum(), [b])))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# adaptive span: trimming, penalty, clamping, reporting


def test_trimming_the_cache_does_not_change_logits(make_tiny_model) -> None:
    mem_len = 40
    model = make_tiny_model(
        "xl", xl={"mem_len": mem_len, "span_mode": "adaptive", "span_ramp": 4.0, "span_cache_multiple": 8}
    )
    set_span_ratios(model, [[0.05, 0.2], [0.1, 0.1]])  # reach floor(z + R): 12 and 8 -> 16 and 8 slots of 39
    decoder = model.decoder
    trimmed, full = (
        decoder.init_state(2, None, torch.float32, trim=True),
        decoder.init_state(2, None, torch.float32, trim=False),
    )
    assert decoder.state_slots(trim=True) == [16, 8]
    assert trimmed.keys.shape[2] == 24 and full.keys.shape[2] == 2 * (mem_len - 1)
    assert trimmed.nbytes() < full.nbytes()
    assert model.init_state(2).nbytes() == trimmed.nbytes()  # eval mode trims by default
    tokens = _tokens(model, 2, 3 * mem_len + 7)
    sizes = [1, 30, 1, 1, 50, 44]
    with torch.no_grad():
        a, state_a = contract._run(model, tokens, trimmed, sizes)
        b, state_b = contract._run(model, tokens, full, sizes)
        c, _ = contract._run(model, tokens, full, [1] * tokens.shape[1])
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(c, b, atol=1e-4, rtol=0)
    assert state_a.nbytes() == trimmed.nbytes() and state_b.nbytes() == full.nbytes()


def test_state_trimmed_for_shorter_spans_still_works_when_spans_grow(make_tiny_model) -> None:
    """A trimmed state holds fewer slots than grown spans can see: the missing keys count as absent (no crash)."""
    model = make_tiny_model(
        "xl", xl={"mem_len": 32, "span_mode": "adaptive", "span_ramp": 2.0, "span_cache_multiple": 4}
    )
    set_span_ratios(model, [[0.0, 0.1], [0.1, 0.0]])
    trimmed = model.init_state(2)  # eval mode: trimmed to the current spans
    assert model.decoder.state_slots(trim=True) == [8, 8] and trimmed.keys.shape[2] == 16
    model.train()
    assert model.init_state(2).keys.shape[2] == 2 * 31  # training mode: the full window
    model.eval()
    set_span_ratios(model, [[1.0, 0.5], [0.7, 1.0]])  # spans grow beyond the trimmed cache
    tokens = _tokens(model, 2, 80)
    with torch.no_grad():
        # within one call the segment's own keys are all there: same as a full state while nothing was cached
        first = model(tokens[:, :40], trimmed)
        full = model(tokens[:, :40], model.decoder.init_state(2, None, torch.float32, trim=False))
        torch.testing.assert_close(first.logits, full.logits, atol=ATOL, rtol=0)
        second = model(tokens[:, 40:], first.state)
    assert torch.isfinite(second.logits).all() and second.state.nbytes() == trimmed.nbytes()


def test_span_penalty_gradient_moves_c(make_tiny_model) -> None:
    model = make_tiny_model("xl", xl={"mem_len": 16, "span_mode": "adaptive", "span_init": 0.5, "span_loss": 1e-2})
    model.train()
    tokens = _tokens(model, 2, 10)
    out = model(tokens, model.init_state(2), tokens)
    span = model.decoder.blocks[0].mix.span
    assert isinstance(span, AdaptiveSpan)
    assert out.aux_loss.item() == pytest.approx(2 * 1e-2 * 0.5 * 16, rel=1e-5)  # two layers, lambda * mean z each
    (grad,) = torch.autograd.grad(out.aux_loss, [span.ratio])
    torch.testing.assert_close(grad, torch.full_like(grad, 1e-2 * 16 / 2))  # d(lambda * S * mean c)/dc_h
    before = span.ratio.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(tokens, model.init_state(2), tokens).aux_loss.backward()
    opt.step()
    assert (span.ratio.detach() < before).all()  # the penalty shortens the spans
    # the language-model loss reaches c too (through the mask)
    (lm_grad,) = torch.autograd.grad(model(tokens, model.init_state(2), tokens).loss, [span.ratio])
    assert lm_grad.abs().sum() > 0
    # no penalty in eval mode
    model.eval()
    assert model(tokens, model.init_state(2), tokens).aux_loss.item() == 0.0


def test_clamping_keeps_c_in_range(make_tiny_model) -> None:
    model = make_tiny_model("xl", xl={"mem_len": 16, "span_mode": "adaptive"})
    set_span_ratios(model, [[-0.5, 0.3], [1.7, 1.0]])
    model.decoder.after_optimizer_step()
    ratios = [b.mix.span.ratio.detach().tolist() for b in model.decoder.blocks]
    assert ratios == [[0.0, pytest.approx(0.3)], [1.0, 1.0]]
    # and after a real optimizer step that pushes c far outside [0, 1]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    tokens = _tokens(model, 2, 12)
    out = model(tokens, model.init_state(2), tokens)
    (out.loss + out.aux_loss).backward()
    opt.step()
    model.decoder.after_optimizer_step()
    for block in model.decoder.blocks:
        c = block.mix.span.ratio.detach()
        assert ((c >= 0) & (c <= 1)).all()


def test_stats_and_describe_report_spans(make_tiny_model) -> None:
    model = make_tiny_model("xl", xl={"mem_len": 16, "span_mode": "adaptive"})
    set_span_ratios(model, [[0.25, 0.75], [0.5, 0.5]])
    model.train()
    tokens = _tokens(model, 1, 5)
    stats = model(tokens, model.init_state(1), tokens).stats
    assert stats == {"span/layer0_mean": 8.0, "span/layer0_max": 12.0, "span/layer1_mean": 8.0, "span/layer1_max": 8.0}
    info = model.decoder.describe()
    assert info["span_mode"] == "adaptive" and info["spans"] == [[4.0, 12.0], [8.0, 8.0]]
    assert info["cache_slots_per_layer"] == [15, 15]  # reach 12 + 32 ramp > mem_len - 1: nothing to trim
    dynamic = make_tiny_model("xl", xl={"mem_len": 16, "span_mode": "dynamic", "span_init": 0.25}).train()
    stats = dynamic(tokens, dynamic.init_state(1), tokens).stats
    assert set(stats) == set(info_keys := [f"span/layer{i}_{s}" for i in range(2) for s in ("mean", "max")])
    assert all(isinstance(stats[k], float) and 0 <= stats[k] <= 16 for k in info_keys)
    assert dynamic.decoder.describe()["spans_at_zero_input"] == [[4.0, 4.0], [4.0, 4.0]]


# --------------------------------------------------------------------------------------------------------------------
# streaming: state size, modes, presets


@pytest.mark.parametrize("mode", ["fixed", "adaptive", "dynamic"])
@pytest.mark.parametrize("training", [False, True])
def test_state_size_is_constant_over_ten_memory_lengths(make_tiny_model, mode: str, training: bool) -> None:
    mem_len = 8
    model = make_tiny_model("xl", xl={**SPAN_MODES.get(mode, {}), "mem_len": mem_len, "span_mode": mode})
    model.train(training)
    tokens = _tokens(model, 2, 10 * mem_len + 3)
    state = model.init_state(2)
    expected = state.nbytes()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        start = 0
        while start < tokens.shape[1]:
            size = int(torch.randint(1, 2 * mem_len, (1,), generator=g))
            state = model(tokens[:, start : start + size], state).state
            start += size
            assert state.nbytes() == expected
    assert int(state.position[0]) == tokens.shape[1]


def test_dynamic_span_is_never_trimmed(make_tiny_model) -> None:
    model = make_tiny_model("xl", xl=SPAN_MODES["dynamic"])
    assert model.decoder.state_slots(trim=True) == [7, 7]


@pytest.mark.parametrize("preset,mode", [("xl-small", "fixed"), ("xl-span-small", "adaptive")])
def test_presets_build(preset: str, mode: str) -> None:
    config = load_config(preset)
    assert config.model.decoder == "xl" and config.model.xl.span_mode == mode
    assert (config.model.n_layer, config.model.d_model, config.model.n_head, config.model.d_ff) == (6, 256, 4, 1024)
    assert config.model.xl.mem_len == 256 and config.train.seq_len == 256 and config.train.batch_size == 8
    model = build_model(config.model)
    assert isinstance(model.init_state(1), XLState)


@pytest.mark.parametrize(
    "key,value",
    [
        ("mem_len", 0),
        ("span_ramp", 0.0),
        ("span_init", 1.5),
        ("span_loss", -1.0),
        ("span_cache_multiple", 0),
        ("span_mode", "learned"),
    ],
)
def test_config_rejects_bad_values(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"model.xl.{key}"):
        load_config("xl-small", {f"model.xl.{key}": value})
