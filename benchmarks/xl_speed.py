"""Speed of the Transformer-XL decoder (``xl``): training and evaluation with adaptive spans, next to the baseline.

What it measures (every figure is a median; models being compared run interleaved, step by step, so that a busy
shared machine slows them alike -- compare ratios within one run):

* ``train``: tokens/s of full training steps (forward, backward, AdamW as the trainer builds it, carried detached
  state) for ``--presets`` (default ``xl-small``, ``xl-span-small``) and the ``--baseline`` (``transformer-small``),
  in fp32 and under bf16 autocast. ``xl-span-small`` runs with its initial spans (``c = span_init``, so each head sees
  ``z + R`` = 32 tokens) -- the speed a model with learned short spans trains at.
* ``eval``: tokens/s of carry-mode evaluation (eval mode, no grad, one stream, segments of ``seq_len``, state
  carried) for ``xl-span-small`` with every span set to a quarter of ``mem_len`` and to the full ``mem_len``.
* decode latency after long prompts, for every preset: ``benchmarks/speed.py --only infer``.
* ``--xtransformers``: also trains x-transformers' Transformer-XL recurrence at the same size (the reference the
  issue's target is stated against), if the package is importable.

Run::

    python benchmarks/xl_speed.py                       # everything, 1 thread (a few minutes on a busy machine)
    python benchmarks/xl_speed.py --only train --precision bf16 --steps 20
    python benchmarks/xl_speed.py --smoke               # tiny models, seconds: checks that the script runs

Prints a JSON report on stdout and writes it to ``--output`` (default ``benchmarks/results/xl_speed.json``;
``xl_speed_smoke.json`` with ``--smoke``). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longctx.config import Config, load_config, overrides_for
from longctx.decoders.xl import XLDecoder
from longctx.model import LongContextLM, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TrainRun, XTransformersRun, log  # noqa: E402  (shared with speed.py)

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 2,
    "model.d_ff": 128,
    "model.xl.mem_len": 32,
    "model.transformer.window": 32,
    "model.xl.span_ramp": 4.0,
    "model.xl.span_cache_multiple": 8,
    "train.seq_len": 32,
    "train.batch_size": 2,
    "train.micro_batch_size": 2,
}


def load(preset: str, smoke: bool) -> Config:
    return load_config(preset, overrides_for(preset, SMOKE) if smoke else None)


def set_span_ratio(model: LongContextLM, ratio: float) -> None:
    """Every adaptive-span head of ``model`` gets the span ``ratio * mem_len``."""
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.mix.span.ratio.fill_(ratio)


# --------------------------------------------------------------------------------------------------------------------
# training


def bench_train(presets: list[str], precisions: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for precision in precisions:
        runs = {p: TrainRun(load(p, args.smoke), precision, args.seed) for p in presets}
        if args.xtransformers:
            runs["x-transformers-xl"] = XTransformersRun(load(presets[0], args.smoke), precision, args.seed)
        for i in range(args.warmup + args.steps):  # round robin: the models share the machine's load alike
            for run in runs.values():
                run.step(timed=i >= args.warmup)
        for preset, run in runs.items():
            out.append(
                {
                    "preset": preset,
                    "precision": precision,
                    "tokens_per_s": run.tokens_per_s(),
                    "step_times_s": [round(t, 4) for t in run.times],
                }
            )
            log(f"  train {preset:18s} {precision}: {run.tokens_per_s():8.0f} tokens/s")
    return out


# --------------------------------------------------------------------------------------------------------------------
# evaluation and generation


@torch.no_grad()
def read(model: LongContextLM, tokens: torch.Tensor, seq_len: int, state: Any) -> Any:
    for start in range(0, tokens.shape[1], seq_len):
        state = model(tokens[:, start : start + seq_len], state).state
    return state


def bench_eval(preset: str, ratios: list[float], args: argparse.Namespace) -> list[dict[str, Any]]:
    config = load(preset, args.smoke)
    seq_len, mem_len = config.train.seq_len, config.model.xl.mem_len
    models = {}
    for ratio in ratios:
        torch.manual_seed(args.seed)
        models[ratio] = build_model(config.model).eval()
        set_span_ratio(models[ratio], ratio)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (1, args.eval_tokens), generator=gen)
    times: dict[float, list[float]] = {r: [] for r in ratios}
    for _ in range(args.repeats):
        for ratio, model in models.items():
            t0 = time.perf_counter()
            read(model, tokens, seq_len, model.init_state(1))
            times[ratio].append(time.perf_counter() - t0)
    out = []
    for ratio, model in models.items():
        decoder = model.decoder
        assert isinstance(decoder, XLDecoder)
        rate = args.eval_tokens / statistics.median(times[ratio])
        out.append(
            {
                "preset": preset,
                "span": ratio * mem_len,
                "span_ratio": ratio,
                "tokens_per_s": rate,
                "cache_slots_per_layer": decoder.state_slots(trim=True),
                "state_bytes": model.init_state(1).nbytes(),
            }
        )
        log(
            f"  eval {preset} span {ratio * mem_len:.0f}/{mem_len}: {rate:8.0f} tokens/s, "
            f"state {model.init_state(1).nbytes():,} bytes"
        )
    return out


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="xl-small,xl-span-small", help="comma list of xl presets")
    p.add_argument("--baseline", default="transformer-small", help="preset trained alongside ('' for none)")
    p.add_argument(
        "--xtransformers",
        action="store_true",
        help="also train x-transformers' XL recurrence at the size of the first preset (the issue's "
        "reference; needs the x-transformers package)",
    )
    p.add_argument("--only", choices=["train", "eval"], action="append", help="run only these parts")
    p.add_argument("--precision", default="fp32,bf16", help="training precisions: fp32, bf16 or both")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per model")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens per carry-mode evaluation")
    p.add_argument("--repeats", type=int, default=3, help="evaluations per span setting")
    p.add_argument("--span-ratios", default="0.25,1.0", help="adaptive spans (fractions of mem_len) to evaluate")
    p.add_argument("--gen-tokens", type=int, default=50, help="timed single-token steps after each prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny models and budgets: checks that the script runs")
    p.add_argument("--output", type=Path, default=None, help="JSON report (default benchmarks/results/xl_speed.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.eval_tokens, args.repeats = 2, 1, 256, 1
    args.output = args.output or RESULTS / ("xl_speed_smoke.json" if args.smoke else "xl_speed.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    parts = args.only or ["train", "eval"]
    report: dict[str, Any] = {
        "benchmark": "xl_speed",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "train" in parts:
        log("training (round robin over the models)")
        trained = presets + ([args.baseline] if args.baseline else [])
        report["train"] = bench_train(trained, [x for x in args.precision.split(",") if x], args)
    if "eval" in parts:
        span_presets = [p for p in presets if load(p, args.smoke).model.xl.span_mode == "adaptive"]
        ratios = [float(r) for r in args.span_ratios.split(",") if r]
        log("evaluation, carry mode")
        report["eval"] = [row for p in span_presets for row in bench_eval(p, ratios, args)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
