"""Shared test helpers: tiny model configurations, the memory length of a decoder, seeds and threads.

A decoder added to ``longctx.decoders.DECODERS`` gets the contract tests for free. To make them fast and meaningful,
register its tiny sub-config in ``TINY_OVERRIDES`` and, if its memory is not described by a ``window`` or
``mem_len`` field, its memory length in ``MEMORY_LENGTH`` -- both in this file, nowhere else.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from longctx.config import Config, ModelConfig
from longctx.decoders import DECODERS
from longctx.model import LongContextLM, build_model

# One intra-op thread: the tensors here are tiny, and with 2+ threads every op pays an OpenMP barrier that costs
# milliseconds when the cores are busy (measured on a 2-core machine with one other busy process: ~0.7 ms per tiny
# forward with 1 thread, ~100 ms with 2). Keeps the suite fast and its runtime stable.
torch.set_num_threads(1)

SEED = 1234

# Shared by every decoder: 2 layers, width 32, 2 heads (head width 16, even for rotary positions), odd vocabulary.
TINY_BASE: dict[str, Any] = {"n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64, "vocab_size": 61}


def _no_overrides() -> dict[str, Any]:
    return {}


# decoder name -> function returning model-level overrides (nested dicts, as in a TOML preset's [model] table).
# A decoder without an entry uses TINY_BASE and its sub-config's defaults.
TINY_OVERRIDES: dict[str, Callable[[], dict[str, Any]]] = {
    "transformer": lambda: {"transformer": {"window": 8}},
    # fixed span here; tests/decoders/test_xl.py runs the same contract checks with adaptive and dynamic spans
    "xl": lambda: {"xl": {"mem_len": 8}},
    # local with its initial (zero) biases; tests/decoders/test_aft.py runs them for every variant with random biases
    "aft": lambda: {"aft": {"variant": "local", "window": 4, "heads": 2, "max_distance": 6}},
    # refits every 4 tokens from position 8 on: several LTM versions within every contract stream (and segment);
    # tests/decoders/test_infinite.py runs the same contract checks with sticky memories and the gate
    "infinite": lambda: {
        "infinite": {
            "mem_len": 4,
            "ltm_block": 4,
            "n_basis": 16,
            "sigmas": [0.05, 0.1],
            "n_samples": 16,
            "sticky_bins": 8,
        }
    },
    # 1 cross-attention (context 8) + 2 latent layers (latents 4); half of each head's channels rotated
    "perceiver_ar": lambda: {"n_layer": 3, "perceiver_ar": {"context": 8, "latents": 4, "rotary_fraction": 0.5}},
    # segments of 4, 3 summaries kept: every contract stream crosses many segments and drops old summaries
    "combiner": lambda: {"combiner": {"segment": 4, "max_summaries": 3}},
}


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into ``into`` (nested dicts are merged, other values replaced)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def tiny_model_config(decoder: str, **overrides: Any) -> ModelConfig:
    """A tiny, validated ModelConfig for ``decoder``; ``overrides`` (e.g. ``n_layer=1`` or
    ``transformer={"window": 4}``) are applied last. Built through ``Config.from_dict`` so every value is checked."""
    model: dict[str, Any] = {"decoder": decoder, **TINY_BASE}
    _merge(model, TINY_OVERRIDES.get(decoder, _no_overrides)())
    _merge(model, overrides)
    return Config.from_dict({"model": model}, where=f"tiny test config for {decoder!r}").model


# decoder name -> number of past tokens its memory covers (the stream length at which the memory is "full").
MEMORY_LENGTH: dict[str, Callable[[ModelConfig], int]] = {
    "transformer": lambda cfg: cfg.transformer.window,
    "xl": lambda cfg: cfg.xl.mem_len,
    "aft": lambda cfg: max(4, {"simple": 1, "full": cfg.aft.max_distance}.get(cfg.aft.variant, cfg.aft.window)),
    "infinite": lambda cfg: cfg.infinite.mem_len + cfg.infinite.ltm_block,  # the largest exact window (+ itself)
    "perceiver_ar": lambda cfg: cfg.perceiver_ar.context,  # the cross-attention window (the longest cache)
    "combiner": lambda cfg: cfg.combiner.segment * (cfg.combiner.max_summaries + 1),  # own segment + S summaries
}

_GENERIC_MEMORY_FIELDS = ("window", "mem_len")


def memory_length(cfg: ModelConfig) -> int:
    """How many past tokens the memory of ``cfg``'s decoder covers (for ``transformer``: the window).

    Decoders without an entry in ``MEMORY_LENGTH`` fall back to the largest ``window``/``mem_len`` field of their
    sub-config; if they have none, register them in ``MEMORY_LENGTH``.
    """
    if cfg.decoder in MEMORY_LENGTH:
        return MEMORY_LENGTH[cfg.decoder](cfg)
    sub = cfg.decoder_config()
    found = [getattr(sub, name) for name in _GENERIC_MEMORY_FIELDS if isinstance(getattr(sub, name, None), int)]
    if not found:
        raise LookupError(f"no memory length for decoder {cfg.decoder!r}: add it to MEMORY_LENGTH in tests/conftest.py")
    return max(found)


def build_tiny_model(decoder: str, **overrides: Any) -> LongContextLM:
    """A seeded tiny model in eval mode, fp32, on the CPU."""
    torch.manual_seed(SEED)
    model = build_model(tiny_model_config(decoder, **overrides))
    return model.eval()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is available (``benchmarks/gpu_check.sh``) and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(params=sorted(DECODERS))
def decoder_name(request: pytest.FixtureRequest) -> str:
    """Every registered decoder, one test instance each."""
    return request.param


@pytest.fixture
def tiny_model(decoder_name: str) -> LongContextLM:
    return build_tiny_model(decoder_name)


@pytest.fixture
def make_tiny_model() -> Callable[..., LongContextLM]:
    """Factory fixture: ``make_tiny_model("transformer", n_layer=1)``."""
    return build_tiny_model


@pytest.fixture
def tiny_memory_length(tiny_model: LongContextLM) -> int:
    return memory_length(tiny_model.cfg)
