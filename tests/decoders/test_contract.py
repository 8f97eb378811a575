"""The decoder contract (``longctx/decoders/base.py``), checked for every entry of ``DECODERS``.

Every test runs a tiny model (``tests/conftest.py``) in eval mode, fp32, on the CPU, through the public
``LongContextLM.init_state`` / ``forward``: a decoder registered later gets these tests without any change here.
The checks put their inputs on the model's device, so ``test_cuda.py`` runs them on a GPU too (:func:`run_check`).

Tolerances. Logits of the tiny models are ~0.1 in magnitude. Computing the same logits through different call
patterns (one call, segments, token by token) only changes the order of fp32 accumulations (matmul blocking, softmax
over a different number of masked keys), which moves them by ~1e-7..1e-6 here; ``ATOL = 1e-4`` leaves two orders of
magnitude of headroom while the smallest real effect a test relies on (a token two layers and a full receptive field
away) is ~5e-4 and direct effects are ~1e-2. Comparisons of computations that see bitwise-identical inputs through the
same shapes use ``EXACT_ATOL = 1e-6``; "this changed" means a change larger than ``CHANGED = 1e-5``.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import Tensor

from longctx.decoders import State
from longctx.model import LMOutput, LongContextLM, inference

ATOL = 1e-4  # different call patterns: fp32 accumulation-order differences are ~1e-6 here (see module docstring)
EXACT_ATOL = 1e-6  # same inputs, same shapes: at most last-bit differences
CHANGED = 1e-5  # a real influence is >= ~5e-4 here; fp32 noise is <= ~1e-6


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _tokens(model: LongContextLM, batch: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g).to(model.device)


def _run(model: LongContextLM, tokens: Tensor, state: State, sizes: list[int]) -> tuple[Tensor, State]:
    """Feed ``tokens`` in consecutive chunks of ``sizes``; return the concatenated logits and the final state."""
    assert sum(sizes) == tokens.shape[1], (sizes, tokens.shape)
    logits, start = [], 0
    for size in sizes:
        out = model(tokens[:, start : start + size], state)
        logits.append(out.logits)
        state, start = out.state, start + size
    return torch.cat(logits, dim=1), state


def _random_partition(length: int, memory: int, seed: int) -> list[int]:
    """Chunk sizes summing to ``length``: always one chunk of 1 and one longer than ``memory``, the rest random."""
    rng = random.Random(seed)
    sizes = [1, memory + 1 + rng.randrange(memory)]
    remaining = length - sum(sizes)
    assert remaining >= 0
    while remaining:
        size = rng.randint(1, min(remaining, 2 * memory))
        sizes.append(size)
        remaining -= size
    rng.shuffle(sizes)
    return sizes


def _snapshot(state: State) -> dict[str, Tensor]:
    # clone: to_tensors() may return the very same (contiguous, CPU) tensors, which would hide in-place changes
    return {k: v.detach().clone() for k, v in state.tensors().items()}


def _assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"state field {name!r} differs"


def _close(actual: Tensor, expected: Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _with_separator(model: LongContextLM, reset: bool = True) -> tuple[LongContextLM, int]:
    """The same model (shared weights) with the last vocabulary id as its document separator."""
    sep = model.cfg.vocab_size - 1
    clone = LongContextLM(dataclasses.replace(model.cfg, separator_id=sep, reset_at_separator=reset)).eval()
    clone.to(model.device)
    clone.load_state_dict(model.state_dict())
    return clone, sep


def _text(model: LongContextLM, length: int, seed: int) -> Tensor:
    """(length,) random tokens that are never the separator (the last id)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size - 1, (length,), generator=g).to(model.device)


# --------------------------------------------------------------------------------------------------------------------
# 1. bounded memory


def test_state_size_does_not_grow_with_stream_length(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    initial = model.init_state(2)
    expected = initial.nbytes()
    assert expected > 0
    with torch.no_grad():
        for factor in (2, 20):
            length = factor * mem
            tokens = _tokens(model, 2, length, seed=factor)
            state, start = initial, 0
            for size in _random_partition(length, mem, seed=factor):
                state = model(tokens[:, start : start + size], state).state
                start += size
                assert state.nbytes() == expected, f"nbytes {state.nbytes()} != {expected} after {start} tokens"
            assert start == length


# --------------------------------------------------------------------------------------------------------------------
# 2. chunking invariance


def test_chunking_invariance(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    length = 3 * mem + 5  # more than three memory lengths: the memory fills, wraps and is read across boundaries
    tokens = _tokens(model, 2, length)
    with torch.no_grad():
        whole = model(tokens, model.init_state(2)).logits
        assert whole.shape == (2, length, model.cfg.vocab_size)
        one_by_one, _ = _run(model, tokens, model.init_state(2), [1] * length)
        _close(one_by_one, whole, ATOL)
        for seed in range(4):
            sizes = _random_partition(length, mem, seed)
            chunked, _ = _run(model, tokens, model.init_state(2), sizes)
            _close(chunked, whole, ATOL)
        # the final state must also carry the same memory: continue both runs by one more segment
        more = _tokens(model, 2, mem + 3, seed=99)
        _, state_whole = _run(model, tokens, model.init_state(2), [length])
        _, state_tokens = _run(model, tokens, model.init_state(2), [1] * length)
        _close(model(more, state_tokens).logits, model(more, state_whole).logits, ATOL)


# --------------------------------------------------------------------------------------------------------------------
# 3. causality


@pytest.mark.parametrize("chunked", [False, True], ids=["one-call", "chunked"])
def test_causality(tiny_model: LongContextLM, tiny_memory_length: int, chunked: bool) -> None:
    model, mem = tiny_model, tiny_memory_length
    length = 2 * mem + 6
    tokens = _tokens(model, 2, length)
    sizes = _random_partition(length, mem, seed=7) if chunked else [length]
    with torch.no_grad():
        base, _ = _run(model, tokens, model.init_state(2), sizes)
        for t in (0, mem // 2, mem + 1, length - 1):
            perturbed = tokens.clone()
            perturbed[:, t] = (perturbed[:, t] + 1 + torch.arange(2, device=model.device)) % model.cfg.vocab_size
            logits, _ = _run(model, perturbed, model.init_state(2), sizes)
            _close(logits[:, :t], base[:, :t], EXACT_ATOL)
            change_at_t = (logits[:, t] - base[:, t]).abs().amax(dim=-1)  # (B,)
            assert (change_at_t > CHANGED).all(), f"changing token {t} did not change its own logits: {change_at_t}"


# --------------------------------------------------------------------------------------------------------------------
# state is a value


def test_forward_never_mutates_its_input_state(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 4 * mem)
    with torch.no_grad():
        fresh = model.init_state(2)
        fresh_before = _snapshot(fresh)
        warm = model(tokens[:, : mem + 2], fresh).state  # a state holding real memory, not only zeros
        _assert_same_tensors(_snapshot(fresh), fresh_before)

        warm_before = _snapshot(warm)
        first = model(tokens[:, mem + 2 : 2 * mem], warm)
        # keep going from the output: catches an output state that aliases the input and is then updated in place
        second = model(tokens[:, 2 * mem :], first.state)
        model(tokens[:, 2 * mem : 2 * mem + 1], second.state)
        _assert_same_tensors(_snapshot(warm), warm_before)

        # and the same call on the same state gives the same result (no hidden state on the module)
        again = model(tokens[:, mem + 2 : 2 * mem], warm)
        _close(again.logits, first.logits, EXACT_ATOL)


def test_continuations_of_one_state_are_independent(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """Inference may write a step's new cache entries in place after the state's own (no copy of the cache per token):
    two continuations of one state, stepped token by token in turn, must each get what a copy of the state gives."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, mem + 2)
    steps = mem + 3  # past the cache length: the entries written in place replace the oldest ones
    a, b = _tokens(model, 2, steps, seed=1), _tokens(model, 2, steps, seed=2)
    with torch.no_grad():
        warm = model(tokens, model.init_state(2)).state
        before = _snapshot(warm)
        copy = type(warm).from_tensors({k: v.clone() for k, v in warm.to_tensors().items()})
        expected_a, _ = _run(model, a, copy, [1] * steps)
        expected_b, _ = _run(model, b, copy, [1] * steps)
        state_a = state_b = warm
        got_a, got_b = [], []
        for t in range(steps):  # in turn: each step of one continuation follows a step of the other
            out_a = model(a[:, t : t + 1], state_a)
            out_b = model(b[:, t : t + 1], state_b)
            state_a, state_b = out_a.state, out_b.state
            got_a.append(out_a.logits)
            got_b.append(out_b.logits)
        _close(torch.cat(got_a, dim=1), expected_a, EXACT_ATOL)
        _close(torch.cat(got_b, dim=1), expected_b, EXACT_ATOL)
        _assert_same_tensors(_snapshot(warm), before)


def test_a_state_made_in_inference_mode_continues_under_no_grad(
    tiny_model: LongContextLM, tiny_memory_length: int
) -> None:
    """bf16 inference runs under ``no_grad``, fp32 under ``inference_mode``: a state made in one (its tensors
    inference tensors, which may only be written in inference mode) continues token by token in the other."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, mem + 6)
    with torch.inference_mode():
        state = model(tokens[:, :mem], model.init_state(2)).state
        state = model(tokens[:, mem : mem + 1], state).state  # the newest view of a buffer with room after it
    with torch.no_grad():
        got, _ = _run(model, tokens[:, mem + 1 :], state, [1] * 5)
    with torch.inference_mode():
        expected, _ = _run(model, tokens[:, mem + 1 :], state, [1] * 5)
    _close(got, expected, EXACT_ATOL)


def test_bf16_caches_read_like_float32_caches(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """Under bf16 autocast the keys and values a decoder caches are bf16 values already: a state whose ``PROJECTED``
    fields are bf16 (``init_state(cache_dtype=...)``, how ``eval --precision bf16`` reads) gives bitwise the same
    logits as float32 caches, in segments and token by token, and its caches stay bf16 while the other fields keep
    float32 (sums, summaries and coefficients need it)."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 3 * mem + 8)
    sizes = _random_partition(3 * mem + 8, mem, seed=3)
    with inference(model, "bf16"):
        expected, wide = _run(model, tokens, model.init_state(2), sizes)
        got, narrow = _run(model, tokens, model.init_state(2, cache_dtype=torch.bfloat16), sizes)
    assert torch.equal(got, expected)
    for name, t in narrow.tensors().items():
        if t.is_floating_point():
            want = torch.bfloat16 if name in model.decoder.PROJECTED else wide.tensors()[name].dtype
            assert t.dtype == want, name
    assert all(wide.tensors()[name].dtype == torch.float32 for name in model.decoder.PROJECTED)


def test_repeated_calls_give_the_same_bits(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """Inference may keep tables between calls (the first call makes a table for itself, a later one keeps it): the
    same call on the same state gives bitwise the same logits whether a table was made or kept."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, mem + 3)
    with torch.no_grad():
        state = model(tokens[:, :mem], model.init_state(2)).state
        for sizes in ([1], [3]):
            segment = tokens[:, mem : mem + sizes[0]]
            first, second, third = (model(segment, state).logits for _ in range(3))
            assert torch.equal(first, second) and torch.equal(first, third)


def test_inference_follows_weights_changed_in_place(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """Decoders may keep tables made from the weights between inference calls (e.g. projected position tables); a
    change of the weights in place (what an optimiser step or ``load_state_dict`` does) must show in the next call,
    in segments and token by token, as in a model built from the changed weights."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 2 * mem + 4)
    head, tail = tokens[:, : mem + 2], tokens[:, mem + 2 :]
    sizes = [3, 1, 1, tail.shape[1] - 5]
    with torch.no_grad():
        state = model(head, model.init_state(2)).state
        before, _ = _run(model, tail, state, sizes)  # the tables of the old weights are made here
        model(tail[:, :1], state)  # ... and last for what the state's own memory gives (the first call below)
        for p in model.parameters():
            p.mul_(1.25)
        after, _ = _run(model, tail, state, sizes)
        fresh = LongContextLM(model.cfg).to(model.device).eval()
        fresh.load_state_dict(model.state_dict())
        expected, _ = _run(fresh, tail, state, sizes)
    _close(after, expected, EXACT_ATOL)
    assert (after - before).abs().amax() > CHANGED


def test_inference_and_recording_paths_agree(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """With autograd off, decoders may write their caches into shared buffers (the next state a view of them); with
    autograd on they concatenate. Both must give the same logits and carry the same memory, segment after segment."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 3 * mem + 5, seed=3)
    sizes = _random_partition(tokens.shape[1], mem, seed=3)
    with torch.no_grad():
        fast, fast_state = _run(model, tokens, model.init_state(2), sizes)
    with torch.enable_grad():
        slow, slow_state = _run(model, tokens, model.init_state(2), sizes)
    _close(fast, slow.detach(), EXACT_ATOL)
    for name, value in slow_state.tensors().items():
        _close(fast_state.tensors()[name].float(), value.detach().float(), EXACT_ATOL)


def test_reset_rows_behave_like_a_fresh_state(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    batch = 3
    mask = torch.tensor([True, False, True], device=model.device)
    history, nxt = _tokens(model, batch, 2 * mem + 3, seed=1), _tokens(model, batch, mem + 2, seed=2)
    with torch.no_grad():
        warm = model(history, model.init_state(batch)).state
        reset = warm.reset(mask)
        assert type(reset) is type(warm)

        fresh_logits = model(nxt, model.init_state(batch)).logits
        warm_logits = model(nxt, warm).logits
        reset_logits = model(nxt, reset).logits

        # the test can fail: the memory of the masked rows does change their logits before the reset
        assert (warm_logits[mask] - fresh_logits[mask]).abs().amax() > CHANGED
        _close(reset_logits[mask], fresh_logits[mask], EXACT_ATOL)
        _close(reset_logits[~mask], warm_logits[~mask], EXACT_ATOL)

        # state level: unmasked rows are untouched; masked rows equal the fresh state's rows
        fresh_tensors = model.init_state(batch).tensors()
        for name, t in reset.tensors().items():
            assert torch.equal(t[~mask], warm.tensors()[name][~mask]), name
            assert torch.equal(t[mask], fresh_tensors[name][mask]), name

        # an all-false mask is the identity
        _assert_same_tensors(_snapshot(warm.reset(torch.zeros(batch, dtype=torch.bool))), _snapshot(warm))


def test_reset_clears_non_finite_memory(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """Resetting a lane whose memory diverged (NaN/inf) must give a clean, fresh lane."""
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 2 * mem + 3)
    mask = torch.tensor([True, False])
    with torch.no_grad():
        warm = model(tokens[:, : mem + 1], model.init_state(2)).state
        poisoned = {}
        for name, t in warm.tensors().items():
            t = t.clone()
            if t.is_floating_point():
                t[0] = float("nan")
            poisoned[name] = t
        reset = dataclasses.replace(warm, **poisoned).reset(mask)
        logits = model(tokens[:, mem + 1 :], reset).logits
        fresh = model(tokens[:, mem + 1 :], model.init_state(2)).logits
    assert torch.isfinite(logits[0]).all()
    _close(logits[0], fresh[0], EXACT_ATOL)


def test_select_and_concat_split_and_join_lanes(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 3, 2 * mem + 2)
    with torch.no_grad():
        state = model(tokens[:, : mem + 1], model.init_state(3)).state
        expected = model(tokens[:, mem + 1 :], state).logits
        parts = [state.select(torch.tensor([2])), state.select(torch.tensor([0, 1]))]
        _close(model(tokens[1:2, mem + 1 :], parts[1].select(torch.tensor([1]))).logits, expected[1:2], ATOL)
        joined = type(state).concat(parts)
        assert joined.nbytes() == state.nbytes()
        # rows come back in the order they were joined: [2, 0, 1]
        _close(model(tokens[[2, 0, 1], mem + 1 :], joined).logits, expected[[2, 0, 1]], ATOL)


def test_detach_cuts_the_graph(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 3 * mem)
    seg1, seg2 = tokens[:, : mem + 3], tokens[:, mem + 3 :]

    old = model(seg1, model.init_state(2)).state  # built with autograd on: depends on the parameters
    old_grad = {k: v for k, v in old.tensors().items() if v.requires_grad}
    assert old_grad, "no state tensor depends on the parameters: detach() would have nothing to cut"

    # without detach, a loss on the next segment reaches the old state tensors (so the check below can fail) ...
    attached = model(seg2, old).logits.square().mean()
    grads = torch.autograd.grad(attached, list(old_grad.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    # ... with detach it does not, and the values are unchanged
    detached = old.detach()
    assert type(detached) is type(old)
    for name, t in detached.tensors().items():
        assert not t.requires_grad and t.grad_fn is None, name
        assert torch.equal(t, old.tensors()[name]), name
    loss = model(seg2, detached).logits.square().mean()
    assert loss.requires_grad  # the parameters still get gradients from the new segment
    grads = torch.autograd.grad(loss, list(old_grad.values()), allow_unused=True)
    assert all(g is None for g in grads)


def test_to_tensors_from_tensors_round_trip(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    model, mem = tiny_model, tiny_memory_length
    tokens = _tokens(model, 2, 3 * mem + 1)
    with torch.no_grad():
        state = model(tokens[:, : 2 * mem + 1], model.init_state(2)).state
        expected = model(tokens[:, 2 * mem + 1 :], state).logits

        flat = state.to_tensors(prefix="lane.")
        assert all(k.startswith("lane.") and isinstance(v, Tensor) for k, v in flat.items())
        # what checkpoint.py does: a flat dict through safetensors bytes
        loaded = safetensors.torch.load(safetensors.torch.save(flat))
        rebuilt = type(state).from_tensors(loaded, prefix="lane.").to(model.device)  # safetensors loads on the CPU
        assert type(rebuilt) is type(state)
        _assert_same_tensors(_snapshot(rebuilt), _snapshot(state))
        _close(model(tokens[:, 2 * mem + 1 :], rebuilt).logits, expected, EXACT_ATOL)

        with pytest.raises(KeyError):
            type(state).from_tensors(dict(list(loaded.items())[1:]), prefix="lane.")


# --------------------------------------------------------------------------------------------------------------------
# outputs


def test_output_shapes_and_dtypes(tiny_model: LongContextLM) -> None:
    model = tiny_model
    B, T, V = 2, 5, model.cfg.vocab_size
    tokens = _tokens(model, B, T)
    state = model.init_state(B)
    assert dataclasses.is_dataclass(state) and isinstance(state, State)
    for name, t in state.tensors().items():
        assert isinstance(t, Tensor) and t.shape[0] == B, f"state field {name!r} must have the batch on dim 0"

    with torch.no_grad():
        out = model(tokens, state, targets=tokens)
    assert isinstance(out, LMOutput)
    autocast = torch.is_autocast_enabled(model.device.type)  # test_cuda.py runs this check under bf16 autocast too
    logits_dtype = torch.get_autocast_dtype(model.device.type) if autocast else torch.float32
    assert out.logits.shape == (B, T, V) and out.logits.dtype == logits_dtype
    assert torch.isfinite(out.logits).all()
    assert type(out.state) is type(state)
    for name, t in out.state.tensors().items():
        ref = state.tensors()[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.device == ref.device, name
    assert isinstance(out.aux_loss, Tensor) and out.aux_loss.dim() == 0 and out.aux_loss.is_floating_point()
    assert torch.isfinite(out.aux_loss)
    assert out.loss is not None and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten())
    _close(out.loss, manual, EXACT_ATOL)
    assert isinstance(out.stats, dict)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in out.stats.items())

    with torch.no_grad():
        assert model(tokens, state).loss is None


# --------------------------------------------------------------------------------------------------------------------
# transformer: the window is a window


@pytest.mark.parametrize("n_layer", [1, 2])
def test_transformer_receptive_field(make_tiny_model, n_layer: int) -> None:
    """A query at p sees tokens (p - window, p] per layer, so its receptive field is n_layer * (window - 1) back.

    With one layer: the token exactly ``window`` positions back has no influence, the one ``window - 1`` back has.
    """
    model = make_tiny_model("transformer", n_layer=n_layer)
    window = model.cfg.transformer.window
    reach = n_layer * (window - 1)  # farthest distance at which a token can still influence a query
    length = reach + window + 6
    s = 3  # the perturbed token
    tokens = _tokens(model, 2, length)
    perturbed = tokens.clone()
    perturbed[:, s] = (perturbed[:, s] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        for sizes in ([length], _random_partition(length, window, seed=3)):
            base, _ = _run(model, tokens, model.init_state(2), sizes)
            logits, _ = _run(model, perturbed, model.init_state(2), sizes)
            change = (logits - base).abs().amax(dim=(0, 2))  # (T,) largest change per position
            assert (change[:s] <= EXACT_ATOL).all()
            assert (change[s : s + reach + 1] > CHANGED).all(), change[s : s + reach + 1]
            assert (change[s + reach + 1 :] <= EXACT_ATOL).all(), change[s + reach + 1 :]
            if n_layer == 1:
                assert change[s + window - 1] > CHANGED  # window - 1 back: seen
                assert change[s + window] <= EXACT_ATOL  # exactly window back: not seen


# --------------------------------------------------------------------------------------------------------------------
# 4. document boundaries


def _documents(model: LongContextLM, sep: int, mem: int) -> tuple[Tensor, list[int], Tensor]:
    """Three rows of equal length ``prefix SEP doc tail``: prefixes of different lengths (0, mem + 3, 2 mem + 1) and
    contents, the same document ``doc`` after the separator, and tails that fill the rows to one length. Row 2's tail
    holds a second separator followed by the first tokens of ``doc``. Returns the tokens (3, N), where each row's
    separator sits, and ``doc``."""
    doc = _text(model, 2 * mem + 5, seed=10)
    lengths = [0, mem + 3, 2 * mem + 1]
    width = max(lengths) + 1 + len(doc) + 4
    rows, seps = [], []
    for i, n in enumerate(lengths):
        tail = _text(model, width - n - 1 - len(doc), seed=20 + i)
        if i == 2:
            tail = torch.cat([tail[:1], doc.new_tensor([sep]), doc[: len(tail) - 2]])
        rows.append(torch.cat([_text(model, n, seed=30 + i), doc.new_tensor([sep]), doc, tail]))
        seps.append(n)
    return torch.stack(rows), seps, doc


def test_nothing_crosses_a_document_separator(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """The logits from a separator on equal those of a fresh stream ``SEP doc``, whatever came before, in one call,
    in random chunkings and token by token, with the rows of a batch at different offsets."""
    model, sep = _with_separator(tiny_model)
    mem = tiny_memory_length
    tokens, seps, doc = _documents(model, sep, mem)
    n = 1 + len(doc)
    with torch.no_grad():
        fresh = model(torch.cat([doc.new_tensor([sep]), doc])[None], model.init_state(1)).logits[0]  # (n, V)
        width = tokens.shape[1]
        patterns = [[width], [1] * width] + [_random_partition(width, mem, seed) for seed in range(3)]
        for sizes in patterns:
            logits, _ = _run(model, tokens, model.init_state(3), sizes)
            for row, start in enumerate(seps):
                _close(logits[row, start : start + n], fresh, ATOL)
            # row 2's second separator: the document starts again, whatever the first copy left in memory
            second = seps[2] + n + 1
            _close(logits[2, second:], fresh[: width - second], ATOL)


def test_a_separator_after_carried_memory_resets_the_row(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """A separator at the start of a call (memory carried from the previous call) empties that row only."""
    model, sep = _with_separator(tiny_model)
    mem = tiny_memory_length
    history, doc = _text(model, 2 * mem + 3, seed=1), _text(model, mem + 4, seed=2)
    other = _text(model, 1 + len(doc), seed=3)
    with torch.no_grad():
        warm = model(torch.stack([history, history.flip(0)]), model.init_state(2)).state
        nxt = torch.stack([torch.cat([doc.new_tensor([sep]), doc]), other])
        logits = model(nxt, warm).logits
        fresh = model(nxt[:1], model.init_state(1)).logits[0]
        kept = model(nxt[1:], warm.select(torch.tensor([1]))).logits[0]
    _close(logits[0], fresh, ATOL)
    _close(logits[1], kept, ATOL)


def test_without_reset_information_crosses_the_separator(tiny_model: LongContextLM, tiny_memory_length: int) -> None:
    """``model.reset_at_separator = false`` keeps the old behaviour: the prefix does reach the document (so the
    boundary test above can fail)."""
    model, sep = _with_separator(tiny_model, reset=False)
    tokens, seps, doc = _documents(model, sep, tiny_memory_length)
    with torch.no_grad():
        logits = model(tokens, model.init_state(3)).logits
    start = seps[1]
    assert (logits[1, start : start + 3] - logits[0, 0:3]).abs().amax() > CHANGED


# --------------------------------------------------------------------------------------------------------------------
# the model's previous-token embedding (model.previous_token_embedding)


def test_previous_token_embedding_reads_the_token_before(make_tiny_model: Callable[..., LongContextLM]) -> None:
    """Each token's input holds the token before it: within a segment, from the state at a segment's start, and
    nothing at a stream's start or at a separator. Checked on the ids the embedding reads, and on the logits of a
    one-token window (``window`` 1: attention sees only the token itself, so the token before can only come
    through this embedding)."""
    model = make_tiny_model("transformer", previous_token_embedding=True, separator_id=5, transformer={"window": 1})
    tokens = torch.tensor([[7, 8, 5, 9, 10], [1, 2, 3, 4, 6]])
    state = model.init_state(2)
    ids = model.previous_ids(tokens, state)
    assert ids.tolist() == [[0, 8, 0, 6, 10], [0, 2, 3, 4, 5]]  # 1 + the token before; 0 at the start and at SEP
    with torch.no_grad():
        out = model(tokens, state)
        assert out.state.previous_token.tolist() == [11, 7]  # type: ignore[attr-defined]
        # the next segment's first token reads the last one through the state: a window of 1 sees nothing else
        a = model(torch.tensor([[12]]), out.state.select(torch.tensor([0]))).logits
        b = model(torch.tensor([[12]]), model.init_state(1)).logits
        assert (a - b).abs().amax() > CHANGED
        # without the embedding the same window cannot tell them apart
        plain = make_tiny_model("transformer", separator_id=5, transformer={"window": 1})
        warm = plain(tokens[:1], plain.init_state(1)).state
        c, d = plain(torch.tensor([[12]]), warm).logits, plain(torch.tensor([[12]]), plain.init_state(1)).logits
        assert (c - d).abs().amax() < EXACT_ATOL
        # an emptied row has no token before
        reset = out.state.reset(torch.tensor([True, False]))
        assert reset.previous_token.tolist() == [0, 7]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------------------
# the checks above as functions of a model, for other modules (test_attention_kernel.py, test_cuda.py)

_CHECK_ARGS = {"tiny_model", "tiny_memory_length", "chunked"}


def contract_checks() -> dict[str, Callable[..., None]]:
    """The checks of this module that take only a model, its memory length and ``chunked``, by name."""
    return {
        name: fn
        for name, fn in globals().items()
        if name.startswith("test_") and callable(fn) and set(inspect.signature(fn).parameters) <= _CHECK_ARGS
    }


def run_check(name: str, model: LongContextLM, memory_length: int) -> None:
    """Run the check ``name`` of :func:`contract_checks` on ``model`` (both ``chunked`` values where it takes one)."""
    fn = contract_checks()[name]
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"tiny_model": model}
    if "tiny_memory_length" in params:
        kwargs["tiny_memory_length"] = memory_length
    for chunked in [False, True] if "chunked" in params else [None]:
        fn(**kwargs, **({} if chunked is None else {"chunked": chunked}))
