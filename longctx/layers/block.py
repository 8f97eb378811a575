"""The pre-norm residual block that every decoder stacks (GPT-2 layout)::

    x ──┬─ LayerNorm ─ mixer ─(+)──┬─ LayerNorm ─ MLP ─(+)── x'
        └──────────────────────┘   └──────────────────┘

The mixer (attention of some kind, or AFT) returns its output first, then whatever its decoder carries to the next
segment (caches, spans, memories); the block passes those through unchanged. The MLP is GELU unless the decoder
gives its own (``perceiver_ar``: squared ReLU).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from longctx.config import ModelConfig
from longctx.layers.mlp import MLP


class PreNormBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.norm_mix = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mix = mixer
        self.norm_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.init_std, cfg.n_layer)

    def forward(self, x: Tensor, *args: Any) -> tuple[Any, ...]:  # x (B, T, D) -> (x', *carried)
        out, *carried = self.mix(self.norm_mix(x), *args)
        x = x + out
        return (x + self.mlp(self.norm_mlp(x)), *carried)
