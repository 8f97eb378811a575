"""AFT speed benchmark: training tokens/s (fp32, bf16), eval tokens/s, generation latency, peak RSS per preset.

What it measures, for each preset of ``--presets`` (default: the four ``aft-*-small`` presets; any preset works,
e.g. ``transformer-small`` as the baseline):

* training tokens/s in fp32 and bf16: the step of ``benchmarks/train_speed.py`` (forward with the carried state,
  backward, clipping, AdamW), with all presets *interleaved* (one step of each in turn, in one process), so that
  they see the same load and their ratios are meaningful on a shared machine; median of ``--train-steps`` per preset.
  ``train_speed.py --preset NAME`` gives one preset's speed and MFU on its own;
* eval tokens/s: a batch-1 stream of random tokens read in segments of ``train.seq_len`` with the state carried
  (``longctx eval``'s carry mode), fp32, no gradients; measured while reading the longest prompt below;
* generation latency: after a prompt of 1k, 10k and 100k tokens (read as above), the median wall time of one
  single-token forward (the recurrent form) over ``--gen-tokens`` steps, the prompt lengths taking turns step by
  step; ``flatness`` = latency after the longest prompt / latency after the shortest (1.0 = flat; the AFT state
  does not grow, so it should stay within ~10 %);
* peak RSS: ``ru_maxrss`` of a child process that does the eval and generation measurements of one preset;
  ``state_bytes``: ``state.nbytes()`` for one stream.

Speeds of a shared machine are noisy: compare presets as ratios from one run, and repeat. Random tokens: the speed
of these models does not depend on the text.

Run::

    python benchmarks/aft_speed.py                                        # all AFT presets, ~10 minutes
    python benchmarks/aft_speed.py --presets transformer-small,aft-simple-small,aft-local-small --threads 1
    python benchmarks/aft_speed.py --skip-train --gen-tokens 16            # eval and generation only
    python benchmarks/aft_speed.py --smoke                                 # tiny and quick: the script runs (CI)

The JSON report goes to stdout and ``--output`` (default ``benchmarks/results/aft_speed.json``); progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longctx.config import load_config
from longctx.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (the sibling benchmark: its optimizer set-up is reused)

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "aft_speed.json"
PRESETS = "aft-simple-small,aft-local-small,aft-conv-small,aft-full-small"
SMOKE = {"model.n_layer": "1", "model.d_model": "64", "model.d_ff": "128"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_inference(preset: str, prompt_lengths: list[int], gen_tokens: int, overrides: dict[str, str],
                      seed: int) -> dict[str, Any]:
    """Eval tokens/s and per-token generation latency after each prompt length (in this process).

    The prompts are read first (one state per length); the single-token steps then go round-robin over the states,
    so that every prompt length sees the same machine load and ``flatness`` compares like with like."""
    cfg = load_config(preset, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    seq_len, lengths = cfg.train.seq_len, sorted(prompt_lengths)
    gen = torch.Generator().manual_seed(seed)
    states, tokens, read_tps = {}, {}, {}
    with torch.no_grad():
        for length in lengths:
            prompt = torch.randint(0, cfg.model.vocab_size, (1, length), generator=gen)
            state = model.init_state(1)
            t0 = time.perf_counter()
            for start in range(0, length, seq_len):
                state = model(prompt[:, start:start + seq_len], state).state
            read_tps[length] = length / (time.perf_counter() - t0)
            states[length], tokens[length] = state, prompt[:, -1:]
            log(f"  {preset}: prompt of {length:,} tokens read at {read_tps[length]:,.0f} tokens/s")
        times: dict[int, list[float]] = {length: [] for length in lengths}
        for _ in range(gen_tokens):
            for length in lengths:
                t0 = time.perf_counter()
                out = model(tokens[length], states[length])
                times[length].append(time.perf_counter() - t0)
                states[length], tokens[length] = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
    latency = {str(length): statistics.median(t) for length, t in times.items()}
    log(f"  {preset}: generation " + ", ".join(f"{v * 1e3:.2f} ms/token after {k}" for k, v in latency.items()))
    return {
        "eval_tokens_per_s": read_tps[lengths[-1]],  # the longest prompt, read in segments of train.seq_len
        "generation_latency_s": latency,
        "flatness": latency[str(lengths[-1])] / latency[str(lengths[0])],
        "state_bytes": model.init_state(1).nbytes(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_training(presets: list[str], precision: str, steps: int, overrides: dict[str, str],
                     seed: int) -> dict[str, dict[str, Any]]:
    """Training tokens/s of every preset, interleaved: one step of each preset in turn, so that all of them see the
    same machine load. The step is train_speed.py's (forward with the carried state, backward, clipping, AdamW with
    train_speed.make_optimizer, state detached). Two untimed rounds first; returns the median per preset."""
    runs = []
    for preset in presets:
        cfg = load_config(preset, overrides)
        torch.manual_seed(seed)
        model = build_model(cfg.model).train()
        B, T = cfg.train.batch_size, cfg.train.seq_len
        data = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed))
        runs.append({"preset": preset, "model": model, "opt": train_speed.make_optimizer(model, cfg, "foreach"),
                     "state": model.init_state(B), "data": data, "times": []})
    for round_ in range(steps + 2):
        for run in runs:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = run["model"](run["data"][:, :-1], run["state"], run["data"][:, 1:])
            (out.loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["state"] = out.state.detach()
            if round_ >= 2:
                run["times"].append(time.perf_counter() - t0)
    results = {}
    for run in runs:
        tokens = run["data"].shape[0] * (run["data"].shape[1] - 1)
        median = statistics.median(run["times"])
        results[run["preset"]] = {"tokens_per_s": tokens / median, "median_step_s": median,
                                  "step_times_s": [round(t, 4) for t in run["times"]]}
        log(f"  training {precision}: {run['preset']}: {tokens / median:,.0f} tokens/s (median of {steps} steps)")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default=PRESETS, help=f"comma list of presets (default {PRESETS})")
    p.add_argument("--prompt-lengths", default="1000,10000,100000", help="prompt tokens before generation")
    p.add_argument("--gen-tokens", type=int, default=32, help="timed single-token steps per prompt (default 32)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per precision (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0 = torch's default)")
    p.add_argument("--skip-train", action="store_true", help="only eval, generation and RSS")
    p.add_argument("--smoke", action="store_true", help="1 layer of width 64, short prompts, 2 steps (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report path")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
    if args.smoke:
        args.lengths, args.gen_tokens, args.train_steps = [300, 1000], 4, 2
    if not args.lengths or min(args.lengths) < 1 or args.gen_tokens < 1 or args.train_steps < 1:
        p.error("--prompt-lengths, --gen-tokens and --train-steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    overrides = dict(SMOKE) if args.smoke else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one preset, in a fresh process so that its peak RSS is its own
        result = measure_inference(args.child, args.lengths, args.gen_tokens, overrides, args.seed)
        print(json.dumps(result))
        return result
    report: dict[str, Any] = {"benchmark": "aft_speed", "argv": sys.argv[1:] if argv is None else argv,
                              "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "threads": args.threads or torch.get_num_threads(), "presets": {}}
    presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    for preset in presets:
        log(f"aft_speed: {preset}")
        child = [sys.executable, __file__, "--child", preset, "--prompt-lengths", ",".join(map(str, args.lengths)),
                 "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(child + (["--smoke"] if args.smoke else []), check=True, capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        report["presets"][preset] = json.loads(done.stdout.strip().splitlines()[-1])
    if not args.skip_train:
        for precision in ("fp32", "bf16"):
            trained = measure_training(presets, precision, args.train_steps, overrides, args.seed)
            for preset, result in trained.items():
                report["presets"][preset].setdefault("train", {})[precision] = result
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
