"""The baseline decoder: pre-norm Transformer blocks with sliding-window causal attention and rotary positions.

Each query at absolute position p attends to the keys at positions ``(p - window, p]``: itself and the previous
``window - 1`` tokens. The window is defined per query, so the result does not depend on how the stream is cut into
segments. The state is what the next segment needs and nothing more: the rotated keys and the values of the last
``window - 1`` tokens of every layer. It is the memory every other decoder is compared with.

Speed: on the CPU the attention is the band kernel (:func:`~longctx.layers.attention.band_attention`), which scores
each block of queries against only the keys their windows reach instead of a dense ``T x (M + T)`` kernel (without
autograd, each block through PyTorch's fused attention); windows of 2,048 and more take PyTorch's fused attention
whole (``model.attention_kernel``).

Block (pre-norm, GPT-2 style)::

    x ──┬─ LayerNorm ─ Q,K,V ─ RoPE ─ attention over [cache ; segment] ─ proj ─(+)──┬─ LayerNorm ─ MLP ─(+)── x'
        └──────────────────────────────────────────────────────────────────────────┘└──────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.layers.attention import RotaryEmbedding, WindowAttention, WindowPattern, rotary_tables
from longctx.layers.block import PreNormBlock
from longctx.layers.cache import grown_buffers, next_cache


@dataclass(frozen=True)
class TransformerState(State):
    keys: Tensor  # (B, L, H, M, Dh) rotated keys of the last M = window - 1 tokens, oldest first
    values: Tensor  # (B, L, H, M, Dh)
    length: Tensor  # (B,) int64: how many of the newest cache slots hold real tokens (<= M)
    position: Tensor  # (B,) int64: tokens read so far = absolute position of the next token


class TransformerDecoder(Decoder[TransformerState]):
    """Sliding-window attention baseline; state = K/V of the last ``window - 1`` tokens per layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.transformer.window
        self.cache_len = self.window - 1
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.transformer.rope_base)
        self.blocks = nn.ModuleList(PreNormBlock(cfg, WindowAttention(cfg)) for _ in range(cfg.n_layer))

    def init_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> TransformerState:
        cfg = self.cfg
        shape = (batch_size, cfg.n_layer, cfg.n_head, self.cache_len, cfg.head_dim)
        zeros_long = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return TransformerState(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            length=zeros_long,
            position=zeros_long.clone(),
        )

    def forward(self, x: Tensor, state: TransformerState) -> DecoderOutput[TransformerState]:
        B, T, _ = x.shape
        M = self.cache_len
        positions = state.position[:, None] + torch.arange(T, device=x.device)  # (B, T)
        cos, sin = rotary_tables(*self.rotary(positions, x.dtype))  # (B, 1, T, Dh) each
        if torch.is_autocast_enabled(x.device.type):  # cast once here rather than in every layer (same values)
            compute = torch.get_autocast_dtype(x.device.type)
            cos, sin = cos.to(compute), sin.to(compute)
        pattern = WindowPattern.of(T, self.window, state.length)  # which keys each query sees (empty slots hidden)

        new_keys, new_values = [], []
        bufs = grown_buffers(state, {"keys": 3, "values": 3}, T)  # inference: one copy of the caches
        for layer, block in enumerate(self.blocks):
            out = None if bufs is None else (bufs["keys"][:, layer], bufs["values"][:, layer])
            x, keys, values = block(x, state.keys[:, layer], state.values[:, layer], cos, sin, pattern, out)
            if bufs is None:  # recording autograd: keep the newest M of each layer, stacked below
                new_keys.append(keys[:, :, keys.shape[2] - M :])  # (B, H, M, Dh)
                new_values.append(values[:, :, values.shape[2] - M :])

        next_state = TransformerState(  # (B, L, H, M, Dh); inference: views of the buffers the layers wrote
            keys=next_cache(new_keys, bufs, "keys", 3, M, state.keys.dtype),
            values=next_cache(new_values, bufs, "values", 3, M, state.values.dtype),
            length=torch.clamp(state.length + T, max=M),
            position=state.position + T,
        )
        return DecoderOutput(hidden=x, state=next_state, aux_loss=x.new_zeros(()), stats={})

    # facts (see Decoder)
    PROJECTED = ("keys", "values")
    TINY = {"transformer": {"window": 8}}

    @classmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        return cfg.transformer.window, "transformer.window"

    @classmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        return cfg.n_layer * (cfg.transformer.window - 1), f"{cfg.n_layer} layers x (transformer.window - 1)"

    @classmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        return cfg.transformer.window

    @classmethod
    def attended_keys(cls, cfg: ModelConfig) -> int:
        return cfg.transformer.window  # itself and the previous window - 1 tokens, once the stream is that long
