"""The contract checks of test_contract.py on CUDA in fp32 and under bf16 autocast (marked ``gpu``: skipped without
CUDA; ``benchmarks/gpu_check.sh`` runs them), the same model's logits on CUDA against the CPU, and the bf16
tolerances below checked on the CPU in the normal suite (chunking invariance and causality, every decoder).

Tolerances. fp32 on CUDA keeps test_contract.py's own (TF32 is off for matmuls by default in PyTorch, so CUDA fp32
differs from the CPU by accumulation order only, ~1e-6 on these logits). Under bf16 autocast the logits leave the
output head in bf16, where one rounding step is 2^-8 ~ 0.0039 for |logit| in [0.5, 1); different call patterns round
different intermediate sums: ``BF16_ATOL`` = 2e-2 allows ~5 steps (the checks pass at 5e-3 on the CPU).
"Same inputs, same shapes" comparisons get one rounding step (``BF16_EXACT_ATOL``), in case a GPU kernel orders a
reduction differently between two calls; a real influence (>= ~5e-4 in fp32, ~1e-2 for direct ones) stays above
``CHANGED``.
"""

from __future__ import annotations

import contextlib

import pytest
import test_contract as contract  # the shared contract checks (same folder; pytest puts it on sys.path)
import torch
from conftest import memory_length

from longctx.model import LongContextLM

BF16_ATOL = 2e-2
BF16_EXACT_ATOL = 2.0**-8
CPU_BF16_CHECKS = ["test_causality", "test_chunking_invariance"]


def _run_check(model: LongContextLM, check: str, precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    autocast = contextlib.nullcontext()
    if precision == "bf16":
        monkeypatch.setattr(contract, "ATOL", BF16_ATOL)
        monkeypatch.setattr(contract, "EXACT_ATOL", BF16_EXACT_ATOL)
        autocast = torch.autocast(model.device.type, dtype=torch.bfloat16)
    with autocast:
        contract.run_check(check, model, memory_length(model.cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("check", sorted(contract.contract_checks()))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_contract_on_cuda(make_tiny_model, monkeypatch, decoder_name: str, precision: str, check: str) -> None:
    _run_check(make_tiny_model(decoder_name).cuda(), check, precision, monkeypatch)


@pytest.mark.parametrize("check", CPU_BF16_CHECKS)
def test_contract_under_bf16_autocast_on_the_cpu(make_tiny_model, monkeypatch, decoder_name: str, check: str) -> None:
    _run_check(make_tiny_model(decoder_name), check, "bf16", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_logits_equal_the_cpu_logits(make_tiny_model, decoder_name: str, precision: str) -> None:
    """The same weights and tokens on CUDA (the ``auto`` kernels of a GPU) and on the CPU in fp32, in two calls."""
    model = make_tiny_model(decoder_name)
    mem = memory_length(model.cfg)
    tokens = contract._tokens(model, 2, 3 * mem + 70)
    cut = mem + 5
    with torch.no_grad():
        cpu_first = model(tokens[:, :cut], model.init_state(2))
        cpu = torch.cat([cpu_first.logits, model(tokens[:, cut:], cpu_first.state).logits], dim=1)
        model.cuda()
        tokens = tokens.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            first = model(tokens[:, :cut], model.init_state(2))
            cuda = torch.cat([first.logits, model(tokens[:, cut:], first.state).logits], dim=1)
    atol = contract.ATOL if precision == "fp32" else BF16_ATOL
    torch.testing.assert_close(cuda.float().cpu(), cpu, atol=atol, rtol=0)
