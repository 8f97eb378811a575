"""Maths shared by the decoders: attention kernels, positions, MLP. Nothing here knows about a specific decoder."""

from longctx.layers.attention import RotaryEmbedding, apply_rotary, window_mask
from longctx.layers.mlp import MLP, init_linear

__all__ = ["MLP", "RotaryEmbedding", "apply_rotary", "init_linear", "window_mask"]
