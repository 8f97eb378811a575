"""longctx: train, evaluate and sample long-context language models that stream any input through bounded memory.

Public API::

    cfg = longctx.load_config("transformer-small", {"train.lr": 3e-4})
    model = longctx.build_model(cfg.model)
    state = model.init_state(batch_size=2)
    out = model(tokens, state, targets)        # LMOutput(logits, state, loss, aux_loss, stats)
    model, tokenizer, cfg = longctx.load_checkpoint("runs/infinite-small/step-00000050")
    text = longctx.generate("runs/infinite-small", "ROMEO:\n", max_new_tokens=100)   # also longctx.stream(...)
    result = longctx.evaluate("runs/infinite-small", ["book.txt"])                      # as `longctx eval --json`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names load their modules on first use, so that `longctx --help` and `--version` never import torch.
_LAZY = {
    "load_checkpoint": "longctx.checkpoint",
    "Config": "longctx.config",
    "ModelConfig": "longctx.config",
    "load_config": "longctx.config",
    "LMOutput": "longctx.model",
    "LongContextLM": "longctx.model",
    "build_model": "longctx.model",
    "generate": "longctx.api",
    "stream": "longctx.api",
    "evaluate": "longctx.api",
}

if TYPE_CHECKING:
    from longctx.api import evaluate, generate, stream
    from longctx.checkpoint import load_checkpoint
    from longctx.config import Config, ModelConfig, load_config
    from longctx.model import LMOutput, LongContextLM, build_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")


__all__ = [
    "Config",
    "LMOutput",
    "LongContextLM",
    "ModelConfig",
    "__version__",
    "build_model",
    "evaluate",
    "generate",
    "load_checkpoint",
    "load_config",
    "stream",
]
