"""Shared test helpers: tiny model configurations, the memory length of a decoder, seeds and threads.

A decoder added to ``longctx.decoders.DECODERS`` gets the contract tests for free: its class states its tiny
sub-config (``TINY``) and its memory length (``memory_length``), the facts the tests need.
"""

from __future__ import annotations

import copy
import functools
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
    _merge(model, copy.deepcopy(DECODERS[decoder].TINY))
    _merge(model, overrides)
    return Config.from_dict({"model": model}, where=f"tiny test config for {decoder!r}").model


def memory_length(cfg: ModelConfig) -> int:
    """How many past tokens the memory of ``cfg``'s decoder covers (``Decoder.memory_length``)."""
    return DECODERS[cfg.decoder].memory_length(cfg)


def build_tiny_model(decoder: str, **overrides: Any) -> LongContextLM:
    """A seeded tiny model in eval mode, fp32, on the CPU."""
    torch.manual_seed(SEED)
    model = build_model(tiny_model_config(decoder, **overrides))
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# the contract cases: every decoder with its tiny configuration, and the variants whose code paths differ

SPAN_MODES: dict[str, dict[str, Any]] = {  # xl's learned spans (on top of its tiny config)
    "adaptive": {"mem_len": 8, "span_mode": "adaptive", "span_ramp": 2.0, "span_init": 0.5, "span_cache_multiple": 2},
    "dynamic": {"mem_len": 8, "span_mode": "dynamic", "span_ramp": 2.0, "span_init": 0.5},
}
AFT_VARIANTS = ("simple", "local", "conv", "full")
AFT_FARS = ("uniform", "decay")
INFINITE_VARIANTS: dict[str, dict[str, Any]] = {
    "sticky": {"sticky": True},
    "gate": {"gate": True},
    "sticky-gate-own-bias": {"sticky": True, "gate": True, "share_bias": False},
    "separate": {"ltm_out": "separate"},
    "separate-gate": {"ltm_out": "separate", "gate": True},
}


def set_span_ratios(model: LongContextLM, values: list[list[float]]) -> None:
    """Adaptive spans: the ratio (span / mem_len) of every head, one list per layer."""
    with torch.no_grad():
        for block, ratios in zip(model.decoder.blocks, values, strict=True):
            block.mix.span.ratio.copy_(torch.tensor(ratios))


def randomise_aft_biases(model: LongContextLM, scale: float = 1.0) -> LongContextLM:
    """Non-zero AFT position biases (the initial ones are 0, which would make every variant look like simple), and
    far decays λ = exp(θ) between ~0.05 and ~3 per token (the initial ones, down to 1/4096, barely act on short
    tests)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.decoder.blocks:
            for name in ("bias", "bias_gain", "bias_shift"):
                p = getattr(block.mix, name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.copy_(scale * torch.randn(p.shape, generator=g))
            if block.mix.log_decay is not None:
                block.mix.log_decay.copy_(torch.empty(block.mix.log_decay.shape).uniform_(-3.0, 1.0, generator=g))
    return model


def _adaptive_spans() -> LongContextLM:
    model = build_tiny_model("xl", xl=SPAN_MODES["adaptive"])
    set_span_ratios(model, [[0.3, 0.6], [0.6, 0.3]])  # two spans per layer: 2.4 and 4.8 tokens (+ ramp 2), trimmed
    return model


CONTRACT_CASES: dict[str, Callable[[], LongContextLM]] = {
    **{name: functools.partial(build_tiny_model, name) for name in sorted(DECODERS)},
    "xl-adaptive": _adaptive_spans,
    "xl-dynamic": functools.partial(build_tiny_model, "xl", xl=SPAN_MODES["dynamic"]),
    **{  # every variant with non-zero biases and decays (the plain case runs ``local`` with its initial ones)
        f"aft-{variant}-{far}": functools.partial(
            lambda v, f: randomise_aft_biases(build_tiny_model("aft", aft={"variant": v, "far": f})), variant, far
        )
        for variant in AFT_VARIANTS
        for far in AFT_FARS
    },
    **{
        f"infinite-{name}": functools.partial(build_tiny_model, "infinite", infinite=INFINITE_VARIANTS[name])
        for name in ("sticky", "gate", "separate-gate")
    },
    # the model's previous-token embedding wraps the decoder's state (xl: a decoder with its own reset)
    **{
        f"{decoder}-previous-token": functools.partial(build_tiny_model, decoder, previous_token_embedding=True)
        for decoder in ("transformer", "xl")
    },
}
"""Every test that takes the ``tiny_model`` fixture (the contract tests) runs once per case."""


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


@pytest.fixture(params=sorted(CONTRACT_CASES))
def tiny_model(request: pytest.FixtureRequest) -> LongContextLM:
    """Every contract case (each decoder and its variants), one test instance each."""
    return CONTRACT_CASES[request.param]()


@pytest.fixture
def make_tiny_model() -> Callable[..., LongContextLM]:
    """Factory fixture: ``make_tiny_model("transformer", n_layer=1)``."""
    return build_tiny_model


@pytest.fixture
def tiny_memory_length(tiny_model: LongContextLM) -> int:
    return memory_length(tiny_model.cfg)
