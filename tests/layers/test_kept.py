"""Tables kept between inference calls (``longctx/layers/kept.py``): made once for the same weights and inputs, made
again when either changes, dropped on ``train()`` and ``.to()``, never kept while autograd records."""

from __future__ import annotations

import torch
from torch import nn

from longctx.layers.kept import KEEP, KeepsTables


class _Layer(KeepsTables):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3, bias=False)
        self.made = 0

    def table(self, x: torch.Tensor) -> torch.Tensor:
        def make() -> torch.Tensor:
            self.made += 1
            return self.proj(x)

        return self.kept("table", [self.proj.weight], [x], make)


def test_kept_for_the_same_weights_and_inputs_made_again_when_they_change() -> None:
    layer, x = _Layer(), torch.randn(2, 3)
    with torch.no_grad():
        first = layer.table(x)
        assert layer.table(x) is first and layer.made == 1
        layer.proj.weight.mul_(2.0)  # an in-place change bumps the version
        changed = layer.table(x)
        assert layer.made == 2 and torch.allclose(changed, 2.0 * first)
        other = torch.randn(2, 3)
        assert torch.allclose(layer.table(other), layer.proj(other)) and layer.made == 3


def test_dropped_on_train_and_to_kept_across_eval() -> None:
    layer, x = _Layer(), torch.randn(2, 3)
    with torch.no_grad():
        layer.table(x)
        layer.eval()
        layer.table(x)
        assert layer.made == 1  # eval() keeps the tables
        layer.train()
        layer.table(x)
        assert layer.made == 2
        layer.to(torch.float64)
        layer.table(x.double())
        assert layer.made == 3


def test_never_kept_while_autograd_records_or_for_inference_weights() -> None:
    layer, x = _Layer(), torch.randn(2, 3)
    out = layer.table(x)
    layer.table(x)
    assert layer.made == 2 and out.requires_grad
    with torch.inference_mode():
        made_here = _Layer()  # weights made in inference mode keep no version: nothing can be kept
        made_here.table(x)
        made_here.table(x)
    assert made_here.made == 2


def test_kept_when_a_key_returns_and_a_few_keys_at_a_time() -> None:
    """With ``on_return``, a key's first call makes the table for itself only and the second makes and keeps it; up to
    KEEP keys (streams taking turns) stay kept, the least recently used is dropped first."""
    layer = _Layer()

    def read(x: torch.Tensor) -> torch.Tensor:
        def make() -> torch.Tensor:
            layer.made += 1
            return layer.proj(x)

        return layer.kept("table", [layer.proj.weight], [x], make, on_return=True)

    streams = [torch.randn(2, 3) for _ in range(KEEP + 1)]
    with torch.no_grad():
        for x in streams[:KEEP]:
            read(x)
        assert layer.made == KEEP  # made for the call alone, nothing kept
        for _ in range(3):  # KEEP streams taking turns: each made and kept once more, then read from the table
            for x in streams[:KEEP]:
                assert torch.allclose(read(x), layer.proj(x))
        assert layer.made == 2 * KEEP
        read(streams[KEEP])  # a new key (noted) pushes out the least recently used one
        read(streams[0])
        assert layer.made == 2 * KEEP + 2
