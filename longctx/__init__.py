"""longctx: train, evaluate and sample long-context language models that stream any input through bounded memory.

Public API::

    cfg = longctx.load_config("transformer-small", {"train.lr": 3e-4})
    model = longctx.build_model(cfg.model)
    state = model.init_state(batch_size=2)
    out = model(tokens, state, targets)        # LMOutput(logits, state, loss, aux_loss, stats)
    model, tokenizer, cfg = longctx.load_checkpoint("runs/infinite-small/step-00000050")
"""

__version__ = "0.1.0"

from longctx.checkpoint import load_checkpoint  # noqa: E402
from longctx.config import Config, ModelConfig, load_config  # noqa: E402
from longctx.model import LMOutput, LongContextLM, build_model  # noqa: E402

__all__ = ["Config", "LMOutput", "LongContextLM", "ModelConfig", "__version__", "build_model", "load_checkpoint",
           "load_config"]
