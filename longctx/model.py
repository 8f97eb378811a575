"""LongContextLM: token embedding -> decoder -> final norm -> tied output head, and the loss.

The model knows no decoder internals: it builds ``DECODERS[cfg.decoder]`` and speaks to it through the contract in
``longctx/decoders/base.py``. Loss is mean cross-entropy in nats per token, computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.decoders import DECODERS, State


@dataclass(frozen=True)
class LMOutput:
    logits: Tensor  # (B, T, V)
    state: State  # the decoder state after this segment
    loss: Tensor | None  # mean NLL (nats/token) over the targets, None without targets
    aux_loss: Tensor  # decoder's auxiliary loss (scalar, zero when unused)
    stats: dict[str, float]


class LongContextLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = DECODERS[cfg.decoder](cfg)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied (Press & Wolf 2017)
        nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Empty memory for ``batch_size`` streams, on ``device`` (default: the model's)."""
        return self.decoder.init_state(batch_size, device or self.device, self.dtype)

    def forward(self, tokens: Tensor, state: State, targets: Tensor | None = None) -> LMOutput:
        """tokens (B, T) int64 after the memory in ``state``; targets (B, T) int64, -100 = ignored."""
        x = self.drop(self.embed(tokens))  # (B, T, D)
        out = self.decoder(x, state)
        logits = self.head(self.norm(out.hidden))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits=logits, state=out.state, loss=loss, aux_loss=out.aux_loss, stats=out.stats)


def build_model(cfg: ModelConfig) -> LongContextLM:
    """A freshly initialised model for ``cfg`` (on the CPU, fp32)."""
    return LongContextLM(cfg)
