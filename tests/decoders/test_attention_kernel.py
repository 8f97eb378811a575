"""``model.attention_kernel`` at the decoder level: transformer and perceiver_ar with each kernel against the same
model with a naive masked softmax attention in float64 in its place, and the contract checks with the kernel that
``auto`` does not pick on the CPU (``sdpa``; the registry's contract tests run ``banded`` there).

Tolerances: logits of the tiny models are ~0.1-1. In fp32 the kernels differ from the float64 reference by float32
rounding (~1e-7 relative), which the remaining layers carry to the logits unchanged in size: 1e-5 is ~100x that.
Under bf16 autocast every linear layer rounds to 8 significant bits in both models alike; only the attention
differs (float64 vs bf16 products), by at most ~1e-2 of its O(1) output (tests/layers/test_attention.py), which the
small output projection shrinks before it reaches the residual stream. The logits leave the output head in bf16,
where one rounding step is 2^-8 ~ 0.0039 for |logit| in [0.5, 1): 1e-2 allows two such steps (measured: one,
0.0039), and windows half as long still move the logits by more than 3x that (checked).
"""

from __future__ import annotations

import dataclasses

import pytest
import test_contract as contract  # the shared contract checks (same folder; pytest puts it on sys.path)
import torch
from conftest import memory_length
from torch import Tensor

from longctx.config import load_config
from longctx.errors import ConfigError
from longctx.layers import attention as attention_module
from longctx.layers.attention import WindowPattern
from longctx.model import LongContextLM

DECODERS = ["transformer", "perceiver_ar"]
KERNELS = ["banded", "sdpa"]
FP32_ATOL = 1e-5
BF16_ATOL = 1e-2


def naive_attention(
    kernel: str, q: Tensor, keys: Tensor, values: Tensor, pattern: WindowPattern, grad_start: int = 0
) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v in float64 with the full mask of ``pattern`` -> (B, H, T, Dh) in q.dtype."""
    mask = pattern.allowed()
    scores = q.double() @ keys.double().transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, T, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values.double()).to(q.dtype)


def _model(make_tiny_model, decoder: str, kernel: str) -> LongContextLM:
    return make_tiny_model(decoder, attention_kernel=kernel)


def _logits(model: LongContextLM, tokens: Tensor, bf16: bool) -> Tensor:
    """Logits (B, T, V) in float32 of ``tokens`` in two calls (the second reads the cache the first left)."""
    cut = tokens.shape[1] // 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        first = model(tokens[:, :cut], model.init_state(tokens.shape[0]))
        second = model(tokens[:, cut:], first.state)
    return torch.cat([first.logits, second.logits], dim=1).float()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_kernel_equals_naive_attention_in_the_decoder(
    make_tiny_model, monkeypatch, decoder: str, kernel: str, bf16: bool
) -> None:
    model = _model(make_tiny_model, decoder, kernel)
    mem = memory_length(model.cfg)
    tokens = contract._tokens(model, 2, 150 + 3 * mem)  # more than two blocks of banded queries in the 2nd call
    got = _logits(model, tokens, bf16)
    monkeypatch.setattr(attention_module, "window_attention", naive_attention)  # WindowAttention's kernel call
    want = _logits(model, tokens, bf16)
    atol = BF16_ATOL if bf16 else FP32_ATOL
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    # the check can fail: the same model with windows half as long is well outside the tolerance
    window = {"transformer": {"window": mem // 2}, "perceiver_ar": {"context": mem // 2}}[decoder]
    shorter = make_tiny_model(decoder, attention_kernel=kernel, **{decoder: window})
    assert (_logits(shorter, tokens, bf16) - want).abs().max() > 3 * atol


@pytest.mark.parametrize("check", sorted(contract.contract_checks()))
@pytest.mark.parametrize("decoder", DECODERS)
def test_contract_with_the_sdpa_kernel_on_the_cpu(make_tiny_model, decoder: str, check: str) -> None:
    model = _model(make_tiny_model, decoder, "sdpa")
    contract.run_check(check, model, memory_length(model.cfg))


def test_the_kernel_is_read_from_the_config_only_where_it_applies() -> None:
    assert load_config("transformer-small").model.attention_kernel == "auto"
    assert load_config("perceiver-ar-small", {"model.attention_kernel": "sdpa"}).model.attention_kernel == "sdpa"
    with pytest.raises(ConfigError, match="model.attention_kernel applies to the transformer and perceiver_ar"):
        load_config("xl-small", {"model.attention_kernel": "banded"})
    with pytest.raises(ConfigError, match="model.attention_kernel must be one of"):
        load_config("transformer-small", {"model.attention_kernel": "flash"})


def test_auto_is_the_banded_kernel_on_the_cpu(make_tiny_model) -> None:
    """``auto`` (the default) gives bit for bit what ``banded`` gives on the CPU for windows under 2,048 (the tiny
    models'), for both decoders."""
    for decoder in DECODERS:
        auto = make_tiny_model(decoder)
        banded = LongContextLM(dataclasses.replace(auto.cfg, attention_kernel="banded")).eval()
        banded.load_state_dict(auto.state_dict())
        tokens = contract._tokens(auto, 2, 90)
        assert torch.equal(_logits(auto, tokens, False), _logits(banded, tokens, False))
