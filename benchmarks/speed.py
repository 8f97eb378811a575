"""Speed and memory of every decoder, side by side: one entry point for all presets.

What it measures, for each preset of ``--presets`` (default: every bundled preset), every figure a median:

* ``train``: tokens/s of complete training steps (forward with the carried state, backward, clipping, AdamW as the
  trainer builds it, state detached; random tokens, ``train.batch_size`` x ``train.seq_len``) in fp32 and under
  bf16 autocast. All presets are *interleaved* (one step of each in turn, in one process) so that they see the same
  load and their ratios mean something on a shared machine. Model FLOP utilisation = model FLOPs per token (the
  formula of ``benchmarks/train_speed.py``) x tokens/s / the matmul peak measured at the start of the same run in
  the same precision. ``--xtransformers`` adds x-transformers' Transformer-XL recurrence at the size of
  ``xl-small`` and ``--perceiver-ar-pytorch`` perceiver-ar-pytorch's model at the size of ``perceiver-ar-small``
  (the references the decoder issues state their targets against; each needs its package). ``--compile`` adds
  every preset again under ``torch.compile`` (``PRESET+compile``, in the same rounds), with ``warmup_s`` (the
  untimed steps, compilation included) and ``speed_vs_eager``.
* ``infer`` (a fresh process per preset): prompt ingestion tokens/s (a batch-1 prompt read in segments of
  ``read_segment(train.seq_len)`` tokens with the state carried, as ``generate`` and ``eval`` read) and the per-token
  decode latency (one token in, logits out, state carried) after prompts of ``--prompt-lengths`` tokens (default 1k,
  10k, 100k), the lengths taking turns token by token; ``flatness`` = latency after the longest prompt / after the
  shortest (1.0 = flat). ``--xtransformers`` adds x-transformers at ``xl-small``'s size: its XL recurrence (memory
  carried, decode included) and its memoryless window of ``train.seq_len`` tokens (each segment read alone; ingestion
  only). Their segments stay at ``train.seq_len``: for them the segment length is part of the model (what a token
  can see).
* ``rss`` (a fresh process per preset, input size and eval precision): ``longctx eval``'s code path
  (``evaluate_documents``, carry mode with eval's default segments, byte tokenizer, a freshly initialised model,
  ``--eval-precision`` fp32 by default) over one file of ``--rss-sizes`` megabytes made by concatenating the bundled
  corpus; the process's peak RSS (the report's ``peak_rss_bytes``: ``VmHWM`` on Linux, not ``ru_maxrss``, which
  counts the parent's size at the fork), the eval tokens/s and wall time. ``rss_growth`` = peak RSS of the largest
  input / of the smallest (1.0 = flat). With ``--rss-sizes 1`` (a million byte tokens) the wall time is the
  million-token evaluation.

Speeds of a shared machine are noisy: compare presets as ratios from one run and repeat. The report records the
load average before and after; a load above the core count means other work shared the cores.

Run::

    python benchmarks/speed.py                                      # everything (hours: 100 MB evals included)
    python benchmarks/speed.py --only train --threads 2 --train-steps 10
    python benchmarks/speed.py --presets transformer-small,infinite-small --only infer,rss --rss-sizes 0.25,1,4
    python benchmarks/speed.py --only rss --rss-sizes 1 --threads 2 --eval-precision fp32,bf16
                                                                    # a million-token evaluation per preset
    python benchmarks/speed.py --only rss --set model.n_layer=2 --set model.d_model=64 --set model.d_ff=256
                                                                    # eval memory of narrow models (faster)
    python benchmarks/speed.py --smoke                              # tiny models, seconds: the script runs (CI)

The JSON report goes to stdout and ``--output`` (default ``benchmarks/results/speed.json``;
``speed_smoke.json`` with ``--smoke``); progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longctx.config import Config, list_presets, load_config, overrides_for, parse_set_args
from longctx.errors import LongctxError
from longctx.model import build_model, read_segment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (machine facts, matmul peak, the model-FLOP formula, interleaved training steps)
    TrainRun,
    XTransformersRun,
    add_set_option,
    cpu_model,
    load_average,
    log,
    matmul_peak,
    model_flops,
    xtransformers_model,
)

HERE = Path(__file__).resolve().parent
PARTS = ("train", "infer", "rss")
SMOKE = {
    "model.n_layer": 1,
    "model.d_model": 32,
    "model.n_head": 2,
    "model.d_ff": 64,
    "train.batch_size": 2,
    "train.seq_len": 32,
}
SMOKE_PRESETS = "transformer-small,infinite-small,aft-local-small"


def preset_config(preset: str, args: argparse.Namespace) -> Config:
    """The preset with ``--smoke``'s tiny sizes and then ``--set``'s overrides applied."""
    return load_config(preset, overrides_for(preset, (SMOKE if args.smoke else {}) | args.overrides))


# --------------------------------------------------------------------------------------------------------------------
# training


class PerceiverARPytorchRun(TrainRun):
    """The peer of the ``perceiver_ar`` issue: perceiver-ar-pytorch's ``PerceiverAR`` at the size of ``config``
    (``perceiver-ar-small``): one cross-attention over a prefix of ``context`` tokens, ``n_layer - 1`` causal
    self-attention layers over ``seq_len`` latents, same width, heads and FFN. A step trains ``batch x seq_len``
    tokens (the latents) from ``batch x (context + seq_len)`` inputs, as ours does with a carried state. fp32 only:
    under bf16 autocast its attention masks overflow (version 0.0.10)."""

    def build(self, config: Config) -> torch.nn.Module:
        from perceiver_ar_pytorch import PerceiverAR  # optional: pip install perceiver-ar-pytorch

        m, context = config.model, config.model.perceiver_ar.context
        gen = torch.Generator().manual_seed(0)
        self.inputs = torch.randint(
            1, m.vocab_size, (config.train.batch_size, context + config.train.seq_len + 1), generator=gen
        )  # token 0 is the package's ignore index
        return PerceiverAR(
            num_tokens=m.vocab_size,
            dim=m.d_model,
            depth=m.n_layer - 1,
            heads=m.n_head,
            dim_head=m.head_dim,
            ff_mult=m.d_ff // m.d_model,
            max_seq_len=context + config.train.seq_len,
            cross_attn_seq_len=context,
        ).train()

    def loss(self) -> torch.Tensor:
        return self.model(self.inputs[:, :-1], labels=self.inputs[:, 1:])


def measure_training(presets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s and MFU of every preset (and the optional reference) per precision, interleaved step by step."""
    peaks = {
        p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, args.peak_size, 5) for p in args.precisions
    }
    out: dict[str, Any] = {"matmul_peak_flops_per_s": {p: v["flops_per_s"] for p, v in peaks.items()}, "runs": {}}
    for precision in args.precisions:
        configs = {p: preset_config(p, args) for p in presets}
        runs: dict[str, TrainRun] = {p: TrainRun(c, precision, args.seed) for p, c in configs.items()}
        if args.compile:  # each preset again under torch.compile, in the same rounds
            runs |= {f"{p}+compile": TrainRun(c, precision, args.seed, compiled=True) for p, c in configs.items()}
        if args.xtransformers:
            runs["x-transformers-xl"] = XTransformersRun(preset_config("xl-small", args), precision, args.seed)
        if args.perceiver_ar_pytorch and precision == "fp32":  # its masks overflow bf16 (the figure: fp32)
            runs["perceiver-ar-pytorch"] = PerceiverARPytorchRun(
                preset_config("perceiver-ar-small", args), precision, args.seed
            )
        for i in range(args.warmup + args.train_steps):
            for run in runs.values():
                run.step(timed=i >= args.warmup)
        for name, run in runs.items():
            row: dict[str, Any] = {"tokens_per_s": run.tokens_per_s(), "step_times_s": [round(t, 4) for t in run.times]}
            base = name.removesuffix("+compile")
            if base in configs:
                flops = model_flops(configs[base], run.model)["flops_per_token"]
                row |= {"flops_per_token": flops, "mfu": flops * row["tokens_per_s"] / peaks[precision]["flops_per_s"]}
            if name != base:
                eager = out["runs"][base][precision]["tokens_per_s"]
                row |= {"warmup_s": run.warmup_s, "speed_vs_eager": row["tokens_per_s"] / eager}
            out["runs"].setdefault(name, {})[precision] = row
            mfu = f", MFU {row['mfu']:.2f}" if "mfu" in row else ""
            log(f"  train {name:22s} {precision}: {row['tokens_per_s']:8,.0f} tokens/s{mfu}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# inference: prompt ingestion and decode latency (child process per preset)


XT_REFERENCES = ("x-transformers-xl", "x-transformers-window")  # --xtransformers, infer part


Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]  # (tokens (1, T), state) -> (logits, next state)


def time_stream(
    name: str, step: Step, empty: Any, vocab: int, seq_len: int, args: argparse.Namespace, decode: bool = True
) -> tuple[dict[str, Any], Any]:
    """Prompt ingestion tokens/s per prompt length (segments of ``seq_len``, the state carried from ``empty``), then
    the decode latency after each, lengths round robin; the figures and the state after the longest prompt."""
    lengths = sorted(args.lengths)
    gen = torch.Generator().manual_seed(args.seed)
    states, tokens, ingest = {}, {}, {}
    for length in lengths:
        prompt = torch.randint(0, vocab, (1, length), generator=gen)
        state = empty
        t0 = time.perf_counter()
        for start in range(0, length, seq_len):
            state = step(prompt[:, start : start + seq_len], state)[1]
        ingest[str(length)] = length / (time.perf_counter() - t0)
        states[length], tokens[length] = state, prompt[:, -1:]
        log(f"  {name}: prompt of {length:,} tokens read at {ingest[str(length)]:,.0f} tokens/s")
    result: dict[str, Any] = {"ingest_tokens_per_s": ingest}
    if decode:
        times: dict[int, list[float]] = {length: [] for length in lengths}
        for _ in range(args.gen_tokens):
            for length in lengths:
                t0 = time.perf_counter()
                logits, states[length] = step(tokens[length], states[length])
                times[length].append(time.perf_counter() - t0)
                tokens[length] = logits[:, -1].argmax(-1, keepdim=True)
        latency = {str(length): statistics.median(t) for length, t in times.items()}
        log(f"  {name}: decode " + ", ".join(f"{v * 1e3:.2f} ms/token after {k}" for k, v in latency.items()))
        result |= {"decode_latency_s": latency, "flatness": latency[str(lengths[-1])] / latency[str(lengths[0])]}
    return result, states[lengths[-1]]


@torch.no_grad()
def measure_xtransformers_inference(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The inference references at ``xl-small``'s size: x-transformers' XL recurrence (prompt read in segments with
    its memory carried, then one token at a time) and its memoryless window (each segment read alone; no decode
    figure, since it has no memory to carry)."""
    cfg = preset_config("xl-small", args)
    torch.manual_seed(args.seed)
    recurrent = name == "x-transformers-xl"
    model = xtransformers_model(cfg, recurrent).eval()

    def step(tokens: torch.Tensor, mems: Any) -> tuple[torch.Tensor, Any]:
        return model(tokens, mems=mems, return_mems=True) if recurrent else (model(tokens), None)

    result, mems = time_stream(name, step, None, cfg.model.vocab_size, cfg.train.seq_len, args, decode=recurrent)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if recurrent:
        result["state_bytes"] = sum(m.numel() * m.element_size() for m in mems)
    return result


@torch.no_grad()
def measure_inference(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Prompt ingestion tokens/s per prompt length, then the decode latency after each, lengths round robin."""
    cfg = preset_config(preset, args)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).eval()

    def step(tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out = model(tokens, state)
        return out.logits, out.state

    empty = model.init_state(1)
    seq_len = read_segment(cfg.train.seq_len)  # generate's default segment for a prompt
    result, state = time_stream(preset, step, empty, cfg.model.vocab_size, seq_len, args)
    return result | {
        "seq_len": seq_len,
        "state_bytes": state.nbytes(),
        "state_bytes_empty": empty.nbytes(),
        "parameters": model.num_parameters(),
    }


# --------------------------------------------------------------------------------------------------------------------
# eval peak RSS on inputs of growing size (child process per preset and size)


def corpus_file(folder: Path, megabytes: float) -> Path:
    """A file of ``megabytes`` MB (10^6 bytes) made by concatenating the bundled corpus as often as needed."""
    from longctx.data import bundled_documents

    size = int(megabytes * 1e6)
    path = folder / f"corpus-{size}.txt"
    if path.is_file() and path.stat().st_size == size:
        return path
    texts = []
    for doc in bundled_documents():
        with doc.open() as f:
            texts.append(f.read())
    corpus = b"".join(texts)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = corpus[: size - written]
            f.write(chunk)
            written += len(chunk)
    return path


def measure_eval_rss(preset: str, path: Path, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """``longctx eval --ppl FILE`` (carry mode) with a fresh model of ``preset``: peak RSS, tokens/s, wall time."""
    from longctx.data import discover
    from longctx.scoring import EvalOptions, evaluate_documents
    from longctx.tokenizer import Tokenizer

    cfg = preset_config(preset, args)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).eval()
    seq_len = read_segment(cfg.train.seq_len)  # eval's default segment
    opts = EvalOptions(mode="carry", seq_len=seq_len, precision=precision)  # type: ignore[arg-type]
    start = time.perf_counter()
    result = evaluate_documents(model, Tokenizer.byte_level(), discover([str(path)]), opts)
    wall = time.perf_counter() - start
    rss = result["peak_rss_bytes"]  # the eval report's own figure: this process's high-water mark
    log(
        f"  {preset}: eval of {path.stat().st_size / 1e6:g} MB ({precision}): peak RSS {rss / 2**20:,.1f} MiB, "
        f"{result['tokens_per_s']:,.0f} tokens/s, {wall:.1f} s"
    )
    return {
        "precision": precision,
        "seq_len": seq_len,
        "wall_s": wall,
        "bytes": path.stat().st_size,
        "tokens": result["tokens"],
        "tokens_per_s": result["tokens_per_s"],
        "peak_rss_bytes": rss,
        "parameters": model.num_parameters(),
    }


def run_child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """This script in a fresh process (so that its peak RSS is its own); returns the JSON it prints last."""
    cmd = [
        sys.executable,
        __file__,
        *extra,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--prompt-lengths",
        ",".join(map(str, args.lengths)),
        "--gen-tokens",
        str(args.gen_tokens),
        *(f"--set={key}={value}" for key, value in args.overrides.items()),
    ]
    done = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"speed: child {' '.join(extra)} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="", help="comma list of presets (default: every bundled preset)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts to run (default {','.join(PARTS)})")
    p.add_argument("--precision", default="fp32,bf16", help="training precisions (default fp32,bf16)")
    p.add_argument("--eval-precision", default="fp32", help="eval precisions of the rss part (default fp32)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per preset (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per preset (default 2)")
    p.add_argument(
        "--xtransformers",
        action="store_true",
        help="train: also x-transformers' XL at xl-small's size; infer: also its XL recurrence and its window",
    )
    p.add_argument("--compile", action="store_true", help="also train every preset under torch.compile")
    p.add_argument(
        "--perceiver-ar-pytorch",
        action="store_true",
        help="also train perceiver-ar-pytorch's PerceiverAR at perceiver-ar-small's size",
    )
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size of the peak (default 2048)")
    p.add_argument("--prompt-lengths", default="1000,10000,100000", help="prompt tokens before decoding")
    p.add_argument("--gen-tokens", type=int, default=32, help="timed single-token steps per prompt (default 32)")
    p.add_argument("--rss-sizes", default="1,10,100", help="eval input sizes in MB (default 1,10,100)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the eval inputs are written (default: temp)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    add_set_option(p, "override one config key for every preset and part, e.g. --set model.d_model=64 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny models, short prompts and inputs, 2 steps (CI)")
    p.add_argument("--output", type=Path, default=None, help="JSON report (default benchmarks/results/speed.json)")
    p.add_argument("--child-infer", default="", help=argparse.SUPPRESS)  # internal: one preset in this process
    p.add_argument("--child-rss", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: PRESET FILE PRECISION
    args = p.parse_args(argv)
    try:
        args.overrides = parse_set_args(args.overrides)
        for preset in [x.strip() for x in args.presets.split(",") if x.strip()] or list_presets():
            preset_config(preset, args)  # a bad preset or key fails here, before hours of work
    except LongctxError as e:
        p.error(str(e))
    args.parts = [x for x in args.only.split(",") if x]
    args.precisions = [x for x in args.precision.split(",") if x]
    args.eval_precisions = [x for x in args.eval_precision.split(",") if x]
    args.lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
    args.sizes = [float(x) for x in args.rss_sizes.split(",") if x.strip()]
    if args.smoke:
        args.presets = args.presets or SMOKE_PRESETS
        args.lengths, args.gen_tokens, args.train_steps, args.warmup = [100, 400], 3, 2, 1
        args.sizes, args.peak_size = [0.002, 0.008], 256
    bad = [x for x in args.parts if x not in PARTS] + [
        x for x in args.precisions + args.eval_precisions if x not in ("fp32", "bf16")
    ]
    if bad:
        p.error(f"unknown part or precision: {', '.join(bad)}")
    if not args.lengths or min(args.lengths) < 1 or args.gen_tokens < 1 or args.train_steps < 1:
        p.error("--prompt-lengths, --gen-tokens and --train-steps must be positive")
    if not args.sizes or min(args.sizes) <= 0:
        p.error("--rss-sizes must be positive numbers of megabytes")
    args.output = args.output or HERE / "results" / ("speed_smoke.json" if args.smoke else "speed.json")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_infer:
        measure = measure_xtransformers_inference if args.child_infer in XT_REFERENCES else measure_inference
        result = measure(args.child_infer, args)
        print(json.dumps(result))
        return result
    if args.child_rss:
        result = measure_eval_rss(args.child_rss[0], Path(args.child_rss[1]), args.child_rss[2], args)
        print(json.dumps(result))
        return result
    presets = [x.strip() for x in args.presets.split(",") if x.strip()] or list_presets()
    report: dict[str, Any] = {
        "benchmark": "speed",
        "argv": sys.argv[1:] if argv is None else argv,
        "smoke": args.smoke,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": args.threads,
        "load_average_start": load_average(),
        "presets": presets,
        "parts": args.parts,
        "overrides": args.overrides,
    }
    if "train" in args.parts:
        log(f"speed: training, {len(presets)} presets interleaved, {args.train_steps} timed steps per precision")
        report["train"] = measure_training(presets, args)
    if "infer" in args.parts:
        report["infer"] = {}
        for preset in presets:
            log(f"speed: prompt ingestion and decode latency, {preset}")
            report["infer"][preset] = run_child(args, "--child-infer", preset)
        for name in XT_REFERENCES if args.xtransformers else ():
            log(f"speed: prompt ingestion and decode latency, {name} (at xl-small's size)")
            report["infer"][name] = run_child(args, "--child-infer", name)
    if "rss" in args.parts:
        report["rss"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.work_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            files = [corpus_file(folder, mb) for mb in args.sizes]
            for preset in presets:
                log(f"speed: eval peak RSS, {preset}")
                for precision in args.eval_precisions:
                    rows = [run_child(args, "--child-rss", preset, str(f), precision) for f in files]
                    key = preset if precision == "fp32" else f"{preset} ({precision})"
                    report["rss"][key] = {
                        "precision": precision,
                        "runs": rows,
                        "rss_growth": rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"],
                        "eval_tokens_per_s": rows[-1]["tokens_per_s"],
                    }
    report["load_average_end"] = load_average()
    text = json.dumps(report, indent=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
