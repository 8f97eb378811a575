"""Tables that inference makes from a module's weights and keeps for the next call.

Some products depend on the weights (and on the current memory) only, not on the tokens of a call: the projected
relative-position table ``W_R R`` of :mod:`longctx.layers.relative`, the ∞-former's directions and values of one
long-term-memory version. A training step must make them again (the weights move, the gradient must flow), but
evaluation and generation read the same ones call after call; one token of decoding would otherwise spend much of
its time remaking them. :class:`KeepsTables` keeps them while autograd is off.

A table is kept with a key of the tensors it comes from (address, shape, strides, dtype, device, and for weights the
version counter that every in-place change bumps: optimiser steps, ``load_state_dict``) and with those tensors
themselves, so that their memory cannot be reused by another tensor while the key names it; a few keys are kept per
table (streams taking turns on one model), and a table that may be read only once is kept only when its key comes
back. Made or kept, a table is the same computation, so no result depends on what an earlier call left. What the
key cannot see
is a change through ``.data``, which PyTorch does not version; the package never changes weights that way, and the
tables are dropped whenever the module goes back to training mode or moves (``.to``), so a weight changed in
training is never read through an old table. The memory tensors (state fields) are values: never changed in place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

KEEP = 4  # tables kept per name and module (several streams taking turns on one model each find theirs)
_lock = threading.RLock()


class _Kept(NamedTuple):
    held: tuple[Tensor, ...]  # the tensors the key names
    value: Any


def _key(weights: Sequence[Tensor], inputs: Sequence[Tensor]) -> tuple[Any, ...]:
    def where(t: Tensor) -> tuple[Any, ...]:
        return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)

    return tuple((*where(w), w._version) for w in weights) + tuple(where(x) for x in inputs)


class KeepsTables(nn.Module):
    """A module that keeps tables made from its weights between inference calls (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._kept: dict[str, OrderedDict[tuple[Any, ...], _Kept | None]] = {}

    def kept(
        self,
        name: str,
        weights: Sequence[Tensor],
        inputs: Sequence[Tensor],
        make: Callable[[], Any],
        on_return: bool = False,
    ) -> Any:
        """``make()``, or what it gave last time for the same ``weights`` (versioned) and ``inputs`` (up to
        :data:`KEEP` of them per name, the least recently used dropped first).

        With ``on_return`` a table is kept only when its key comes back: the first call makes it for itself and
        notes the key. A table that is read once (an evaluation segment, whose memory changes every call) then holds
        no memory. While autograd records, or for weights made in inference mode (which keep no version), nothing is
        kept.
        """
        if torch.is_grad_enabled() or any(w.is_inference() for w in weights):
            return make()
        key = _key(weights, inputs)
        with _lock:  # several threads may share a model: the tables and their order change under the lock
            tables = self._kept.setdefault(name, OrderedDict())
            entry = tables.get(key)
            if entry is None and on_return and key not in tables:
                tables[key] = None  # noted only: a noted key that comes back for other tensors just keeps early
                value = make()
            else:
                if entry is None:
                    entry = _Kept(tuple(t.detach() for t in (*weights, *inputs)), make())
                    tables[key] = entry
                value = entry.value
            tables.move_to_end(key)
            while len(tables) > KEEP:
                tables.popitem(last=False)
        return value

    def train(self, mode: bool = True) -> KeepsTables:
        if mode:
            self._kept = {}
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KeepsTables:  # .to, .cuda, .float, ...
        self._kept = {}
        return super()._apply(fn, recurse)
