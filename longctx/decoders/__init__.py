"""The registry of decoders: ``DECODERS[name](model_config)`` builds one. Contract tests run over every entry."""

from longctx.decoders.base import Decoder, DecoderOutput, State
from longctx.decoders.transformer import TransformerDecoder, TransformerState
from longctx.decoders.xl import XLDecoder, XLState

DECODERS: dict[str, type[Decoder]] = {
    "transformer": TransformerDecoder,
    "xl": XLDecoder,
}

__all__ = ["DECODERS", "Decoder", "DecoderOutput", "State", "TransformerDecoder", "TransformerState", "XLDecoder",
           "XLState"]
