"""Position-wise feed-forward block and weight initialisation."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F


def init_linear(layer: nn.Linear, std: float) -> None:
    """Normal(0, std) weights and zero bias (GPT-2 initialisation)."""
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """``Linear(D, F) -> GELU -> Linear(F, D) -> dropout``; the output layer is scaled by 1/sqrt(2 n_layer)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, init_std: float, n_layer: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff)
        self.fc_out = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        init_linear(self.fc_in, init_std)
        init_linear(self.fc_out, init_std / math.sqrt(2 * n_layer))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))
