"""Combiner decoder (longctx/decoders/combiner.py): causal Combiner-Fixed against references written in this file.

The references follow Ren et al. 2021 (arXiv 2107.05768) eq. 4 with the Combiner-Fixed partition: query i in segment
``g = i // s`` scores its own segment's keys ``j <= i`` and, for each of the segments ``r = g - S .. g - 1``, the
summary key ``k̂_r`` = max-pool of the segment's unrotated keys rotated at its last position ``e_r``; one softmax over
all of them; a summary carries ``v̂_r = softmax_j(q̂_r · k_j / √Dh) v_j`` over the whole segment (``q̂_r`` pooled and
rotated the same way). The rotation here is written from RoFormer's formula, independently of longctx.layers.

Tolerances. Kernel-level comparisons run in float64: the vectorised and naive forms differ only in summation order,
~1e-15 relative, so ``F64_ATOL = 1e-10`` leaves five orders of headroom and still catches any wrong weight (a
misplaced token moves a weight by > 1e-3 with these random inputs). Model-level comparisons run in fp32 with the
contract tests' tolerances (test_contract.py: ~1e-6 accumulation noise, ``ATOL = 1e-4``, exact-path ``1e-6``).
"""

from __future__ import annotations

import math

import pytest
import test_contract as contract  # the shared contract helpers (same folder; pytest puts it on sys.path)
import torch
from torch import Tensor

from longctx.config import Config
from longctx.decoders import combiner as combiner_module
from longctx.decoders.combiner import SegmentMemory, combiner_attention, segment_layout
from longctx.errors import ConfigError
from longctx.layers import RotaryEmbedding

F64 = torch.float64
F64_ATOL = 1e-10  # float64, different summation orders only (see module docstring)
BASE = 10000.0


# --------------------------------------------------------------------------------------------------------------------
# references and drivers


def rotate(x: Tensor, positions: Tensor) -> Tensor:
    """RoPE (RoFormer eq. 34), pairs (first half, second half): x (H, n, Dh) at integer positions (n,), float64."""
    half = x.shape[-1] // 2
    inv_freq = BASE ** (-torch.arange(0, 2 * half, 2, dtype=F64) / (2 * half))  # (Dh/2,)
    angles = positions.to(F64)[:, None] * inv_freq  # (n, Dh/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)


def naive_combiner(q: Tensor, k: Tensor, v: Tensor, s: int, S: int) -> Tensor:
    """One stream from position 0, one query at a time: q, k (H, L, Dh), v (H, L, Dv) -> (H, L, Dv), float64."""
    H, L, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    qr, kr = rotate(q, torch.arange(L)), rotate(k, torch.arange(L))
    out = torch.zeros(H, L, v.shape[-1], dtype=F64)
    for i in range(L):
        g = i // s
        logits, vals = [], []
        for j in range(g * s, i + 1):  # the own segment, causal
            logits.append((qr[:, i] * kr[:, j]).sum(-1) * scale)
            vals.append(v[:, j])
        for r in range(max(0, g - S), g):  # the last S finished segments, one summary each
            seg, end = slice(r * s, (r + 1) * s), torch.tensor([(r + 1) * s - 1])
            k_hat = rotate(k[:, seg].amax(dim=1, keepdim=True), end)[:, 0]  # (H, Dh)
            q_hat = rotate(q[:, seg].amax(dim=1, keepdim=True), end)[:, 0]
            inner = torch.softmax((kr[:, seg] * q_hat[:, None]).sum(-1) * scale, dim=-1)  # (H, s), not causal
            logits.append((qr[:, i] * k_hat).sum(-1) * scale)
            vals.append((inner[..., None] * v[:, seg]).sum(1))
        probs = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (H, n): one softmax over both parts
        out[:, i] = (probs[..., None] * torch.stack(vals, dim=1)).sum(1)
    return out


def run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: int,
    S: int,
    sizes: list[int],
    memory: SegmentMemory | None = None,
    position: Tensor | None = None,
) -> tuple[Tensor, SegmentMemory, Tensor]:
    """Feed q, k (B, H, T, Dh), v (B, H, T, Dv) in chunks of ``sizes`` through the vectorised kernel."""
    B, H, T, Dh = q.shape
    rotary = RotaryEmbedding(Dh, BASE)
    if memory is None:
        memory = SegmentMemory.empty(B, H, s, S, Dh, v.shape[-1], q.dtype)
    position = torch.zeros(B, dtype=torch.int64) if position is None else position
    outs, start = [], 0
    for size in sizes:
        layout = segment_layout(position, size, s, S, rotary, q.dtype)
        chunk = slice(start, start + size)
        y, memory = combiner_attention(q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], memory, layout)
        outs.append(y)
        position, start = position + size, start + size
    assert start == T
    y = torch.cat(outs, dim=2) if outs else v[:, :, :0]
    return y, memory, position


def random_qkv(B: int, H: int, T: int, Dh: int, Dv: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (Dh, Dh, Dv))  # type: ignore[return-value]


def effective_weights(q: Tensor, k: Tensor, s: int, S: int, sizes: list[int]) -> Tensor:
    """The weight every position receives from every query, (B, H, T, T): the output for one-hot values.

    The output is linear in the values (the summaries' inner attention depends on q and k only), so with ``v_j`` the
    j-th unit vector, output i is the row of weights: direct weights, plus summary weight x inner attention.
    """
    B, H, T, _ = q.shape
    onehot = torch.eye(T, dtype=q.dtype).expand(B, H, T, T)
    return run(q, k, onehot, s, S, sizes)[0]


def support(T: int, s: int, S: int) -> Tensor:
    """(T, T) bool: position j is read by query i (own segment up to i, or one of the S segments before)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    own = (j // s == i // s) & (j <= i)
    summarised = (j // s < i // s) & (j // s >= i // s - S)
    return own | summarised


# --------------------------------------------------------------------------------------------------------------------
# the effective attention distribution


@pytest.mark.parametrize("s,S", [(4, 2), (3, 3), (1, 2)])
def test_effective_weights_are_a_distribution_over_the_causal_support(s: int, S: int) -> None:
    T = 6 * s + 2  # segments beyond the S kept ones: dropped summaries are in the stream
    q, k, _ = random_qkv(2, 2, T, 8, 1, seed=s + S)
    weights = effective_weights(q, k, s, S, [T])  # (B, H, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, T, dtype=F64), atol=F64_ATOL, rtol=0)
    inside = support(T, s, S).expand_as(weights)
    assert (weights[inside] > 0).all(), "a position of the own segment or of a kept segment got no mass"
    assert (weights[~inside] == 0).all(), "mass on the future or on a dropped segment"
    # the same distribution however the stream is cut into calls
    for sizes in ([1] * T, [5, 1, T - 6], [s + 1, 2 * s - 1, T - 3 * s]):
        torch.testing.assert_close(effective_weights(q, k, s, S, sizes), weights, atol=F64_ATOL, rtol=0)


def test_one_segment_is_plain_causal_attention() -> None:
    """With segment >= stream length there is no summary: softmax(causal(q_rot k_rot^T / sqrt(Dh)))."""
    T, Dh = 11, 8
    q, k, _ = random_qkv(2, 2, T, Dh, 1, seed=3)
    pos = torch.arange(T)
    logits = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2) / math.sqrt(Dh)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    dense = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    for sizes in ([T], [1] * T, [4, 7]):
        torch.testing.assert_close(effective_weights(q, k, T, 2, sizes), dense, atol=F64_ATOL, rtol=0)


def test_one_segment_model_equals_the_transformer_baseline(make_tiny_model) -> None:
    """The same weights in a transformer (window >= T) and a combiner (segment >= T) give the same logits."""
    T = 12
    base = make_tiny_model("transformer", transformer={"window": T})
    model = make_tiny_model("combiner", combiner={"segment": T, "max_summaries": 2})
    model.load_state_dict(base.state_dict())  # same parameter names: qkv, out_proj, norms, MLP
    tokens = contract._tokens(model, 2, T)
    with torch.no_grad():
        expected = base(tokens, base.init_state(2)).logits
        for sizes in ([T], [1] * T, [5, 7]):
            logits, _ = contract._run(model, tokens, model.init_state(2), sizes)
            contract._close(logits, expected, contract.ATOL)


# --------------------------------------------------------------------------------------------------------------------
# the vectorised kernel against the naive loop


@pytest.mark.parametrize("s,S", [(4, 2), (3, 1), (1, 3), (5, 4)])
def test_vectorised_kernel_matches_naive_loop(s: int, S: int) -> None:
    """Rows at different offsets in their segments (after private prefixes), then chunks of mixed sizes."""
    H, Dh, Dv = 2, 8, 6
    prefixes = [0, 2, s + 1]  # rows start at different positions: row-specific segment boundaries in every call
    sizes = [1, s, 2 * s + 1, 3, 5 * s]
    n = sum(sizes)
    streams = [random_qkv(1, H, p + n, Dh, Dv, seed=10 * s + b) for b, p in enumerate(prefixes)]
    memories, prefix_outputs = [], []
    for (q, k, v), p in zip(streams, prefixes, strict=True):
        y, memory, _ = run(q[:, :, :p], k[:, :, :p], v[:, :, :p], s, S, [p] if p else [])
        memories.append(memory)
        prefix_outputs.append(y)
    memory = SegmentMemory(*(torch.cat(parts, dim=0) for parts in zip(*memories, strict=True)))
    q, k, v = (torch.cat([st[i][:, :, p:] for st, p in zip(streams, prefixes, strict=True)]) for i in range(3))
    y, _, position = run(q, k, v, s, S, sizes, memory, torch.tensor(prefixes))
    assert position.tolist() == [p + n for p in prefixes]
    for b, ((qb, kb, vb), p) in enumerate(zip(streams, prefixes, strict=True)):
        expected = naive_combiner(qb[0], kb[0], vb[0], s, S)  # (H, p + n, Dv)
        torch.testing.assert_close(prefix_outputs[b][0], expected[:, :p], atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(y[b], expected[:, p:], atol=F64_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# the model: dropped summaries, precision, config


@pytest.mark.parametrize("n_layer", [1, 2])
def test_summaries_older_than_max_summaries_are_dropped(make_tiny_model, n_layer: int) -> None:
    """A token of segment r reaches the segments r .. r + n_layer * S (one hop of S summaries per layer), no further."""
    model = make_tiny_model("combiner", n_layer=n_layer)
    s, S = model.cfg.combiner.segment, model.cfg.combiner.max_summaries
    r = 1
    last = r + n_layer * S  # the last segment the perturbed token can reach
    length = (last + 3) * s
    tokens = contract._tokens(model, 2, length)
    t = r * s + 1  # a token inside segment r
    perturbed = tokens.clone()
    perturbed[:, t] = (perturbed[:, t] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        for sizes in ([length], contract._random_partition(length, s * (S + 1), seed=5)):
            base, _ = contract._run(model, tokens, model.init_state(2), sizes)
            logits, _ = contract._run(model, perturbed, model.init_state(2), sizes)
            change = (logits - base).abs().amax(dim=(0, 2)).view(-1, s).amax(dim=1)  # (segments,) largest change
            assert (change[:r] <= contract.EXACT_ATOL).all()
            assert (change[r : last + 1] > contract.CHANGED).all(), change
            assert (change[last + 1 :] == 0).all(), change  # exactly nothing: the summary was dropped


def test_token_by_token_decoding_matches_one_call(make_tiny_model, monkeypatch) -> None:
    """Decoding one token at a time, two rows at different offsets in their segments (so that at some steps one row
    finishes a segment and the call takes the vectorised path, at others the short path), gives each row the logits
    and memory of one call over its whole stream."""
    model = make_tiny_model("combiner", n_layer=2)
    s, S = model.cfg.combiner.segment, model.cfg.combiner.max_summaries
    prefixes, n_new = (s * (S + 1) + 1, 2 * s + 2), 3 * s * (S + 1)  # offsets 1 and 2; past the summary limit
    streams = [contract._tokens(model, 1, length + n_new, seed=length) for length in prefixes]
    short = []
    real = combiner_module.combiner_token_attention
    monkeypatch.setattr(combiner_module, "combiner_token_attention", lambda *a: short.append(1) or real(*a))
    with torch.no_grad():
        whole = [model(tokens, model.init_state(1)) for tokens in streams]
        state = type(whole[0].state).concat(
            [
                model(tokens[:, :length], model.init_state(1)).state
                for tokens, length in zip(streams, prefixes, strict=True)
            ]
        )
        steps = []
        for i in range(n_new):
            token = torch.cat(
                [tokens[:, length + i : length + i + 1] for tokens, length in zip(streams, prefixes, strict=True)]
            )
            out = model(token, state)
            steps.append(out.logits)
            state = out.state
    decoded = torch.cat(steps, dim=1)  # (2, n_new, V)
    for row, (ref, length) in enumerate(zip(whole, prefixes, strict=True)):
        torch.testing.assert_close(decoded[row], ref.logits[0, length:], atol=contract.ATOL, rtol=0)
        for name, tensor in ref.state.tensors().items():
            torch.testing.assert_close(state.tensors()[name][row], tensor[0], atol=contract.ATOL, rtol=0)
    n_short = sum(1 for i in range(n_new) if all((length + i) % s != s - 1 for length in prefixes))
    assert 0 < n_short < n_new and len(short) == n_short * model.cfg.n_layer  # both paths ran


@pytest.mark.parametrize("s,S", [(2, 1), (4, 3)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_short_decoding_path_equals_the_vectorised_one(make_tiny_model, s: int, S: int, precision: str) -> None:
    """Step by step from the same state, the short path and the vectorised forward (forced) give the same logits and
    the same next memory, bit for bit (it is only moved, max-pooled and cast): rows starting at position 0 and
    mid-stream, pools restarting at offset 0, before and after the summaries fill, in fp32 and under bf16 autocast."""
    # one layer: its memory comes from the embeddings, identical in both paths (a deeper layer's input differs by the
    # attention's rounding; the token-by-token test above covers two layers)
    model = make_tiny_model("combiner", n_layer=1, combiner={"segment": s, "max_summaries": S})
    decoder = model.decoder
    # row 1 starts past the summary limit, one token into a segment when s > 2 (with s = 2, rows at different offsets
    # would always have one finishing its segment, and the short path would never run)
    prefix = contract._tokens(model, 1, s * (S + 1) + (s > 2), seed=3)
    with torch.no_grad():
        state = type(model.init_state(1)).concat([model.init_state(1), model(prefix, model.init_state(1)).state])
    tokens = contract._tokens(model, 2, 3 * s * (S + 1), seed=4)
    vectorised = lambda position, n, dtype: segment_layout(position, n, s, S, decoder.rotary, dtype)  # noqa: E731
    # bf16: both paths round the same products to bf16; they may differ by their summation order (a few bf16 ulps
    # of values ~1: 3e-2 is loose); fp32: accumulation order only (contract ATOL)
    atol = 3e-2 if precision == "bf16" else contract.ATOL
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    n_short = 0
    with torch.no_grad(), autocast:
        for i in range(tokens.shape[1]):
            token = tokens[:, i : i + 1]
            n_short += isinstance(decoder._layout(state.position, 1, torch.float32), combiner_module.TokenLayout)
            out = model(token, state)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(decoder, "_layout", vectorised)
                ref = model(token, state)
            torch.testing.assert_close(out.logits.float(), ref.logits.float(), atol=atol, rtol=0)
            for name, tensor in ref.state.tensors().items():  # moved, pooled or rounded alike: exactly equal
                assert torch.equal(out.state.tensors()[name], tensor), name
            state = out.state
    assert n_short > 0


def test_bf16_autocast_runs_close_to_fp32(make_tiny_model) -> None:
    """Under bf16 autocast (training precision) the scores and softmax stay float32; logits near the fp32 ones."""
    model = make_tiny_model("combiner")
    tokens = contract._tokens(model, 2, 37)
    with torch.no_grad():
        fp32 = model(tokens, model.init_state(2)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, model.init_state(2))
    assert out.state.keys.dtype == torch.float32  # the carried state keeps the model's dtype
    # bf16 has 8 mantissa bits (~4e-3 relative); logits here are ~0.1-1, through 2 layers: 5e-2 is a loose bound
    torch.testing.assert_close(out.logits.float(), fp32, atol=5e-2, rtol=0)


@pytest.mark.parametrize("key,value", [("segment", 0), ("max_summaries", 0), ("rope_base", 1.0)])
def test_config_rejects_out_of_range_values(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"model.combiner.{key}"):
        Config.from_dict({"model": {"decoder": "combiner", "combiner": {key: value}}})
