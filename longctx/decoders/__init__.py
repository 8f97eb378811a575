"""The registry of decoders: ``DECODERS[name](model_config)`` builds one. Contract tests run over every entry."""

from longctx.decoders.aft import AFTDecoder, AFTState
from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.decoders.combiner import CombinerDecoder, CombinerState
from longctx.decoders.infinite import InfiniteDecoder, InfiniteState
from longctx.decoders.perceiver_ar import PerceiverARDecoder, PerceiverARState
from longctx.decoders.transformer import TransformerDecoder, TransformerState
from longctx.decoders.xl import XLDecoder, XLState

DECODERS: dict[str, type[Decoder]] = {
    "transformer": TransformerDecoder,
    "xl": XLDecoder,
    "aft": AFTDecoder,
    "infinite": InfiniteDecoder,
    "perceiver_ar": PerceiverARDecoder,
    "combiner": CombinerDecoder,
}

__all__ = [
    "AFTDecoder",
    "AFTState",
    "CombinerDecoder",
    "CombinerState",
    "DECODERS",
    "Decoder",
    "DecoderOutput",
    "InfiniteDecoder",
    "InfiniteState",
    "PerceiverARDecoder",
    "PerceiverARState",
    "State",
    "TransformerDecoder",
    "TransformerState",
    "XLDecoder",
    "XLState",
]
