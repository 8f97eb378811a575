"""Quality benchmark: does distant context help? Every decoder trained alike, then scored with and without its memory.

What it does
------------
1. Trains every preset of ``--presets`` (default: every bundled preset, ``longctx.config.list_presets()``) with the
   library trainer (``longctx.train.train``) on the same data (the preset's corpus, by default the bundled one), in the
   same order (the trainer's contiguous lanes), from the same seed (``--seed``), for the same budget of ``--tokens``
   training tokens: ``train.max_steps = ceil(tokens / (batch_size * seq_len))`` (the learning-rate schedule decays
   over that many steps; the warm-up is cut to a tenth of them when the preset's is longer) and
   ``train.max_tokens = tokens``. Each preset trains in its own run folder
   ``--out-dir/PRESET`` with ``resume="auto"``: running the script again skips the presets whose run reached the
   budget, resumes the unfinished ones from their last checkpoint, and reuses evaluations already made
   (``quality_eval.json`` in the run folder, keyed by checkpoint and evaluation settings).
2. Scores the held-out documents (for the bundled corpus: the three held-out plays), each cut to its first
   ``--eval-bytes`` bytes (0 = whole documents), three ways, with ``longctx.scoring.evaluate_documents``:

   * ``carry``: the memory carried through each document (``longctx eval --ppl``), segments of ``train.seq_len``;
   * ``cut``: the memory cut to the decoder's exact attention window W (``common.attention_window``: the window,
     ``mem_len``, short-term memory, bias window, ... of each decoder). Sliding mode with window 2W and stride W:
     windows of 2W tokens read from an empty memory, W apart, each scoring the W tokens the previous one did not
     reach (the first window scores all its tokens, as carry mode does at the start of a document). Every scored
     token is predicted from between W and 2W - 1 preceding tokens: the query's whole exact window (itself and its
     W - 1 predecessors) always holds real text, as in carry mode, but nothing older than 2W - 1 tokens is
     available, through any memory or stacked layer. For a one-layer sliding-window transformer, cut equals carry
     exactly. For the ∞-former presets (``mem_len = ltm_block = W``) the windows start on LTM block boundaries, so
     every query's short-term memory spans exactly the tokens it spans in carry mode and only the long-term memory
     is empty: delta is what the LTM buys. Costs about twice carry mode;
   * ``reset``: the memory reset every W tokens (carry mode with an empty state at stream positions 0, W, 2W, ...;
     computed as sliding mode with window W + 1 and stride W, which is the same computation): a scored token sees
     between 1 and W preceding tokens. It penalises short context inside the window too, so ``reset`` - ``carry``
     mixes that loss with the loss of distant context; ``cut`` isolates the distant part.

   ``delta_bpb = cut_bpb - carry_bpb`` is what the memory of tokens beyond the exact window buys, in bits per byte
   (positive = it helps; it is only a lower bound for tokens 2W..: context between W and 2W - 1 tokens back is
   partly available to ``cut`` too). Standard errors treat tokens as independent (as ``longctx eval``).
3. Writes the mean NLL (nats per token) by log-spaced position bucket [2^b, 2^(b+1)) of every preset and mode to one
   CSV next to ``--output`` (``per_position.csv``; ``per_position_X.csv`` for ``quality_X.json``, ``NAME_per_position``
   for any other ``NAME.json``; columns preset, decoder, mode, start, end, mean_nll, count) and draws it (a PNG of the
   same name: carry curves, and cut - carry by position) with matplotlib if it is installed (the ``plot`` extra:
   ``pip install -e '.[plot]'``); without it one line says the plot was skipped.

The report (JSON on stdout and in ``--output``, default ``benchmarks/results/quality.json``) holds the machine, the
budget and, per preset: tokens trained, training wall time (the training loop, including its periodic validation and
checkpoint writes, summed over resumed runs) and tokens/s, the three evaluations (bits per byte with standard error,
loss, tokens, eval tokens/s), ``delta_bpb``, ``reset_delta_bpb``, the per-position rows and what the decoder
learned (``learned``: its ``describe()``, e.g. the spans of every head). A preset that fails is
reported with its error and the others go on; the exit code is then 1. Progress goes to stderr.

How to run
----------
::

    python benchmarks/quality.py --threads 2                     # every preset, 10.24 M tokens each (hours per preset)
    python benchmarks/quality.py --tokens 100000 --presets transformer-small,xl-small,infinite-small \\
        --eval-bytes 20000 --threads 1                           # a short run: minutes
    python benchmarks/quality.py --set train.eval_tokens=16384   # any config key, for every preset
    python benchmarks/quality.py --smoke --output /tmp/q.json    # tiny models and budget, seconds (CI)

``--smoke`` trains 1-layer width-32 versions of two presets for a few steps, in ``--out-dir`` (default
``benchmarks/results/quality-runs-smoke``) and writes ``quality_smoke.json`` and ``per_position_smoke.*`` so that it
never mixes with a real run. Re-running with another ``--tokens`` continues the runs to the new budget (the cosine
schedule is then stretched from where the runs are); a run folder holding another model is refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    TINY_MODEL_OVERRIDES,
    # noqa: E402,
    add_set_option,
    attention_window,
    budget_overrides,
    log,
    machine_info,
    parse_list,
    run_progress,
    setup_logging,
    timestamp,
    train_preset,
    write_report,
)

from longctx.checkpoint import load_checkpoint  # noqa: E402
from longctx.config import Config, list_presets, load_config, overrides_for, parse_set_args  # noqa: E402
from longctx.data import Document, discover, split_documents  # noqa: E402
from longctx.scoring import EvalOptions, evaluate_documents  # noqa: E402
from longctx.train import Interrupted, resolve_device  # noqa: E402

DEFAULT_TOKENS = 10_240_000  # the presets' own budget: 5,000 steps of 8 lanes x 256 tokens
DEFAULT_OUTPUT = RESULTS / "quality.json"
SMOKE_OUTPUT = RESULTS / "quality_smoke.json"
DEFAULT_RUNS = RESULTS / "quality-runs"
SMOKE_RUNS = RESULTS / "quality-runs-smoke"
SMOKE_PRESETS = "transformer-small,infinite-small"
SMOKE_TOKENS = 6 * 4 * 32  # 6 steps of 4 lanes x 32 tokens
SMOKE_EVAL_BYTES = 1500
SMOKE_OVERRIDES = TINY_MODEL_OVERRIDES | {
    "train.warmup_steps": "2",
    "train.log_interval": "2",
    "train.eval_interval": "1000",
    "train.eval_tokens": "512",
    "train.save_interval": "1000",
}
EVAL_FILE = "quality_eval.json"
EVAL_VERSION = 1  # bump when the definition of a mode changes, so that cached evaluations are redone
MODES = ("carry", "cut", "reset")


# --------------------------------------------------------------------------------------------------------------------
# evaluation


def utf8_prefix(data: bytes, limit: int) -> bytes:
    """The longest prefix of ``data`` of at most ``limit`` bytes that does not split a UTF-8 character."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and (data[end] & 0xC0) == 0x80:  # data[end] continues a character begun before it
        end -= 1
    return data[:end]


def truncated(doc: Document, limit: int) -> Document:
    """``doc`` cut to its first ``limit`` bytes (at a character boundary); the name stays."""
    with doc.open() as f:
        data = utf8_prefix(f.read(limit + 4), limit)
    return Document(doc.name, len(data), doc.mtime_ns, lambda d=data: io.BytesIO(d))


def held_out_documents(cfg: Config, eval_bytes: int) -> list[Document]:
    """The documents the run held out for validation (the last ``data.val_docs``), cut to ``eval_bytes`` each."""
    _, val = split_documents(discover(cfg.data.paths), cfg.data.val_docs)
    if not val:
        raise SystemExit("quality: the run's data has no held-out document; give several files in data.paths")
    return [truncated(d, eval_bytes) for d in val] if eval_bytes else val


def eval_options(window: int, seq_len: int, precision: str) -> dict[str, EvalOptions]:
    """The three readings of the module docstring, for an exact attention window of ``window`` tokens."""
    w = max(window, 1)
    common: dict[str, Any] = {"per_position_buckets": True, "precision": precision}
    return {
        "carry": EvalOptions(mode="carry", seq_len=seq_len, **common),
        "cut": EvalOptions(mode="sliding", window=2 * w, stride=w, **common),
        "reset": EvalOptions(mode="sliding", window=w + 1, stride=w, **common),
    }


def summarize_eval(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one evaluation, with the standard error of bits per byte."""
    bpb_per_nat = result["tokens"] / (result["bytes"] * math.log(2)) if result["bytes"] else math.inf
    keys = (
        "mode",
        "seq_len",
        "window",
        "stride",
        "tokens",
        "bytes",
        "loss",
        "loss_stderr",
        "bits_per_byte",
        "tokens_per_s",
        "elapsed_s",
    )
    return {k: result[k] for k in keys if k in result} | {
        "bits_per_byte_stderr": result["loss_stderr"] * bpb_per_nat,
        "per_position": result["per_position"],
    }


def evaluate_preset(checkpoint: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """carry / cut / reset evaluations of ``checkpoint``; reused from ``quality_eval.json`` when nothing changed."""
    cache = checkpoint.parent / EVAL_FILE
    key = {
        "version": EVAL_VERSION,
        "checkpoint": checkpoint.name,
        "eval_bytes": args.eval_bytes,
        "precision": args.precision,
    }
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            log(f"  evaluation reused from {cache}")
            return saved["evaluation"]
    model, tokenizer, cfg = load_checkpoint(checkpoint)
    model.to(device)
    docs = held_out_documents(cfg, args.eval_bytes)
    window, rule = attention_window(cfg.model, cfg.train.seq_len)
    evaluation: dict[str, Any] = {
        "window": window,
        "window_rule": rule,
        "documents": [d.name for d in docs],
        "parameters": model.num_parameters(),
        "state_bytes": model.init_state(1).nbytes(),
    }
    for mode, opts in eval_options(window, cfg.train.seq_len, args.precision).items():
        result = summarize_eval(evaluate_documents(model, tokenizer, docs, opts))
        evaluation[mode] = result
        log(
            f"  {mode:<5}: bpb {result['bits_per_byte']:.4f} +/- {result['bits_per_byte_stderr']:.4f} "
            f"({result['tokens']:,} tokens, {result['tokens_per_s']:,.0f} tokens/s)"
        )
    cache.write_text(json.dumps({"key": key, "evaluation": evaluation}, indent=1), encoding="utf-8")
    return evaluation


# --------------------------------------------------------------------------------------------------------------------
# one preset


def run_preset(
    preset: str, args: argparse.Namespace, overrides: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Train (or resume, or skip) and evaluate one preset; the per-preset part of the report."""
    overrides = overrides_for(preset, overrides)
    base = load_config(preset, overrides)
    full = overrides | budget_overrides(base, args, overrides)
    cfg = load_config(preset, full)
    out_dir = args.out_dir / preset
    train_preset(preset, cfg, full, out_dir)
    checkpoint, meta = run_progress(out_dir)
    if checkpoint is None:
        raise RuntimeError(f"no checkpoint in {out_dir} after training")
    evaluation = evaluate_preset(checkpoint, args, device)
    learned = load_checkpoint(checkpoint)[0].decoder.describe()  # spans, AFT biases and decays, ...
    tokens, elapsed = int(meta.get("tokens_seen", 0)), float(meta.get("elapsed_s", 0.0))
    carry, cut, reset = (evaluation[m] for m in MODES)
    return {
        "decoder": cfg.model.decoder,
        "run_dir": str(out_dir),
        "checkpoint": str(checkpoint),
        "steps": int(meta.get("step", 0)),
        "tokens_trained": tokens,
        "train_wall_s": elapsed,
        "train_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "val_at_end": meta.get("val"),
        "parameters": evaluation["parameters"],
        "state_bytes": evaluation["state_bytes"],
        "window": evaluation["window"],
        "window_rule": evaluation["window_rule"],
        "carry_bpb": carry["bits_per_byte"],
        "cut_bpb": cut["bits_per_byte"],
        "reset_bpb": reset["bits_per_byte"],
        "delta_bpb": cut["bits_per_byte"] - carry["bits_per_byte"],
        "reset_delta_bpb": reset["bits_per_byte"] - carry["bits_per_byte"],
        "evaluation": {m: evaluation[m] for m in MODES},
        "documents": evaluation["documents"],
        "learned": learned,
    }


# --------------------------------------------------------------------------------------------------------------------
# per-position table and plot


def per_position_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (preset, mode, position bucket), for the presets that have results."""
    rows = []
    for preset, res in results.items():
        for mode in MODES if "evaluation" in res else ():
            for r in res["evaluation"][mode]["per_position"]:
                rows.append({"preset": preset, "decoder": res["decoder"], "mode": mode, **r})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["preset", "decoder", "mode", "start", "end", "mean_nll", "count"])
        for r in rows:
            writer.writerow(
                [r["preset"], r["decoder"], r["mode"], r["start"], r["end"], f"{r['mean_nll']:.6f}", r["count"]]
            )


def per_position_stem(output: Path) -> str:
    """Name of the CSV and plot beside ``output``: quality.json -> per_position, quality_1m.json -> per_position_1m,
    run.json -> run_per_position (so that reports of several budgets can sit side by side)."""
    stem = output.stem
    if stem == "quality" or stem.startswith("quality_"):
        return "per_position" + stem.removeprefix("quality")
    return f"{stem}_per_position"


def plot_per_position(rows: list[dict[str, Any]], path: Path) -> bool:
    """Two panels: carry-mode mean NLL by position, and cut - carry by position; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot skipped: matplotlib is not installed (pip install -e '.[plot]' or pip install matplotlib)")
        return False
    curves: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
    for r in rows:  # preset -> mode -> bucket start -> (geometric middle of the bucket, mean NLL)
        middle = math.sqrt(r["start"] * (r["end"] - 1)) if r["end"] > r["start"] + 1 else r["start"]
        curves.setdefault(r["preset"], {}).setdefault(r["mode"], {})[r["start"]] = (middle, r["mean_nll"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours; the default cycle repeats after 10 presets
    for i, (preset, modes) in enumerate(curves.items()):
        style = {
            "marker": ".",
            "label": preset,
            "color": colours[(2 * i) % 20 + (2 * i) // 20 % 2],
            "linestyle": "-" if i % 2 == 0 else "--",
        }
        carry = modes.get("carry", {})
        xs = sorted(carry)
        left.plot([carry[s][0] for s in xs], [carry[s][1] for s in xs], **style)
        cut = modes.get("cut", {})
        both = [s for s in xs if s in cut]
        right.plot([carry[s][0] for s in both], [cut[s][1] - carry[s][1] for s in both], **style)
    left.set(
        xscale="log",
        xlabel="token position in the document",
        ylabel="mean NLL (nats/token)",
        title="carry mode: loss by position",
    )
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set(
        xscale="log",
        xlabel="token position in the document",
        ylabel="cut - carry (nats/token)",
        title="what the memory beyond the window buys, by position",
    )
    left.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--presets",
        default=None,
        help=f"comma list of presets (default: every bundled preset; {SMOKE_PRESETS} with --smoke)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"training tokens per preset (default {DEFAULT_TOKENS:,}; {SMOKE_TOKENS} with --smoke)",
    )
    p.add_argument(
        "--eval-bytes",
        type=int,
        default=None,
        help=f"bytes of each held-out document to score, 0 = all (default 0; {SMOKE_EVAL_BYTES} with --smoke)",
    )
    add_set_option(p, "override one config key for every preset, e.g. --set train.eval_tokens=16384 (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0 = torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="training and evaluation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default auto)")
    p.add_argument("--seed", type=int, default=1337, help="training seed, the same for every preset (default 1337)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"run folders, one per preset (default {DEFAULT_RUNS}; {SMOKE_RUNS} with --smoke)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON report (default {DEFAULT_OUTPUT}; {SMOKE_OUTPUT} with --smoke); the per-position CSV "
        "and plot are written next to it",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, tiny budget, 2 presets: seconds (CI)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.presets = parse_list(args.presets or (SMOKE_PRESETS if smoke else ",".join(list_presets())))
    args.tokens = args.tokens if args.tokens is not None else (SMOKE_TOKENS if smoke else DEFAULT_TOKENS)
    args.eval_bytes = args.eval_bytes if args.eval_bytes is not None else (SMOKE_EVAL_BYTES if smoke else 0)
    args.out_dir = args.out_dir or (SMOKE_RUNS if smoke else DEFAULT_RUNS)
    args.output = args.output or (SMOKE_OUTPUT if smoke else DEFAULT_OUTPUT)
    if not args.presets or args.tokens < 1 or args.eval_bytes < 0 or args.threads < 0:
        p.error("--presets must name at least one preset, --tokens must be >= 1, --eval-bytes and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
    overrides.update(parse_set_args(args.overrides))
    device = resolve_device(args.device)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for preset in args.presets:
        log(f"quality: {preset}")
        try:
            results[preset] = run_preset(preset, args, overrides, device)
        except Interrupted as e:  # Ctrl-C / SIGTERM: the trainer saved a checkpoint; stop here, resume later
            log(f"quality: {e}; run the same command again to resume")
            raise SystemExit(getattr(e, "exit_code", 130)) from None
        except (Exception, SystemExit) as e:  # one broken preset must not lose the hours spent on the others
            log(f"{preset}: failed: {e}\n{traceback.format_exc(limit=3)}")
            results[preset] = {"error": f"{type(e).__name__}: {e}"}
    rows = per_position_rows(results)
    stem = per_position_stem(args.output)
    csv_path, png_path = args.output.parent / f"{stem}.csv", args.output.parent / f"{stem}.png"
    write_csv(rows, csv_path)
    plotted = plot_per_position(rows, png_path)
    report = {
        "benchmark": "quality",
        "timestamp": timestamp(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "smoke": args.smoke,
        "machine": machine_info(torch.get_num_threads()),
        "settings": {
            "presets": args.presets,
            "tokens": args.tokens,
            "eval_bytes": args.eval_bytes,
            "precision": args.precision,
            "seed": args.seed,
            "device": str(device),
            "out_dir": str(args.out_dir),
            "overrides": overrides,
        },
        "definitions": {
            "carry": "memory carried through each held-out document (longctx eval --ppl)",
            "cut": "sliding windows of 2W tokens, stride W, empty memory: every token sees W..2W-1 preceding tokens",
            "reset": "memory reset every W tokens (sliding window W+1, stride W): 1..W preceding tokens",
            "W": "the decoder's exact attention window (benchmarks/common.py attention_window)",
            "delta_bpb": "cut_bpb - carry_bpb: what memory beyond the window buys (positive = it helps)",
            "reset_delta_bpb": "reset_bpb - carry_bpb",
        },
        "presets": results,
        "per_position_csv": str(csv_path),
        "per_position_png": str(png_path) if plotted else None,
        "wall_s": time.monotonic() - started,
    }
    write_report(report, args.output)
    for preset, res in results.items():
        if "error" not in res:
            log(
                f"{preset:<24} carry {res['carry_bpb']:.4f}  cut {res['cut_bpb']:.4f}  delta {res['delta_bpb']:+.4f}"
                f"  reset {res['reset_bpb']:.4f}  bpb | {res['tokens_trained']:,} tokens, "
                f"{res['train_tokens_per_s'] or 0:,.0f} tok/s"
            )
    if any("error" in res for res in results.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
