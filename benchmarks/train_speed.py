"""Training-speed benchmark: tokens/s and model FLOP utilisation (MFU) of one preset on this machine.

What it measures
----------------
The wall-clock time of complete training steps of a freshly initialised model of ``--preset`` (default
``transformer-small``) on random tokens. One step is what the trainer does per optimizer update without gradient
accumulation::

    out = model(tokens, state, targets)             # forward with the carried (recurrent) state
    (out.loss + out.aux_loss).backward()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step(); optimizer.zero_grad()         # torch.optim.AdamW (foreach, as the trainer; see --adamw)
    state = out.state.detach()                      # truncated backprop through time

``--precision bf16`` runs forward and loss under ``torch.autocast(device, dtype=torch.bfloat16)`` (parameters,
gradients, optimizer and carried state stay fp32); ``fp32`` runs without autocast. ``--precision fp32,bf16`` measures
both, each with a fresh model and optimizer from the same seed. After ``--warmup`` untimed steps, ``--steps`` steps are
timed one by one (``time.perf_counter``); the report gives every step time and the median tokens/s = batch * seq_len /
median step time. The data are uniform random tokens: the speed of these models does not depend on the text.

Model FLOPs and MFU
-------------------
Model FLOPs per trained token (forward + backward = 3 x forward; a multiply-add counts as 2 FLOPs)::

    flops_per_token = 6 * N + 6 * d_model * vocab_size + 12 * n_layer * d_model * K

* ``N``: non-embedding parameters = every parameter except the token-embedding table (weights, biases and norm gains
  of the decoder and the final norm). The 6 * N term is the usual dense estimate (Kaplan et al. 2020).
* ``6 * d_model * vocab_size``: the output head. Its weights are tied to the embedding and therefore not in N, but
  its matmul is real work (about 1% of the total for transformer-small's byte vocabulary, more with BPE).
* ``12 * n_layer * d_model * K`` = ``6 * n_layer * d_model * K * 2``: attention scores (Q K^T) and the weighted sum of
  values (A V), 2 * d_model * K FLOPs each per token and layer in the forward pass, times 3 for training. ``K`` is the
  number of keys a query actually attends to: for the sliding-window transformer with a carried state it is
  ``window`` (each query sees itself and the previous window - 1 tokens once the stream is longer than the window,
  which it is in steady state); for the ``xl`` decoder it is ``mem_len`` (the maximum span); for ``infinite`` it is
  ``mem_len + (ltm_block - 1) / 2`` (the average exact window) plus ``n_basis / 2`` (the continuous attention's
  context ``V^T r`` is one product over the N basis functions; its scores are never formed); for ``perceiver_ar``
  the layer average of ``context`` (the cross-attention) and ``latents`` (the other layers); for ``combiner`` half
  a segment plus ``max_summaries``; for ``aft`` no attention term (``attended_keys_per_query`` = 0 in the report).
  Masked-out keys that a dense kernel may still compute are NOT counted; softmax, norms, activations, rotary
  positions and the optimizer are not counted either (they are memory-bound and small). For transformer-small the
  three terms are 84.8%, 1.2% and 14.1% of 33.5 MFLOP per token.

MFU = (flops_per_token * median tokens/s) / peak, where the peak is measured in the same run with the same thread
count: the median FLOP/s of several timed square matmuls (``--peak-size``, default 2048) in fp32, and in bf16 for the
bf16 run (bf16 x bf16 -> bf16, the kernel autocast uses for nn.Linear). ``mfu`` uses the peak of the run's own
precision; ``mfu_vs_fp32_peak`` uses the fp32 peak for both, for a precision-independent comparison.
``matmul_at_model_shapes``: the same timing for the model's own products (batch x seq_len tokens times d_model into
d_model and d_ff, and d_ff back), as a fraction of the peak: the MFU that those products alone would allow.

How to run
----------
::

    python benchmarks/train_speed.py                                   # transformer-small, fp32 and bf16
    python benchmarks/train_speed.py --precision bf16 --threads 2 --steps 30 --warmup 5
    python benchmarks/train_speed.py --preset transformer-small --set model.transformer.window=128 --seq-len 512
    python benchmarks/train_speed.py --smoke                           # tiny config, 2 steps, a few seconds (CI)
    python benchmarks/train_speed.py --precision bf16 --profile 3      # + torch.profiler op table on stderr
    python benchmarks/train_speed.py --device cuda --precision bf16 --batch-size 64 --peak-size 8192  # on a GPU

On ``--device cuda`` the model, data and peak matmuls run on the GPU and every timing waits for the GPU
(``torch.cuda.synchronize``) before reading the clock; the peak is then the GPU's measured matmul peak.

The JSON report is printed on stdout and written to ``--output`` (default ``benchmarks/results/train_speed.json``;
with ``--smoke`` the default is ``benchmarks/results/train_speed_smoke.json`` so that a smoke run never overwrites a
real measurement). Progress goes to stderr. Compare speeds of two variants only as ratios measured in one run: a
shared machine is noisy (the report records the load average at start and end; a load above the core count means
the timings are unreliable).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longctx.config import Config, load_config, overrides_for, parse_set_args
from longctx.model import build_model
from longctx.train import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (shared with the other benchmark scripts)
    add_set_option,
    cpu_flags,
    cpu_model,
    load_average,
    log,
    matmul_peak,
    model_flops,
    synchronize,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "train_speed.json"
SMOKE_OUTPUT = Path(__file__).resolve().parent / "results" / "train_speed_smoke.json"

# the tiny config of --smoke: 2 layers of width 64, 2 steps of 2 x 32 tokens
SMOKE_OVERRIDES = {
    "model.n_layer": "2",
    "model.n_head": "2",
    "model.d_model": "64",
    "model.d_ff": "128",
    "model.transformer.window": "32",
}


# --------------------------------------------------------------------------------------------------------------------
# machine


# --------------------------------------------------------------------------------------------------------------------
# model FLOPs


# --------------------------------------------------------------------------------------------------------------------
# training steps


def make_optimizer(model: torch.nn.Module, cfg: Config, impl: str) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it (weight decay on matrices only), with the implementation ``impl``."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {}
    if impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "fused":
        kwargs["fused"] = True
    elif impl == "forloop":
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), **kwargs)


def run_precision(cfg: Config, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = args.device
    model = build_model(cfg.model).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, args.adamw)
    batch, seq_len = args.batch_size, args.seq_len
    n_steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.model.vocab_size, (n_steps + args.profile, batch, seq_len + 1), generator=gen)
    data = data.to(device)  # (steps, B, T + 1)
    state = model.init_state(batch)
    autocast = precision == "bf16"

    def step(i: int) -> float:
        nonlocal state
        tokens, targets = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(tokens, state, targets)
            loss = out.loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = out.state.detach()
        return float(loss.detach())

    losses = []
    for i in range(args.warmup):
        losses.append(step(i))
    times = []
    for i in range(args.warmup, n_steps):
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(step(i))  # float(loss) waits for the device too
        times.append(time.perf_counter() - t0)
        log(f"  {precision} step {i - args.warmup + 1}/{args.steps}: {times[-1] * 1e3:.1f} ms")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for i in range(n_steps, n_steps + args.profile):
                step(i)
        log(f"torch.profiler, {precision}, {args.profile} steps:")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))

    tokens_per_step = batch * seq_len
    median = statistics.median(times)
    return {
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "step_times_s": [round(t, 6) for t in times],
        "median_step_s": median,
        "mean_step_s": statistics.fmean(times),
        "min_step_s": min(times),
        "tokens_per_s": tokens_per_step / median,
        "tokens_per_s_best": tokens_per_step / min(times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="transformer-small", help="preset name or TOML path (default transformer-small)")
    add_set_option(p, "override one config key, e.g. --set model.n_layer=4 (repeatable)")
    p.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or a comma list (default fp32,bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0 = torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto")
    p.add_argument(
        "--batch-size", type=int, default=None, help="lanes per step (default: the preset's train.batch_size)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per lane and step (default: train.seq_len)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; 1 with --smoke)")
    p.add_argument(
        "--adamw",
        choices=["default", "forloop", "foreach", "fused"],
        default="foreach",
        help="AdamW implementation: foreach (default, as longctx.train builds it), fused, forloop, or "
        "default (torch's own choice)",
    )
    p.add_argument("--peak-size", type=int, default=None, help="square matmul size of the peak (default 2048)")
    p.add_argument("--peak-repeats", type=int, default=None, help="timed matmuls for the peak (default 7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, profile this many steps with torch.profiler and print the op table on stderr",
    )
    p.add_argument("--profile-rows", type=int, default=30, help="rows of the profiler table (default 30)")
    p.add_argument("--smoke", action="store_true", help="tiny config, 2 steps: checks that the script runs (CI)")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON report path (default benchmarks/results/train_speed.json; "
        "benchmarks/results/train_speed_smoke.json with --smoke)",
    )
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in ("fp32", "bf16")]
    if bad or not args.precisions:
        p.error(f"--precision takes fp32, bf16 or fp32,bf16; got {args.precision!r}")
    smoke = args.smoke
    args.steps = args.steps if args.steps is not None else (2 if smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.peak_size = args.peak_size if args.peak_size is not None else (256 if smoke else 2048)
    args.peak_repeats = args.peak_repeats if args.peak_repeats is not None else (5 if smoke else 7)
    args.output = args.output if args.output is not None else (SMOKE_OUTPUT if smoke else DEFAULT_OUTPUT)
    for name in ("steps", "peak_size", "peak_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.threads < 0 or args.profile < 0:
        p.error("--warmup, --threads and --profile must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
    overrides.update(parse_set_args(args.overrides))
    cfg = load_config(args.preset, overrides_for(args.preset, overrides))
    if args.batch_size is None:
        args.batch_size = 2 if args.smoke else cfg.train.batch_size
    if args.seq_len is None:
        args.seq_len = 32 if args.smoke else cfg.train.seq_len
    if args.batch_size < 1 or args.seq_len < 1:
        raise SystemExit("--batch-size and --seq-len must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    threads = torch.get_num_threads()
    load_start = load_average()
    log(
        f"train_speed: {cfg.preset} on {args.device}, batch {args.batch_size} x seq {args.seq_len}, {threads} threads, "
        f"{args.warmup} warmup + {args.steps} timed steps, precision {','.join(args.precisions)}"
    )

    peaks = {"fp32": matmul_peak(torch.float32, args.peak_size, args.peak_repeats, args.device)}
    if "bf16" in args.precisions:
        peaks["bf16"] = matmul_peak(torch.bfloat16, args.peak_size, args.peak_repeats, args.device)
    for name, peak in peaks.items():
        log(f"  matmul peak {name}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({args.peak_size}^3, median)")

    # the rate of the model's own matmuls (tokens of a step x d_model into d_model and d_ff, and back): the ceiling of
    # its MFU when the peak's square matmuls run faster than these narrow ones
    n_tok, d, ff = args.batch_size * args.seq_len, cfg.model.d_model, cfg.model.d_ff
    model_shapes = [(n_tok, d, d), (n_tok, d, ff), (n_tok, ff, d)]
    shape_rates = []
    for name in peaks:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        for shape in model_shapes:
            rate = matmul_peak(dtype, 0, args.peak_repeats, args.device, shape)
            rate["fraction_of_peak"] = rate["flops_per_s"] / peaks[name]["flops_per_s"]
            shape_rates.append(rate)
            log(
                f"  matmul {name} {'x'.join(map(str, shape))}: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s "
                f"({rate['fraction_of_peak']:.2f} of the peak)"
            )

    flops = model_flops(cfg, build_model(cfg.model))
    runs = []
    for precision in args.precisions:
        run = run_precision(cfg, precision, args)
        achieved = flops["flops_per_token"] * run["tokens_per_s"]
        run["model_flops_per_s"] = achieved
        run["mfu"] = achieved / peaks[precision]["flops_per_s"]
        run["mfu_vs_fp32_peak"] = achieved / peaks["fp32"]["flops_per_s"]
        runs.append(run)
        log(
            f"  {precision}: {run['tokens_per_s']:.0f} tokens/s (median step {run['median_step_s'] * 1e3:.1f} ms), "
            f"{achieved / 1e9:.1f} GFLOP/s, MFU {run['mfu'] * 100:.1f}%"
        )

    report: dict[str, Any] = {
        "benchmark": "train_speed",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "preset": cfg.preset,
        "smoke": args.smoke,
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": threads,
            "device": str(args.device),
            "cuda_device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
            "mkldnn": torch.backends.mkldnn.is_available(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "adamw": args.adamw,
            "grad_clip": 1.0,
            "seed": args.seed,
        },
        "model": cfg.to_dict()["model"],
        "flops": flops,
        "matmul_peak": peaks,
        "matmul_at_model_shapes": shape_rates,
        "results": runs,
    }
    if len(runs) > 1:
        base = runs[0]["tokens_per_s"]
        report["speedup_vs_first"] = {r["precision"]: r["tokens_per_s"] / base for r in runs}

    text = json.dumps(report, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    log(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
