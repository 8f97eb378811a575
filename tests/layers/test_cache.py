"""Inference cache buffers (``longctx/layers/cache.py``): a single-token step writes its entries after the state's
own, in place, without changing any state; anything else gets a new buffer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from longctx.layers.cache import ROOM_CACHES, ROOM_CALLS, ROOM_MIN, grown_buffers, join, next_cache
from longctx.model import LongContextLM


@dataclass(frozen=True)
class _State:
    keys: Tensor  # (B, L, C, D): a cache of C entries per layer, sequence dim 2


def _step(state: _State, new: Tensor) -> _State:
    """What a decoder does with a cache in inference: [cache ; new] per layer, the next state the newest C."""
    C, T = state.keys.shape[2], new.shape[2]
    bufs = grown_buffers(state, {"keys": 2}, T)
    assert bufs is not None
    for layer in range(state.keys.shape[1]):
        join(state.keys[:, layer], new[:, layer], 1, bufs["keys"][:, layer])
    return _State(next_cache([], bufs, "keys", 2, C, state.keys.dtype))


def _entries(n: int, start: int = 0) -> Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(2, 3, n, 4).contiguous()


def test_single_steps_write_in_place_and_change_no_state() -> None:
    C = 5
    with torch.no_grad():
        states = [_step(_State(_entries(C)), _entries(1, C))]  # the first step copies into a buffer with room
        for t in range(1, ROOM_MIN):
            states.append(_step(states[-1], _entries(1, C + t)))
        storages = {s.keys.untyped_storage().data_ptr() for s in states}
        assert len(storages) == 1  # every step after the first wrote into the same buffer
        for t, s in enumerate(states):  # each state still holds its own window of the stream
            assert torch.equal(s.keys, _entries(C, t + 1))
        full = _step(states[-1], _entries(1, C + ROOM_MIN))  # the room is spent: a new buffer
        assert full.keys.untyped_storage().data_ptr() not in storages
        assert torch.equal(full.keys, _entries(C, ROOM_MIN + 1))


def test_segments_write_in_place_for_several_calls() -> None:
    """Reading in segments (evaluation, prompts): a new buffer has room for ROOM_CALLS segments like the one that made
    it, so the cache is copied once per ROOM_CALLS calls, and every state still holds its own window."""
    C, T = 40, 6  # room: ROOM_CALLS * T = 24 entries, more than ROOM_MIN and C / 8
    with torch.no_grad():
        states = [_State(_entries(C))]
        for call in range(ROOM_CALLS + 1):
            states.append(_step(states[-1], _entries(T, C + call * T)))
        storages = [s.keys.untyped_storage().data_ptr() for s in states[1:]]
        assert len(set(storages[:ROOM_CALLS])) == 1  # calls 2 .. ROOM_CALLS wrote after the first one's entries
        assert storages[ROOM_CALLS] != storages[0]  # the room is spent: a new buffer
        for call, s in enumerate(states):
            assert torch.equal(s.keys, _entries(C, call * T))


def test_the_room_for_segments_is_at_most_twice_the_cache() -> None:
    """Segments as long as the cache or longer: the room stays within ROOM_CACHES caches (or one call's entries)."""
    C = 40
    for T in (30, 200):
        with torch.no_grad():
            state = _step(_State(_entries(C)), _entries(T, C))
        entries = state.keys.untyped_storage().nbytes() // (state.keys.element_size() * 2 * 3 * 4)  # (2, 3, n, 4)
        assert entries == C + max(T, ROOM_CACHES * C)


def test_a_state_continued_twice_gets_a_new_buffer() -> None:
    with torch.no_grad():
        base = _step(_State(_entries(4)), _entries(1, 4))
        first = _step(base, _entries(1, 100))
        second = _step(base, _entries(1, 200))  # base is no longer the newest view of its buffer
        assert first.keys.untyped_storage().data_ptr() == base.keys.untyped_storage().data_ptr()
        assert second.keys.untyped_storage().data_ptr() != base.keys.untyped_storage().data_ptr()
        assert torch.equal(first.keys[:, :, -1], _entries(1, 100)[:, :, 0])
        assert torch.equal(second.keys[:, :, -1], _entries(1, 200)[:, :, 0])
        assert torch.equal(base.keys, _entries(4, 1))


def test_no_buffers_while_autograd_records() -> None:
    assert grown_buffers(_State(_entries(3)), {"keys": 2}, 1) is None


def test_an_inference_tensor_is_not_written_outside_inference_mode() -> None:
    with torch.inference_mode():
        base = _step(_State(_entries(4)), _entries(1, 4))
    with torch.no_grad():
        after = _step(base, _entries(1, 5))  # writing into base's buffer here would raise
    assert after.keys.untyped_storage().data_ptr() != base.keys.untyped_storage().data_ptr()
    assert torch.equal(after.keys, _entries(4, 2))


@pytest.mark.parametrize("decoder", ["transformer", "infinite", "perceiver_ar"])
def test_a_decoded_token_copies_no_cache(make_tiny_model: Callable[..., LongContextLM], decoder: str) -> None:
    """The decoders whose caches live in these buffers: after the first single-token step, the next state's cache
    fields are views of the same buffers as the previous state's."""
    model = make_tiny_model(decoder)
    tokens = torch.randint(0, model.cfg.vocab_size - 1, (2, 12))
    with torch.no_grad():
        state = model(tokens[:, :10], model.init_state(2)).state
        first = model(tokens[:, 10:11], state).state
        second = model(tokens[:, 11:12], first).state
    shared = [
        name
        for name, t in second.tensors().items()
        if t.dim() > 2 and t.untyped_storage().data_ptr() == first.tensors()[name].untyped_storage().data_ptr()
    ]
    assert shared, f"no cache field of {decoder} was written in place"
