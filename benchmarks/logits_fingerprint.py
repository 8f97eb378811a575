"""Logits of every preset on a fixed input and seed, to show that a refactoring changed no numbers.

For each preset (default: every bundled one), a model is built with ``torch.manual_seed(--seed)`` and reads
``--tokens`` random tokens of one stream (seeded too) in carry mode, the three ways the tool reads text: segments of
the preset's ``seq_len`` with the state carried (training and ``eval``), the same under autograd (the training
path), and the last ``--decode`` tokens one at a time (``generate``). All logits and the final state go to one
safetensors file per run; ``--compare`` checks a new run against a saved one, tensor by tensor.

Run::

    python benchmarks/logits_fingerprint.py --save /tmp/before.safetensors     # on the old code
    python benchmarks/logits_fingerprint.py --compare /tmp/before.safetensors  # on the new code: max |difference|

Exits with status 1 when a tensor differs by more than ``--atol`` (default 1e-6) or is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import safetensors.torch
import torch

from longctx.config import list_presets, load_config
from longctx.model import build_model


def fingerprint(preset: str, n_tokens: int, n_decode: int, seed: int) -> dict[str, torch.Tensor]:
    """Logits (and final state tensors) of ``preset`` under the three reading paths, keyed ``PRESET/path``."""
    cfg = load_config(preset)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(cfg.model.vocab_size, 256), (1, n_tokens), generator=g)
    seq_len = cfg.train.seq_len
    prefix = n_tokens - n_decode
    out: dict[str, torch.Tensor] = {}

    def read(grad: bool) -> tuple[torch.Tensor, object]:
        state, logits = model.init_state(1), []
        with torch.set_grad_enabled(grad):
            for start in range(0, prefix, seq_len):
                step = model(tokens[:, start : min(prefix, start + seq_len)], state)
                logits.append(step.logits.detach())
                state = step.state.detach()
        return torch.cat(logits, dim=1), state

    out[f"{preset}/segments"], state = read(grad=False)
    out[f"{preset}/segments_grad"], _ = read(grad=True)
    decoded = []
    with torch.no_grad():
        for t in range(prefix, n_tokens):
            step = model(tokens[:, t : t + 1], state)
            decoded.append(step.logits)
            state = step.state
    out[f"{preset}/decode"] = torch.cat(decoded, dim=1)
    for name, tensor in state.tensors().items():
        out[f"{preset}/state/{name}"] = tensor.detach().contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="", help="comma-separated (default: every bundled preset)")
    p.add_argument("--tokens", type=int, default=1100, help="stream length (default 1100)")
    p.add_argument("--decode", type=int, default=40, help="last tokens read one at a time (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=1)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, help="write the fingerprint here")
    group.add_argument("--compare", type=Path, help="compare with this saved fingerprint")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = [x for x in args.presets.split(",") if x] or list_presets()
    tensors: dict[str, torch.Tensor] = {}
    for preset in presets:
        tensors.update(fingerprint(preset, args.tokens, args.decode, args.seed))
        print(f"{preset}: done", file=sys.stderr, flush=True)
    if args.save:
        safetensors.torch.save_file(tensors, str(args.save))
        print(f"wrote {len(tensors)} tensors to {args.save}")
        return 0
    saved = safetensors.torch.load_file(str(args.compare))
    worst, failed = 0.0, False
    for name, tensor in tensors.items():
        if name not in saved or saved[name].shape != tensor.shape:
            print(f"{name}: missing or reshaped in {args.compare}")
            failed = True
            continue
        diff = (tensor.double() - saved[name].double()).abs().max().item() if tensor.numel() else 0.0
        worst = max(worst, diff)
        if diff > args.atol:
            print(f"{name}: max |difference| {diff:.3g} > {args.atol:g}")
            failed = True
    print(f"{len(tensors)} tensors of {len(presets)} presets; max |difference| {worst:.3g} (atol {args.atol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
