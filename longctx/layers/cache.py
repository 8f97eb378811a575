"""Caches over ``[cache ; segment]``: the concatenation every attention layer makes, and its inference form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def grown_buffers(state: Any, fields: dict[str, int], extra: int) -> dict[str, Tensor] | None:
    """Inference only: per field of ``state`` (name -> its sequence dim), an empty buffer ``extra`` entries longer.

    Each layer writes ``[cache ; segment]`` into its slice of the buffer (:func:`join`) and the next state's field is
    a view of the buffer's newest entries: one copy of the cache per call instead of two (the concatenation, then
    the stack over layers), which is most of a single token's decoding time. None while autograd records: a layer
    would then write into a tensor whose other slices are saved for the backward pass.
    """
    if torch.is_grad_enabled():
        return None
    out = {}
    for name, dim in fields.items():
        t = getattr(state, name)
        shape = list(t.shape)
        shape[dim] += extra
        out[name] = t.new_empty(shape)
    return out


def join(cache: Tensor, new: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """``[cache ; new]`` along ``dim`` in ``new``'s dtype; also written into ``out`` (in its dtype) when given."""
    if out is None:
        return torch.cat([cache.to(new.dtype), new], dim=dim)
    return torch.cat([cache, new], dim=dim, out=out).to(new.dtype)  # no copy when the dtypes agree


def next_cache(
    parts: list[Tensor], buffers: dict[str, Tensor] | None, name: str, dim: int, keep: int, dtype: torch.dtype
) -> Tensor:
    """A cache field of the next state: the newest ``keep`` entries (along ``dim``) of the buffer the layers wrote
    (a view; inference), or else the layers' ``parts`` (already cut to ``keep``) stacked on dim 1 in ``dtype``."""
    if buffers is not None:
        buf = buffers[name]
        return buf.narrow(dim, buf.shape[dim] - keep, keep)
    return torch.stack(parts, dim=1).to(dtype)
