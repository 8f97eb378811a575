"""Tests of the ∞-former decoder (``infinite``; Martins et al. 2022, arXiv 2109.00301).

The shared contract tests (test_contract.py) run for ``infinite`` as registered and with sticky memories, the input
gate and the separate LTM output projection (the contract cases of conftest.py). Here the decoder is
compared with a naive reference that follows the schedule one query at a time: the exact window after the last refit
boundary b(p), and the LTM version built by explicit, sequential refits (for sticky memories: from the attention of
the queries that read the previous version; with the gate written out as loops), its output projected as
``ltm_out`` says. The LTM maths itself is tested in tests/layers/test_continuous.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import INFINITE_VARIANTS
from torch import Tensor

from longctx.config import load_config
from longctx.decoders.infinite import InfiniteDecoder, InfiniteState, make_schedule
from longctx.errors import ConfigError
from longctx.layers.continuous import bin_mass, evaluate_basis, expected_basis, histogram_quantiles
from longctx.model import LongContextLM, build_model

torch.set_num_threads(1)

ATOL = 1e-5  # the same maths through different kernels and accumulation orders, fp32, hidden states ~1

# tiny LTM settings: exact windows of 3..4 previous tokens, a refit every 2 tokens from position 3 on
TINY = {"mem_len": 3, "ltm_block": 2, "n_basis": 12, "sigmas": [0.05, 0.1], "n_samples": 10, "sticky_bins": 6}
VARIANTS = INFINITE_VARIANTS


def _tokens(model: LongContextLM, batch: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g)


# --------------------------------------------------------------------------------------------------------------------
# naive reference: one query at a time, LTM versions built in order


def _naive_gate(conv: torch.nn.Conv1d, x: Tensor) -> Tensor:
    """x * sigmoid(conv(x)) for a kernel-3 convolution zero-padded by one, written out: x (B, L, D)."""
    B, L, D = x.shape
    weight, bias = conv.weight, conv.bias  # (D_out, D_in, 3), (D_out,)
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(L):
            for c in range(D):
                z = bias[c].clone()
                for j in range(3):  # kernel tap j reads token t + j - 1
                    if 0 <= t + j - 1 < L:
                        z = z + (weight[c, :, j] * x[b, t + j - 1]).sum()
                out[b, t, c] = x[b, t, c] * torch.sigmoid(z)
    return out


def _naive_ltm_version(
    attn: Any, memory: Any, versions: list[Tensor], masses: list[Tensor], h: Tensor, block: int, sticky: bool
) -> Tensor:
    """The next LTM version from the previous one and the block of inputs that just left the window."""
    k = len(versions)  # the new version covers the tokens [0, k * block)
    x = h[:, (k - 1) * block : k * block]  # (B, L, D)
    if attn.gate is not None:
        x = _naive_gate(attn.gate, x)
    if k == 1:
        return memory.fit_block.T @ x
    M = memory.n_samples
    samples = (
        histogram_quantiles(masses[k - 1], M).float() if sticky else (torch.arange(1, M + 1) / M).expand(x.shape[0], -1)
    )
    old = evaluate_basis(samples, memory.centres, memory.widths) @ versions[k - 1]  # (B, M, D): old signal
    return memory.fit_old.T @ old + memory.fit_new.T @ x


def _naive_layer(block: Any, decoder: InfiniteDecoder, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    attn, inf, memory = block.mix, decoder.inf, decoder.memory
    B, n, D = x.shape
    H, Dh, N = attn.n_head, attn.head_dim, inf.n_basis
    h = block.norm_mix(x)
    q, k, val = attn.qkv(h).view(B, n, 3, H, Dh).unbind(2)  # (B, n, H, Dh)
    inv_freq = [10000.0 ** (-2 * i / D) for i in range(D // 2)]
    W = inf.mem_len + inf.ltm_block
    table = torch.tensor(
        [[math.sin(d * f) for f in inv_freq] + [math.cos(d * f) for f in inv_freq] for d in range(W)]
    )  # (W, D): R_d
    rel = attn.r_net(table).view(W, H, Dh)
    u, v = u.view(H, Dh), v.view(H, Dh)
    versions, masses = [torch.zeros(B, N, D)], [torch.zeros(B, inf.sticky_bins)]
    out = torch.zeros(B, n, H, Dh)
    context = torch.zeros(B, n, H, Dh)  # V^T r per head
    for p in range(n):
        b = max(0, inf.ltm_block * ((p - inf.mem_len) // inf.ltm_block))
        while len(versions) <= b // inf.ltm_block:
            versions.append(_naive_ltm_version(attn, memory, versions, masses, h, inf.ltm_block, inf.sticky))
            masses.append(torch.zeros(B, inf.sticky_bins))
        keys = range(b, p + 1)  # the exact window: itself and the tokens after the boundary
        assert inf.mem_len <= p - b <= inf.mem_len + inf.ltm_block - 1 or b == 0
        for head in range(H):
            s = torch.stack(
                [
                    ((q[:, p, head] + u[head]) * k[:, j, head]).sum(-1)
                    + ((q[:, p, head] + v[head]) * rel[p - j, head]).sum(-1)
                    for j in keys
                ],
                -1,
            )
            a = torch.softmax(s / math.sqrt(Dh), -1)  # (B, n_keys)
            out[:, p, head] = (a[..., None] * torch.stack([val[:, j, head] for j in keys], 1)).sum(1)
        if b == 0:
            continue  # empty LTM
        coeffs = versions[b // inf.ltm_block]  # (B, N, D)
        K = (coeffs @ attn.ltm.key.weight.T).view(B, N, H, Dh)
        V = (coeffs @ attn.ltm.value.weight.T).view(B, N, H, Dh)
        for head in range(H):
            s = (K[:, :, head] @ q[:, p, head, :, None])[..., 0] / math.sqrt(Dh)  # (B, N)
            mu = torch.sigmoid(s @ attn.ltm.mu.weight[0])
            var = torch.nn.functional.softplus(s @ attn.ltm.sigma.weight[0]).clamp_min(inf.min_var)
            r = expected_basis(mu, var, memory.centres, memory.widths)  # (B, N)
            context[:, p, head] = (r[:, :, None] * V[:, :, head]).sum(1)
            masses[b // inf.ltm_block] += bin_mass(mu, var.sqrt(), inf.sticky_bins)
    if inf.ltm_out == "shared":  # per head, before the attention's output projection
        return attn.out_proj((out + context).reshape(B, n, D))
    assert attn.ltm_proj.bias is None  # "separate": its own projection, added after the attention's
    return attn.out_proj(out.reshape(B, n, D)) + context.reshape(B, n, D) @ attn.ltm_proj.weight.T


def _naive_decoder(decoder: InfiniteDecoder, x: Tensor) -> Tensor:
    for block in decoder.blocks:
        u = decoder.pos_bias_u if decoder.pos_bias_u is not None else block.mix.pos_bias_u
        v = decoder.pos_bias_v if decoder.pos_bias_v is not None else block.mix.pos_bias_v
        x = x + _naive_layer(block, decoder, x, u, v)
        x = x + block.mlp(block.norm_mlp(x))
    return x


@pytest.mark.parametrize("variant", ["plain", *VARIANTS])
def test_decoder_matches_naive_reference(make_tiny_model: Callable[..., LongContextLM], variant: str) -> None:
    model = make_tiny_model("infinite", infinite={**TINY, **VARIANTS.get(variant, {})})
    decoder = model.decoder
    x = torch.randn(2, 17, model.cfg.d_model)
    with torch.no_grad():
        expected = _naive_decoder(decoder, x)
        whole = decoder(x, decoder.init_state(2, None, torch.float32))
        torch.testing.assert_close(whole.hidden, expected, atol=ATOL, rtol=0)
        assert whole.state.coeffs.abs().sum() > 0 and int(whole.state.position[0]) == 17
        state, outs = decoder.init_state(2, None, torch.float32), []
        for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 10), (10, 17)]:
            out = decoder(x[:, lo:hi], state)
            outs.append(out.hidden)
            state = out.state
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(state.coeffs, whole.state.coeffs, atol=ATOL, rtol=0)
        torch.testing.assert_close(state.mass, whole.state.mass, atol=ATOL, rtol=0)


def test_long_term_memory_changes_the_output(make_tiny_model) -> None:
    """The same exact windows with and without the LTM's contribution differ: the LTM is read."""
    model = make_tiny_model("infinite", infinite=TINY)
    tokens = _tokens(model, 2, 20)
    with torch.no_grad():
        base = model(tokens, model.init_state(2)).logits
        for block in model.decoder.blocks:
            block.mix.ltm.value.weight.zero_()
        without = model(tokens, model.init_state(2)).logits
    change = (base - without).abs().amax(dim=(0, 2))  # (T,)
    assert (change[:5] == 0).all()  # b(p) = 0 before position 5: no LTM yet
    assert (change[5:] > 1e-5).all()


def test_gate_is_x_times_sigmoid_of_a_kernel_3_convolution(make_tiny_model) -> None:
    model = make_tiny_model("infinite", infinite={**TINY, "gate": True})
    attn = model.decoder.blocks[0].mix
    x = torch.randn(2, 5, model.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(attn.gated(x), _naive_gate(attn.gate, x), atol=1e-6, rtol=0)
        # the block's first token does not see anything before the block, its last nothing after it (zero padding)
        y = x.clone()
        y[:, 2] += 1.0
        changed = (attn.gated(y) - attn.gated(x)).abs().amax(dim=(0, 2))
    assert changed.tolist()[:1] == [0.0] and changed.tolist()[4:] == [0.0] and (changed[1:4] > 0).all()
    plain = make_tiny_model("infinite", infinite=TINY).decoder.blocks[0].mix
    assert plain.gate is None and plain.gated(x) is x


def test_separate_output_matches_hand_computation(make_tiny_model) -> None:
    """One layer: the attention's output is out_proj(STM heads) + W_O^LTM (V^T r), with the LTM context taken from
    the module and projected by hand, and the block adds it to the residual stream as any attention output."""
    model = make_tiny_model("infinite", n_layer=1, infinite={**TINY, "ltm_out": "separate"})
    decoder, block = model.decoder, model.decoder.blocks[0]
    attn = block.mix
    std = model.cfg.init_std / math.sqrt(2 * model.cfg.n_layer)
    assert attn.ltm_proj is not None and attn.ltm_proj.bias is None
    assert attn.ltm_proj.weight.shape == attn.out_proj.weight.shape
    assert abs(attn.ltm_proj.weight.std().item() - std) < 0.2 * std  # initialised like out_proj
    x = torch.randn(2, 11, model.cfg.d_model)
    captured: list[tuple[Tensor, Tensor]] = []
    hook = attn.register_forward_hook(lambda module, args, output: captured.append((output[0], output[2].context)))
    with torch.no_grad():
        out = decoder(x, decoder.init_state(2, None, torch.float32)).hidden
        weight = attn.ltm_proj.weight.clone()
        attn.ltm_proj.weight.zero_()  # the same layer without the LTM's output: the short-term part alone
        decoder(x, decoder.init_state(2, None, torch.float32))
    hook.remove()
    (a_full, context), (a_stm, _) = captured
    B, H, T, Dh = context.shape
    ltm_part = context.transpose(1, 2).reshape(B, T, H * Dh) @ weight.T  # heads merged, then W_O^LTM
    assert ltm_part[:, :5].abs().max() == 0 and ltm_part[:, 5:].abs().amax(-1).gt(0).all()  # LTM from p = 5 on
    torch.testing.assert_close(a_full, a_stm + ltm_part, atol=1e-6, rtol=0)
    y = x + a_full
    torch.testing.assert_close(out, y + block.mlp(block.norm_mlp(y)), atol=1e-6, rtol=0)


def test_output_form_and_gate_change_the_output(make_tiny_model) -> None:
    """ "shared" is "separate" with W_O^LTM tied to W_O (the maps are linear); an own W_O^LTM, or the gate, changes the
    output of the same weights once the LTM is read."""
    shared = make_tiny_model("infinite", infinite=TINY)
    separate = make_tiny_model("infinite", infinite={**TINY, "ltm_out": "separate"})
    missing, unexpected = separate.load_state_dict(shared.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == [f"decoder.blocks.{i}.mix.ltm_proj.weight" for i in range(2)]
    gated = make_tiny_model("infinite", infinite={**TINY, "gate": True})
    gated.load_state_dict(shared.state_dict(), strict=False)
    tokens = _tokens(shared, 2, 20)

    def run(model: LongContextLM) -> Tensor:
        return model(tokens, model.init_state(2)).logits

    with torch.no_grad():
        logits = {"shared": run(shared), "separate": run(separate), "gated": run(gated)}
        for block, twin in zip(separate.decoder.blocks, shared.decoder.blocks, strict=True):
            block.mix.ltm_proj.weight.copy_(twin.mix.out_proj.weight)
        torch.testing.assert_close(run(separate), logits["shared"], atol=1e-5, rtol=0)
    for name in ("separate", "gated"):
        change = (logits[name] - logits["shared"]).abs().amax(dim=(0, 2))  # (T,)
        assert (change[:5] == 0).all(), name  # b(p) = 0 before position 5: the same model
        assert change[5:].amin() > 1e-4, name


def test_gate_learns_when_the_block_comes_from_the_detached_cache(make_tiny_model) -> None:
    """The official layout (mem_len = ltm_block = segment): every block is refitted from the previous segment's
    inputs, detached between steps (truncated BPTT). The refit runs in the call of its first reader, so the gate and
    the LTM's output projection still get gradients (they would not if the refit ran at the end of the previous
    call and the state were detached)."""
    model = make_tiny_model(
        "infinite", n_layer=1, infinite={**TINY, "mem_len": 4, "ltm_block": 4, "gate": True, "ltm_out": "separate"}
    ).train()
    tokens = _tokens(model, 2, 16)
    state = model.init_state(2)
    for lo in range(0, 16, 4):
        out = model(tokens[:, lo : lo + 4], state, tokens[:, lo : lo + 4])
        state = out.state.detach()
    # the last segment (p = 12..15) reads the version fitted on tokens 4..7 (b = 8), refitted in this call
    gate = model.decoder.blocks[0].mix.gate
    params = [gate.weight, gate.bias, model.decoder.blocks[0].mix.ltm_proj.weight]
    grads = torch.autograd.grad(out.loss, params)
    assert all(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------------------------------------------------
# schedule


def test_schedule_windows_groups_and_refits() -> None:
    mem_len, block = 3, 2
    sched = make_schedule([0, 6], 5, mem_len, block, torch.device("cpu"))
    # exact window: the query at p sees distances 0 .. p - b(p)
    for row, start in enumerate((0, 6)):
        for t in range(5):
            p = start + t
            reach = p - max(0, block * ((p - mem_len) // block))
            allowed = (sched.valid[row, 0, t] == 0).nonzero().flatten().tolist()
            W = mem_len + block
            assert allowed == list(range(W - 1 - reach, W)), (p, allowed)
            assert reach == p or mem_len <= reach <= mem_len + block - 1
    # refits are lazy: a row's state holds the version of b(p - 1), the call of the first query of a version refits.
    # Row 0 (p = 0..4) reads version 0 (empty) only and refits nothing (version 1 is first read at p = 5); row 1
    # (p = 6..10, b = 2, 4, 4, 6, 6) starts at version 1 (b(5) = 2), reads it, refits to 2 and 3 and reads them
    assert len(sched.groups) == 3 and len(sched.refits) == 2
    g0, g1, g2 = sched.groups
    assert g0 is not None and g0.mask.tolist() == [[False], [True]] and (g0.t0, g0.t1) == (0, 1)
    assert g1 is not None and (g1.t0, g1.t1) == (1, 3) and g1.mask.tolist() == [[False, False], [True, True]]
    assert g2 is not None and (g2.t0, g2.t1) == (3, 5) and g2.mask.tolist() == [[False, False], [True, True]]
    first, second = sched.refits
    assert first.rows.tolist() == [False, True] and first.first.tolist() == [False, False]
    # the LTM inputs of [cache ; segment] have C + 1 = 5 cache slots: row 1's cache holds tokens 1 .. 5
    assert first.slots[1].tolist() == [1, 2]  # tokens 2, 3
    assert second.rows.tolist() == [False, True] and second.slots[1].tolist() == [3, 4]  # tokens 4, 5
    # a fresh row whose first segment reaches p = 5 fits version 1 alone, from its own tokens 0, 1
    fresh = make_schedule([0], 6, mem_len, block, torch.device("cpu"))
    assert len(fresh.refits) == 1 and fresh.refits[0].first.tolist() == [True]
    assert fresh.refits[0].slots.tolist() == [[5, 6]]
    # deterministic: the same positions give the same schedule
    again = make_schedule([0, 6], 5, mem_len, block, torch.device("cpu"))
    assert torch.equal(again.valid, sched.valid) and len(again.groups) == len(sched.groups)


def _same_schedule(a: Any, b: Any) -> bool:
    def group(g: Any) -> Any:
        return None if g is None else (g.t0, g.t1, g.count, g.mask.tolist())

    def refit(r: Any) -> Any:
        flags = (r.any_first, r.any_update, r.every_row, r.in_cache)
        return (r.rows.tolist(), r.first.tolist(), r.slots.tolist(), flags)

    return (
        torch.equal(a.valid, b.valid)
        and a.floors == b.floors
        and torch.equal(a.version, b.version)
        and [group(g) for g in a.groups] == [group(g) for g in b.groups]
        and [refit(r) for r in a.refits] == [refit(r) for r in b.refits]
    )


def test_schedule_is_periodic_after_the_second_version() -> None:
    """Small calls keep their schedules by the position's phase in the refit cycle: from mem_len + 2 ltm_block on,
    a position and the one a cycle later have the same schedule, in every part."""
    cpu = torch.device("cpu")
    for mem_len, block in ((3, 2), (4, 4), (2, 5)):
        start = mem_len + 2 * block
        for T in (1, 2, 7):
            for p in range(start, start + 2 * block):
                for other in (0, 5, start + 1):  # a second row elsewhere: fresh, early, periodic
                    here = make_schedule([p, other], T, mem_len, block, cpu)
                    for cycles in (1, 3):
                        later = make_schedule([p + cycles * block, other], T, mem_len, block, cpu)
                        assert _same_schedule(here, later), (mem_len, block, T, p, other, cycles)


def test_kept_schedules_serve_training_after_inference(make_tiny_model) -> None:
    """A schedule kept by a call in inference mode is made of plain tensors: a training call of the same shape (which
    saves them for its backward) can use it."""
    model = make_tiny_model("infinite", infinite=TINY)
    tokens = _tokens(model, 1, 40)
    with torch.inference_mode():
        state = model.init_state(1)
        for t in range(20):
            state = model(tokens[:, t : t + 1], state).state
    state = InfiniteState.from_tensors({k: v.clone() for k, v in state.to_tensors().items()})  # plain tensors
    model.train()
    out = model(tokens[:, 20:21], state, tokens[:, 21:22])
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_sticky_quantiles_are_deterministic(make_tiny_model) -> None:
    model = make_tiny_model("infinite", infinite={**TINY, "sticky": True})
    tokens = _tokens(model, 2, 24)
    with torch.no_grad():
        a = model(tokens, model.init_state(2))
        b = model(tokens, model.init_state(2))
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.state.coeffs, b.state.coeffs) and torch.equal(a.state.mass, b.state.mass)
    with torch.no_grad():  # and the sticky samples differ from the uniform ones: the histogram matters
        plain = make_tiny_model("infinite", infinite=TINY)
        assert not torch.allclose(plain(tokens, plain.init_state(2)).state.coeffs, a.state.coeffs, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# gradients, regulariser, stats


def test_gradients_reach_the_ltm_parameters_but_not_old_coefficients(make_tiny_model) -> None:
    model = make_tiny_model("infinite", n_layer=1, infinite={**TINY, "gate": True}).train()  # one layer: see below
    tokens = _tokens(model, 2, 30)
    with torch.no_grad():
        warm = model(tokens[:, :10], model.init_state(2)).state  # position 10: version 3 (b(9) = 6) in the state
    coeffs = warm.coeffs.clone().requires_grad_(True)
    state = InfiniteState(**{**warm.tensors(), "coeffs": coeffs})
    out = model(tokens[:, 10:], state, tokens[:, 10:])  # p = 10 reads version 3; refits at positions 11, 13, ...
    params = [p for name, p in model.named_parameters() if ".ltm." in name or ".gate." in name]
    assert len(params) == 6  # W_K, W_V, w_mu, w_sigma, gate weight and bias
    grads = torch.autograd.grad(out.loss + out.aux_loss, params, retain_graph=True)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # queries after the first refit (p >= 11, t >= 1) and the next state do not depend on the old coefficients (with
    # more layers they would, legitimately: a later layer attends exactly to tokens whose first layer read them)
    for later in (out.logits[:, 1:].square().sum(), out.state.coeffs.sum()):
        (grad,) = torch.autograd.grad(later, coeffs, allow_unused=True, retain_graph=True)
        assert grad is None or (grad == 0).all()
    early = out.logits[:, :1].square().sum()  # ... while the query before it reads them
    assert torch.autograd.grad(early, coeffs)[0].abs().sum() > 0


def test_kl_regulariser_and_stats(make_tiny_model) -> None:
    model = make_tiny_model("infinite", infinite={**TINY, "kl_weight": 0.5}).train()
    tokens = _tokens(model, 2, 12)
    early = model(tokens[:, :4], model.init_state(2), tokens[:, :4])  # no LTM yet: no KL, no stats
    assert early.aux_loss.item() == 0.0 and early.stats == {}
    out = model(tokens, model.init_state(2), tokens)
    assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad
    assert set(out.stats) == {f"ltm/layer{i}_{k}" for i in range(2) for k in ("mu", "sigma")}
    assert all(0 < out.stats[f"ltm/layer{i}_mu"] < 1 for i in range(2))
    assert all(out.stats[f"ltm/layer{i}_sigma"] >= math.sqrt(1e-6) for i in range(2))
    weight_two = make_tiny_model("infinite", infinite={**TINY, "kl_weight": 1.0}).train()
    torch.testing.assert_close(weight_two(tokens, weight_two.init_state(2)).aux_loss, 2 * out.aux_loss.detach())
    model.eval()
    evaluated = model(tokens, model.init_state(2), tokens)
    assert evaluated.aux_loss.item() == 0.0 and evaluated.stats == {}


@pytest.mark.parametrize("sticky", [False, True])
def test_stats_of_rows_at_different_positions_pool_the_rows(make_tiny_model, sticky: bool) -> None:
    """Rows at different positions read different LTM versions at a query: the layer's mean mu and sigma over a batch
    are the count-weighted means of the rows' own (each query counted once, against its own version)."""
    model = make_tiny_model("infinite", infinite={**TINY, "sticky": sticky}).train()
    tokens = _tokens(model, 2, 24)
    prefixes = (1, 8)  # row 0 reads positions 1..10 (the first 4 with an empty LTM), row 1 positions 8..17
    states = []
    for row, start in enumerate(prefixes):
        with torch.no_grad():
            states.append(model(tokens[row : row + 1, :start], model.init_state(1)).state)
    T, inf = 10, model.cfg.infinite

    def segment(row: int) -> Tensor:
        return tokens[row : row + 1, prefixes[row] : prefixes[row] + T]

    with torch.no_grad():
        rows = [model(segment(row), states[row]) for row in range(2)]
        batch = model(torch.cat([segment(0), segment(1)]), InfiniteState.concat(states))
    counts = [
        sum(g.count for g in make_schedule([p], T, inf.mem_len, inf.ltm_block, "cpu").groups if g) for p in prefixes
    ]
    assert all(counts) and counts[0] != counts[1]
    for name, value in batch.stats.items():
        pooled = sum(c * out.stats[name] for c, out in zip(counts, rows, strict=True)) / sum(counts)
        assert value == pytest.approx(pooled, rel=1e-5), name


def test_no_nan_for_extreme_sigma(make_tiny_model) -> None:
    model = make_tiny_model("infinite", infinite=TINY).train()
    tokens = _tokens(model, 2, 20)
    for scale in (1e4, -1e4):  # sigma^2 = softplus(huge) ~ 1e4+, or clamped at min_var
        with torch.no_grad():
            for block in model.decoder.blocks:
                block.mix.ltm.sigma.weight.fill_(scale)
        out = model(tokens, model.init_state(2), tokens)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
        grads = torch.autograd.grad(out.loss + out.aux_loss, [p for p in model.parameters() if p.requires_grad])
        assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------------------------------
# state: bounded, checked with every variant through the shared contract checks


def test_state_size_is_the_same_after_1k_and_100k_tokens(make_tiny_model) -> None:
    model = make_tiny_model(
        "infinite",
        n_layer=1,
        infinite={
            "mem_len": 16,
            "ltm_block": 64,
            "n_basis": 16,
            "sigmas": [0.05, 0.1],
            "n_samples": 16,
            "sticky": True,
            "sticky_bins": 8,
        },
    )
    decoder = model.decoder
    state = decoder.init_state(1, None, torch.float32)
    expected = state.nbytes()
    assert expected == 4 * (2 * 2 * 79 * 16 + 80 * 32 + 16 * 32 + 8) + 8  # keys, values, inputs, coeffs, mass, pos
    sizes = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        while int(state.position[0]) < 100_000:
            state = decoder(
                torch.randn(1, 4950 if int(state.position[0]) >= 1000 else 1000, 32, generator=g), state
            ).state
            sizes[int(state.position[0])] = state.nbytes()
    assert sizes[1000] == sizes[100_000] == expected
    assert torch.isfinite(state.coeffs).all() and state.coeffs.abs().max() < 1e3


# --------------------------------------------------------------------------------------------------------------------
# presets, config, describe


@pytest.mark.parametrize("preset,sticky", [("infinite-small", False), ("infinite-sticky-small", True)])
def test_presets_build(preset: str, sticky: bool) -> None:
    config = load_config(preset)
    assert config.model.decoder == "infinite" and config.model.infinite.sticky == sticky
    assert config.model.infinite.gate and config.model.infinite.ltm_out == "separate"  # the official form: A/B winner
    assert (config.model.n_layer, config.model.d_model, config.model.n_head, config.model.d_ff) == (6, 256, 4, 1024)
    assert config.train.seq_len == 256 and config.train.batch_size == 8
    model = build_model(config.model)
    assert isinstance(model.init_state(1), InfiniteState)
    info = model.decoder.describe()
    assert info["sticky"] == sticky and info["n_basis"] == config.model.infinite.n_basis
    assert info["ltm_out"] == config.model.infinite.ltm_out and info["gate"] == config.model.infinite.gate


def test_tiny_preset_is_the_quick_starts_and_trains(tmp_path) -> None:
    """infinite-tiny: the default decoder in its official form, narrowed for a CPU quick start; its warm-up ends well
    inside its run, and it trains a couple of steps on a sliver of the bundled corpus (batch and data shrunk)."""
    from longctx.train import RunOptions, train

    config = load_config("infinite-tiny")
    assert config.model.decoder == "infinite" and config.model.infinite.gate
    assert config.model.infinite.ltm_out == "separate"
    assert (config.model.n_layer, config.model.d_model, config.train.seq_len) == (4, 128, 128)
    assert config.model.infinite.mem_len == config.model.infinite.ltm_block == config.train.seq_len
    assert config.train.warmup_steps <= config.train.max_steps // 4
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"doc{i}.txt").write_text("To be, or not to be, that is the question. " * 30)
    tiny = load_config(
        "infinite-tiny",
        {
            "train.batch_size": 2,
            "train.max_steps": 2,
            "train.threads": 1,
            "train.eval_tokens": 512,
            "data.paths": [str(data)],
            "data.cache_dir": str(tmp_path / "cache"),
        },
    )
    out = tmp_path / "run"
    train(tiny, RunOptions(out_dir=out, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.parametrize(
    "key,value",
    [
        ("n_basis", 0),
        ("n_basis", 5),
        ("sigmas", []),
        ("sigmas", [0.01, -1.0]),
        ("tau", 1.0),
        ("tau", 0.0),
        ("ridge", 0.0),
        ("min_var", 0.0),
        ("kl_sigma0", 0.0),
        ("kl_weight", -1.0),
        ("mem_len", 0),
        ("ltm_block", 0),
        ("n_samples", 0),
        ("sticky_bins", 0),
        ("ltm_out", "both"),
    ],
)
def test_config_rejects_bad_values(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"model.infinite.{key}"):
        load_config("transformer-small", {"model.decoder": "infinite", f"model.infinite.{key}": value})
