"""The baseline decoder: pre-norm Transformer blocks with sliding-window causal attention and rotary positions.

Each query at absolute position p attends to the keys at positions ``(p - window, p]``: itself and the previous
``window - 1`` tokens. The window is defined per query, so the result does not depend on how the stream is cut into
segments. The state is what the next segment needs and nothing more: the rotated keys and the values of the last
``window - 1`` tokens of every layer. It is the memory every other decoder is compared with.

Speed: the attention pattern is computed once per forward as blocks of queries with the key range their windows
reach (:func:`~longctx.layers.attention.window_blocks`); on the CPU :func:`~longctx.layers.attention.banded_attention`
then computes only those scores instead of a dense ``T x (M + T)`` kernel, about 1.6-2x faster per layer.

Block (pre-norm, GPT-2 style)::

    x ──┬─ LayerNorm ─ Q,K,V ─ RoPE ─ attention over [cache ; segment] ─ proj ─(+)──┬─ LayerNorm ─ MLP ─(+)── x'
        └──────────────────────────────────────────────────────────────────────────┘└──────────────────┘
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.decoders.base import Decoder, DecoderOutput, State, grown_buffers, join
from longctx.layers import RotaryEmbedding, init_linear
from longctx.layers.attention import (
    apply_rotary_full,
    kernel_blocks,
    resolve_kernel,
    rotary_tables,
    window_attention,
)
from longctx.layers.block import PreNormBlock


@dataclass(frozen=True)
class TransformerState(State):
    keys: Tensor  # (B, L, H, M, Dh) rotated keys of the last M = window - 1 tokens, oldest first
    values: Tensor  # (B, L, H, M, Dh)
    length: Tensor  # (B,) int64: how many of the newest cache slots hold real tokens (<= M)
    position: Tensor  # (B,) int64: tokens read so far = absolute position of the next token


class WindowAttention(nn.Module):
    """Multi-head causal attention of a segment over ``[cache ; segment]`` under a window mask.

    ``cos``/``sin`` are the (B, 1, T, Dh) tables of :func:`~longctx.layers.attention.rotary_tables`; ``mask`` is the
    list of blocks of :func:`~longctx.layers.attention.kernel_blocks` for the kernel that ``cfg.attention_kernel``
    selects on the device of ``x`` (:func:`~longctx.layers.attention.resolve_kernel`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.kernel = cfg.attention_kernel
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.qkv, cfg.init_std)
        init_linear(self.out_proj, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(
        self,
        x: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: list | Tensor,
        out: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), cache_k/v (B, H, M, Dh) -> output (B, T, D), keys and values (B, H, M + T, Dh) (written into
        ``out`` when given)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        q, k = apply_rotary_full(q, cos, sin), apply_rotary_full(k, cos, sin)
        out_k, out_v = out if out is not None else (None, None)
        keys, values = join(cache_k, k, 2, out_k), join(cache_v, v, 2, out_v)  # (B, H, M + T, Dh)
        if isinstance(mask, Tensor):  # a full boolean mask (B, 1, T, M + T), as window_mask gives
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            cache_grad = cache_k.requires_grad or cache_v.requires_grad
            y = window_attention(
                resolve_kernel(self.kernel, x.device),
                q,
                keys,
                values,
                mask,
                grad_start=0 if cache_grad else cache_k.shape[2],
            )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.dropout(self.out_proj(y)), keys, values


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
        slots = torch.arange(M, device=x.device)[None, :]  # (1, M)
        cache_valid = slots >= (M - state.length[:, None])  # (B, M): the newest `length` slots are real
        # banded: blocks of queries, each over the keys its windows reach (no dense T x (M + T) scores);
        # sdpa: one block with a boolean mask (the fused GPU kernels beat a loop over blocks)
        mask = kernel_blocks(resolve_kernel(self.cfg.attention_kernel, x.device), T, M, self.window, cache_valid)

        new_keys, new_values = [], []
        bufs = grown_buffers(state, {"keys": 3, "values": 3}, T)  # inference: one copy of the caches
        for layer, block in enumerate(self.blocks):
            out = None if bufs is None else (bufs["keys"][:, layer], bufs["values"][:, layer])
            x, keys, values = block(x, state.keys[:, layer], state.values[:, layer], cos, sin, mask, out)
            new_keys.append(keys[:, :, keys.shape[2] - M :].to(state.keys.dtype))  # (B, H, M, Dh)
            new_values.append(values[:, :, values.shape[2] - M :].to(state.values.dtype))

        next_state = TransformerState(  # (B, L, H, M, Dh); inference: views of the buffers the layers wrote
            keys=torch.stack(new_keys, dim=1) if bufs is None else bufs["keys"][:, :, :, T:],
            values=torch.stack(new_values, dim=1) if bufs is None else bufs["values"][:, :, :, T:],
            length=torch.clamp(state.length + T, max=M),
            position=state.position + T,
        )
        return DecoderOutput(hidden=x, state=next_state, aux_loss=x.new_zeros(()), stats={})

    # facts (see Decoder)
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
