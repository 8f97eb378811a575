"""Tables that inference makes from a module's weights and keeps for the next call.

Some products depend on the weights (and on the current memory) only, not on the tokens of a call: the projected
relative-position table ``W_R R`` of :mod:`longctx.layers.relative`, the ∞-former's directions and values of one
long-term-memory version. A training step must make them again (the weights move, the gradient must flow), but
evaluation and generation read the same ones call after call; one token of decoding would otherwise spend much of
its time remaking them. :class:`KeepsTables` keeps them while autograd is off.

A table is kept with a key of the tensors it comes from (address, shape, strides, dtype, device, and for weights the
version counter that every in-place change bumps: optimiser steps, ``load_state_dict``) and with those tensors
themselves, so that their memory cannot be reused by another tensor while the key names it. What the key cannot see
is a change through ``.data``, which PyTorch does not version; the package never changes weights that way, and the
tables are dropped whenever the module goes back to training mode or moves (``.to``), so a weight changed in
training is never read through an old table. The memory tensors (state fields) are values: never changed in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class _Kept(NamedTuple):
    key: tuple[Any, ...]
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
        self._kept: dict[str, _Kept] = {}

    def kept(self, name: str, weights: Sequence[Tensor], inputs: Sequence[Tensor], make: Callable[[], Any]) -> Any:
        """``make()``, or the value it gave last time for the same ``weights`` (versioned) and ``inputs``. While
        autograd records, or for weights made in inference mode (which keep no version), always ``make()``."""
        if torch.is_grad_enabled() or any(w.is_inference() for w in weights):
            return make()
        key = _key(weights, inputs)
        entry = self._kept.get(name)
        if entry is None or entry.key != key:
            entry = _Kept(key, tuple(t.detach() for t in (*weights, *inputs)), make())
            self._kept[name] = entry
        return entry.value

    def train(self, mode: bool = True) -> KeepsTables:
        if mode:
            self._kept = {}
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KeepsTables:  # .to, .cuda, .float, ...
        self._kept = {}
        return super()._apply(fn, recurse)
