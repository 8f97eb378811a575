"""Tests of the Perceiver AR decoder (``perceiver_ar``): a dense float64 reference, cached decoding, bounded reach,
partial rotary positions, configuration.

The shared contract tests (test_contract.py) run for ``perceiver_ar`` through the registry (tiny config: context 8,
latents 4, one cross-attention and two latent layers). The reference here is written from the equations of the
module docstring, not from the decoder's code: whole-stream dense attention with explicit masks ``j <= p`` and
``j > p - window``, RoPE applied pair by pair with explicit angles, float64 throughout, no cache and no kernels.
"""

from __future__ import annotations

import math

import pytest
import test_contract as contract  # the shared contract checks (same folder; pytest puts it on sys.path)
import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.config import ModelConfig, load_config
from longctx.decoders.perceiver_ar import (
    PerceiverARDecoder,
    PerceiverARState,
    rotated_channels,
    squared_relu,
)
from longctx.errors import ConfigError
from longctx.layers.attention import RotaryEmbedding, apply_rotary_full, rotary_tables
from longctx.layers.block import PreNormBlock
from longctx.model import LongContextLM

torch.set_num_threads(1)

# Tolerances. REF_TOL: fp32 decoder vs float64 reference with large random weights (attention far from uniform,
# hidden states of rms ~8 and max ~30 through the squared-ReLU MLPs), relative to the largest |hidden|: fp32
# rounding through 2-3 layers of width 32 gives ~5e-7 of it, a one-position error in a window or a different
# rotary fraction moves the outputs by 0.1-0.6 of it (test_reference_is_sensitive...). ATOL: the same fp32 model
# through different call patterns, as in test_contract.py. CHANGED/EXACT: see test_contract.py.
REF_TOL = 1e-5
ATOL = contract.ATOL
EXACT_ATOL = contract.EXACT_ATOL
CHANGED = contract.CHANGED


def _model(make_tiny_model, n_layer: int = 3, **perceiver) -> LongContextLM:
    settings = {"context": 8, "latents": 4, "rotary_fraction": 0.5} | perceiver
    return make_tiny_model("perceiver_ar", n_layer=n_layer, perceiver_ar=settings)


def _decoder(cfg: ModelConfig, seed: int = 0) -> PerceiverARDecoder:
    """A decoder with large random weights: peaked attention, so masks and positions matter in the outputs."""
    torch.manual_seed(seed)
    decoder = PerceiverARDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))  # q.k ~ Dh * ... : scores of order 1-5
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    return decoder


def _run_decoder(decoder: PerceiverARDecoder, x: Tensor, sizes: list[int]) -> Tensor:
    state, outs, start = decoder.init_state(x.shape[0], x.device, x.dtype), [], 0
    for size in sizes:
        out = decoder(x[:, start : start + size], state)
        outs.append(out.hidden)
        state, start = out.state, start + size
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------------------------------
# dense float64 reference


def _rope_reference(t: Tensor, fraction: float, base: float) -> Tensor:
    """Rotate (B, H, S, Dh) pair by pair: channel i with i + Dh/2 for the first R/2 pairs, angle p * base^(-2i/R)."""
    Dh = t.shape[-1]
    rotated = 2 * math.floor(fraction * Dh / 2)
    positions = torch.arange(t.shape[2], dtype=torch.float64)
    out = t.clone()
    for i in range(rotated // 2):
        angle = positions * base ** (-2 * i / rotated)  # (S,)
        a, b = t[..., i], t[..., i + Dh // 2]
        out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., i + Dh // 2] = a * torch.sin(angle) + b * torch.cos(angle)
    return out


def _block_reference(block: PreNormBlock, h: Tensor, window: int, cfg: ModelConfig) -> Tensor:
    """One pre-norm block, dense: position p attends to positions (p - window, p] of h (B, S, D), float64."""
    B, S, D = h.shape
    H, Dh = cfg.n_head, cfg.head_dim
    W = {k: v.to(torch.float64) for k, v in block.state_dict().items()}
    u = F.layer_norm(h, (D,), W["norm_mix.weight"], W["norm_mix.bias"], cfg.norm_eps)
    q, k, v = F.linear(u, W["mix.qkv.weight"], W["mix.qkv.bias"]).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
    pcfg = cfg.perceiver_ar
    q, k = (_rope_reference(t, pcfg.rotary_fraction, pcfg.rope_base) for t in (q, k))
    p_idx, j_idx = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j_idx <= p_idx) & (j_idx > p_idx - window)  # (S, S)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)  # (B, H, S, S)
    attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # (B, H, S, Dh)
    h = h + F.linear(attn.transpose(1, 2).reshape(B, S, D), W["mix.out_proj.weight"], W["mix.out_proj.bias"])
    u = F.layer_norm(h, (D,), W["norm_mlp.weight"], W["norm_mlp.bias"], cfg.norm_eps)
    hidden = F.relu(F.linear(u, W["mlp.fc_in.weight"], W["mlp.fc_in.bias"])).square()
    return h + F.linear(hidden, W["mlp.fc_out.weight"], W["mlp.fc_out.bias"])


def _reference(decoder: PerceiverARDecoder, x: Tensor) -> Tensor:
    """Cross-attention over (p - context, p] of the inputs, then every latent layer over (p - latents, p]."""
    cfg = decoder.cfg
    h = _block_reference(decoder.cross, x.to(torch.float64), cfg.perceiver_ar.context, cfg)
    for block in decoder.blocks:
        h = _block_reference(block, h, cfg.perceiver_ar.latents, cfg)
    return h


@pytest.mark.parametrize(
    ("context", "latents", "n_layer", "fraction"),
    [(6, 6, 2, 0.5), (8, 3, 3, 0.25), (5, 1, 2, 1.0)],
    ids=["latents=context,1-latent-layer", "2-latent-layers", "latents=1,full-rotary"],
)
def test_matches_dense_float64_reference(
    make_tiny_model, context: int, latents: int, n_layer: int, fraction: float
) -> None:
    cfg = _model(make_tiny_model, n_layer, context=context, latents=latents, rotary_fraction=fraction).cfg
    decoder = _decoder(cfg)
    length = 3 * context + 4  # the caches fill, wrap and are read across chunk boundaries
    x = torch.randn(2, length, cfg.d_model, generator=torch.Generator().manual_seed(1))
    expected = _reference(decoder, x)
    scale = expected.abs().amax().item()
    assert scale > 1.0  # large weights: far from the near-uniform attention of the default init
    with torch.no_grad():
        for sizes in ([length], [1] * length, contract._random_partition(length, context, seed=2)):
            actual = _run_decoder(decoder, x, sizes).to(torch.float64)
            torch.testing.assert_close(actual, expected, rtol=0, atol=REF_TOL * scale)


def test_reference_is_sensitive_to_the_windows(make_tiny_model) -> None:
    """The reference comparison can fail: one position more or less in either window, or another rotary fraction,
    changes the outputs by far more than REF_TOL."""
    cfg = _model(make_tiny_model, 2, context=6, latents=3).cfg
    decoder = _decoder(cfg)
    x = torch.randn(1, 20, cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = _run_decoder(decoder, x, [20]).to(torch.float64)
    scale = actual.abs().amax().item()
    for context, latents, fraction in ((5, 3, 0.5), (7, 3, 0.5), (6, 2, 0.5), (6, 4, 0.5), (6, 3, 0.25)):
        decoder.cfg = _model(make_tiny_model, 2, context=context, latents=latents, rotary_fraction=fraction).cfg
        error = (_reference(decoder, x) - actual).abs().amax().item()  # the reference reads only decoder.cfg
        assert error > 1e3 * REF_TOL * scale, (context, latents, fraction, error)


# --------------------------------------------------------------------------------------------------------------------
# cached decoding, bounded reach


def test_cached_decoding_equals_full_recomputation(make_tiny_model) -> None:
    """Token by token with the state equals re-running the whole prefix from an empty state for every token (the
    official sampler's ``all_previous`` mode), also long after the caches are full."""
    model = _model(make_tiny_model)
    context = model.cfg.perceiver_ar.context
    tokens = contract._tokens(model, 2, 3 * context + 3)
    with torch.no_grad():
        cached, _ = contract._run(model, tokens, model.init_state(2), [1] * tokens.shape[1])
        for p in range(tokens.shape[1]):
            full = model(tokens[:, : p + 1], model.init_state(2)).logits[:, -1]  # (B, V), no cache at all
            torch.testing.assert_close(cached[:, p], full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_layer", [1, 2, 3])
def test_reach_is_bounded(make_tiny_model, n_layer: int) -> None:
    """Position p sees inputs (p - reach, p], reach = (context - 1) + (n_layer - 1)(latents - 1): with the
    cross-attention alone, inputs older than ``context`` do not change the output."""
    model = _model(make_tiny_model, n_layer)
    pcfg = model.cfg.perceiver_ar
    reach = (pcfg.context - 1) + (n_layer - 1) * (pcfg.latents - 1)
    length, s = reach + pcfg.context + 6, 3  # s: the perturbed token
    tokens = contract._tokens(model, 2, length)
    perturbed = tokens.clone()
    perturbed[:, s] = (perturbed[:, s] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        for sizes in ([length], contract._random_partition(length, pcfg.context, seed=3)):
            base, _ = contract._run(model, tokens, model.init_state(2), sizes)
            logits, _ = contract._run(model, perturbed, model.init_state(2), sizes)
            change = (logits - base).abs().amax(dim=(0, 2))  # (T,)
            assert (change[:s] <= EXACT_ATOL).all()
            assert (change[s : s + reach + 1] > CHANGED).all(), change[s : s + reach + 1]
            assert (change[s + reach + 1 :] <= EXACT_ATOL).all(), change[s + reach + 1 :]
        # and a fresh run over only the last reach + 1 tokens gives the last output (rotary positions are relative)
        short = model(tokens[:, -(reach + 1) :], model.init_state(2)).logits[:, -1]
        torch.testing.assert_close(short, base[:, -1], atol=ATOL, rtol=0)


def test_state_size(make_tiny_model) -> None:
    model = _model(make_tiny_model, 3, context=8, latents=4)
    cfg = model.cfg
    state = model.init_state(2)
    assert isinstance(state, PerceiverARState)
    floats = 2 * cfg.n_head * 7 * cfg.head_dim + 2 * 2 * cfg.n_head * 3 * cfg.head_dim  # cross + 2 latent layers
    assert state.nbytes() == 2 * (4 * floats + 2 * 8)


# --------------------------------------------------------------------------------------------------------------------
# partial rotary positions


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.6, 1.0])
def test_rotary_turns_only_the_configured_fraction(make_tiny_model, fraction: float) -> None:
    model = _model(make_tiny_model, rotary_fraction=fraction)
    Dh = model.cfg.head_dim  # 16
    rotated = rotated_channels(Dh, fraction)
    assert rotated == 2 * math.floor(fraction * Dh / 2)
    positions = torch.arange(1, 40)[None]  # (1, T); position 0 turns nothing
    cos, sin = model.decoder.rotary(positions, torch.float32)  # (1, 1, T, Dh)
    channel = torch.arange(Dh)
    turned = (channel % (Dh // 2)) < rotated // 2  # pairs (i, i + Dh/2) for i < R/2
    assert int(turned.sum()) == rotated
    assert (cos[..., ~turned] == 1).all() and (sin[..., ~turned] == 0).all()
    assert ((cos[..., turned] != 1) | (sin[..., turned] != 0)).all()
    q = torch.randn(2, 3, positions.shape[1], Dh)
    q_rot = apply_rotary_full(q, cos, sin)
    assert torch.equal(q_rot[..., ~turned], q[..., ~turned])  # bit for bit
    if rotated:
        assert ((q_rot[..., turned] - q[..., turned]).abs() > 0).float().mean() > 0.9
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))  # a rotation


def test_full_rotary_fraction_is_the_transformers_rope(make_tiny_model) -> None:
    model = _model(make_tiny_model, rotary_fraction=1.0)
    positions = torch.arange(0, 1000, 7)[None]
    ours = model.decoder.rotary(positions, torch.float32)
    rope = RotaryEmbedding(model.cfg.head_dim, model.cfg.perceiver_ar.rope_base)
    theirs = rotary_tables(*rope(positions, torch.float32))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_without_rotary_the_window_is_a_set(make_tiny_model) -> None:
    """Rotary positions are the only order signal: with fraction 0 a cross-attention-only model's output at p does
    not depend on the order of the earlier inputs in its window; with fraction 0.5 it does."""
    x_len = 8
    for fraction, order_matters in ((0.0, False), (0.5, True)):
        model = _model(make_tiny_model, 1, context=x_len, latents=2, rotary_fraction=fraction)
        tokens = contract._tokens(model, 2, x_len)
        shuffled = torch.cat([tokens[:, :-1].flip(1), tokens[:, -1:]], dim=1)  # same set, same last token
        with torch.no_grad():
            a = model(tokens, model.init_state(2)).logits[:, -1]
            b = model(shuffled, model.init_state(2)).logits[:, -1]
        assert ((a - b).abs().amax() > CHANGED) == order_matters, fraction


# --------------------------------------------------------------------------------------------------------------------
# squared ReLU, precision, configuration


def test_squared_relu_values_and_gradients() -> None:
    h = torch.randn(6, 5, dtype=torch.float64) * 2
    h[0, :3] = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(squared_relu(h), F.relu(h) ** 2)
    torch.autograd.gradcheck(squared_relu, (h.requires_grad_(),))  # finite differences; h = 0 has a zero slope


def test_bf16_autocast_is_close_to_fp32(make_tiny_model) -> None:
    model = _model(make_tiny_model)
    tokens = contract._tokens(model, 2, 20)
    with torch.no_grad():
        fp32 = model(tokens, model.init_state(2)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, model.init_state(2))
    assert out.state.cross_keys.dtype == torch.float32  # the carried state keeps the model's dtype
    torch.testing.assert_close(out.logits.float(), fp32, atol=2e-2, rtol=0)  # bf16: ~3 significant digits


def test_preset_parses_and_is_the_transformer_size_class() -> None:
    cfg = load_config("perceiver-ar-small")
    base = load_config("transformer-small")
    assert cfg.model.decoder == "perceiver_ar"
    for key in ("n_layer", "n_head", "d_model", "d_ff"):
        assert getattr(cfg.model, key) == getattr(base.model, key), key
    assert cfg.model.perceiver_ar.latents == base.model.transformer.window
    assert cfg.model.perceiver_ar.context > cfg.model.perceiver_ar.latents
    assert cfg.train == base.train and cfg.data == base.data


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.perceiver_ar.latents", "0", "latents"),
        ("model.perceiver_ar.latents", "2048", "context"),  # more latents than context
        ("model.perceiver_ar.rotary_fraction", "1.5", "rotary_fraction"),
        ("model.perceiver_ar.rope_base", "1.0", "rope_base"),
    ],
)
def test_invalid_config_values_are_errors(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("perceiver-ar-small", {key: value})
