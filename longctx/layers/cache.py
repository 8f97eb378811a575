"""Caches over ``[cache ; segment]``: the concatenation every attention layer makes, and its inference form."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

ROOM_MIN = 16  # entries of room a new inference buffer keeps past its end, at least ...
ROOM_SHARE = 8  # ... and at least 1 / ROOM_SHARE of the cache: single-token steps then copy the cache once per room
ROOM_CALLS = 4  # ... and room for this many calls like the one that made it, ...
ROOM_CACHES = 2  # ... but no more than this many times the cache
_claim = threading.Lock()  # the check and the claim of a buffer's room are one step, also with several threads


def grown_buffers(state: Any, fields: dict[str, int], extra: int) -> dict[str, Tensor] | None:
    """Inference only: per field of ``state`` (name -> its sequence dim), a buffer ``extra`` entries longer.

    Each layer writes ``[cache ; segment]`` into its slice of the buffer (:func:`join`) and the next state's field is
    a view of the buffer's newest entries (:func:`next_cache`). Where the field is the newest view of a buffer with
    room after it (the previous call made it and nothing has been written after it since), the buffer is that room:
    the cache is already in place and only the ``extra`` new entries are written, so a single-token step copies no
    cache. Otherwise a new buffer is made with room for ``max(extra, ROOM_MIN, cache / ROOM_SHARE, min(ROOM_CALLS *
    extra, ROOM_CACHES * cache))`` entries after the cache, which is copied into it once: decoding copies the cache
    once per eighth of it, reading a prompt or a file in segments once per two to four segments. No state is ever
    changed: writes go after the end of every view of the buffer, and a state read twice (two continuations of one
    prompt) gets a new buffer the second time. A state's fields are views of the size ``nbytes()`` reports; the
    buffer behind them holds that room more: at most twice the cache, or one call's entries where a call is longer
    (at least 16 entries). None while autograd records: a layer would then write into a tensor whose other slices
    are saved for the backward pass.
    """
    if torch.is_grad_enabled():
        return None
    return {name: _room_after(getattr(state, name), dim, extra) for name, dim in fields.items()}


def _room_after(t: Tensor, dim: int, extra: int) -> Tensor:
    """A view of ``t``'s shape but ``extra`` entries longer along ``dim`` whose first entries are ``t``'s memory when
    ``t`` is the newest view of its buffer and the buffer has room; else the head of a new (uninitialised) buffer.

    The buffer's layout is kept on its storage, ``(dim, strides, end of the entries written so far, capacity)``.
    An inference tensor (made in inference mode) is written in place only in inference mode, as PyTorch allows."""
    keep = t.shape[dim]
    shape = list(t.shape)
    shape[dim] = keep + extra
    storage = t.untyped_storage()
    if torch.is_inference_mode_enabled() or not t.is_inference():
        with _claim:
            layout = getattr(storage, "_longctx_room", None)
            if layout is not None:
                room_dim, strides, written, capacity = layout
                start, rem = divmod(t.storage_offset(), strides[dim])
                newest = (room_dim, strides, rem, start + keep) == (dim, t.stride(), 0, written)
                if newest and written + extra <= capacity:
                    storage._longctx_room = (dim, strides, written + extra, capacity)
                    return t.as_strided(shape, strides, t.storage_offset())
    full = list(t.shape)
    full[dim] = keep + max(extra, ROOM_MIN, keep // ROOM_SHARE, min(ROOM_CALLS * extra, ROOM_CACHES * keep))
    buf = t.new_empty(full)
    buf.untyped_storage()._longctx_room = (dim, buf.stride(), keep + extra, full[dim])
    return buf.narrow(dim, 0, keep + extra)


def join(cache: Tensor, new: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """``[cache ; new]`` along ``dim`` in ``new``'s dtype; also written into ``out`` (in its dtype) when given. Where
    ``cache`` already is the head of ``out`` (:func:`grown_buffers` found room after it), only ``new`` is written."""
    if out is None:
        return torch.cat([cache.to(new.dtype), new], dim=dim)
    n = cache.shape[dim]
    if cache.data_ptr() != out.data_ptr() or cache.stride() != out.stride():
        out.narrow(dim, 0, n).copy_(cache)
    out.narrow(dim, n, new.shape[dim]).copy_(new)
    return out.to(new.dtype)  # no copy when the dtypes agree


def next_cache(
    parts: list[Tensor], buffers: dict[str, Tensor] | None, name: str, dim: int, keep: int, dtype: torch.dtype
) -> Tensor:
    """A cache field of the next state: the newest ``keep`` entries (along ``dim``) of the buffer the layers wrote
    (a view; inference), or else the layers' ``parts`` (already cut to ``keep``) stacked on dim 1 in ``dtype``."""
    if buffers is not None:
        buf = buffers[name]
        return buf.narrow(dim, buf.shape[dim] - keep, keep)
    return torch.stack(parts, dim=1).to(dtype)
