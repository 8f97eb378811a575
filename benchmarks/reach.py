"""Reach benchmark: how far back does each decoder read? ``longctx probe`` over every preset, in one report and figure.

What it does
------------
1. ``recall`` (needs training): writes the recall data once (``longctx.probe.write_recall_data``, seeded, in
   ``--out-dir/recall-data``), trains every preset of ``--presets`` on its ``train/`` folder alike (same data, order,
   seed and ``--tokens`` budget, resumable run folders ``--out-dir/PRESET``, as ``quality.py`` trains) and scores the
   greedy accuracy of the values on ``test/`` by distance (``longctx probe --task recall``).
2. ``copy`` and ``context`` (zero-shot): for every preset with a run folder in ``--text-runs`` (the run folders of
   ``benchmarks/quality.py``: models trained on the bundled plays), probes its newest checkpoint on the held-out
   documents of its training data (``longctx probe --task copy`` / ``--task context``).

Each preset's entry holds the probe reports, the largest distance more than 2 standard errors above zero (above
chance for recall): its measured reach; and the decoder's theoretical reach (``common.theoretical_reach``: how far
any information can travel through its layers; none for decoders with a recurrent memory). The figure has one panel
per task, one line per preset, the theoretical reach dotted.

How to run
----------
::

    python benchmarks/quality.py --tokens 2048000 --out-dir runs/q2m ...      # the text runs (see the README)
    python benchmarks/reach.py --text-runs runs/q2m --tasks copy,context --threads 2
    python benchmarks/reach.py --tasks recall --tokens 4096000 --set model.n_layer=2 ...
    python benchmarks/reach.py --smoke --output /tmp/reach.json                # tiny models, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
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
    budget_overrides,
    log,
    machine_info,
    parse_list,
    run_progress,
    setup_logging,
    theoretical_reach,
    timestamp,
    train_preset,
    write_report,
)

from longctx.checkpoint import find_checkpoints, load_checkpoint  # noqa: E402
from longctx.config import Config, list_presets, load_config, overrides_for, parse_set_args  # noqa: E402
from longctx.data import bundled_documents, discover, split_documents  # noqa: E402
from longctx.probe import (  # noqa: E402
    DEFAULT_CONTEXT_DISTANCES,
    DEFAULT_COPY_DISTANCES,
    MIN_GAIN,
    RECALL_KEYS,
    ProbeOptions,
    RecallSpec,
    document_stream,
    load_filler,
    plot_probe,
    reach,
    score_context,
    score_copy,
    score_recall,
    write_recall_data,
)
from longctx.train import Interrupted, resolve_device  # noqa: E402

TASKS = ("recall", "copy", "context")
DEFAULT_OUTPUT = RESULTS / "reach.json"
SMOKE_OUTPUT = RESULTS / "reach_smoke.json"
DEFAULT_RUNS = RESULTS / "reach-runs"
SMOKE_RUNS = RESULTS / "reach-runs-smoke"
SMOKE_PRESETS = "transformer-small,aft-local-small"
SMOKE_OVERRIDES = TINY_MODEL_OVERRIDES | {
    "train.warmup_steps": "2",
    "train.log_interval": "2",
    "train.eval_interval": "1000",
    "train.eval_tokens": "512",
    "train.save_interval": "1000",
}


# --------------------------------------------------------------------------------------------------------------------
# the probes


def recall_data(args: argparse.Namespace) -> Path:
    """The recall data folder, written on the first run (seeded, so a re-run finds the same data)."""
    folder = args.out_dir / "recall-data"
    if not (folder / "recall.json").is_file():
        filler = load_filler(bundled_documents(), RECALL_KEYS)
        spec = RecallSpec(distances=tuple(args.recall_distances))
        summary = write_recall_data(folder, filler, spec, args.recall_docs, args.recall_queries, args.seed)
        log(f"reach: wrote {folder} ({summary['train_docs']} documents, {summary['train_bytes']:,} bytes)")
    return folder


def run_recall(preset: str, args: argparse.Namespace, overrides: dict[str, Any], opts: ProbeOptions) -> dict[str, Any]:
    """Train ``preset`` on the recall data (or resume, or skip) and score its test set."""
    folder = recall_data(args)
    spec = RecallSpec.from_json((folder / "recall.json").read_text(encoding="utf-8"), str(folder / "recall.json"))
    base = overrides | {"data.paths": [str(folder / "train")]}
    full = base | budget_overrides(load_config(preset, base), args, base)
    out_dir = args.out_dir / preset
    train_preset(preset, load_config(preset, full), full, out_dir)
    checkpoint, meta = run_progress(out_dir)
    if checkpoint is None:
        raise RuntimeError(f"no checkpoint in {out_dir} after training")
    model, tokenizer, _ = load_checkpoint(checkpoint)
    texts = [p.read_bytes() for p in sorted((folder / "test").glob("*.txt"))]
    report = score_recall(model, tokenizer, texts, spec, opts).to_dict()
    return {
        "checkpoint": str(checkpoint),
        "tokens_trained": int(meta.get("tokens_seen", 0)),
        "reach": reach(report["distances"], "accuracy", report["chance"]),
        **report,
    }


def text_filler(config: Config) -> Any:
    """The held-out documents of a text run's training data (the bundled plays by default)."""
    _, held_out = split_documents(discover(config.data.paths), config.data.val_docs)
    return load_filler(held_out or bundled_documents())


CACHE_FILE = "reach_probe.json"  # in a text run's folder: the probes already made, keyed by checkpoint and settings
CACHE_VERSION = 1  # bump when a probe's definition changes


def probe_key(checkpoint: Path, task: str, args: argparse.Namespace) -> str:
    """What a cached probe result depends on."""
    settings = {
        "copy": (args.copy_distances, args.copy_span, args.copy_trials, args.seed),
        "context": (args.context_distances, args.context_tokens),
    }[task]
    return json.dumps([CACHE_VERSION, str(checkpoint), task, settings, args.precision])


def run_text(preset: str, args: argparse.Namespace, opts: ProbeOptions) -> dict[str, Any]:
    """Copy and context probes of the newest checkpoint in ``--text-runs/PRESET``, reusing the results cached in
    the run folder by an earlier run with the same checkpoint and settings."""
    run_dir = args.text_runs / preset
    found = find_checkpoints(run_dir)
    if not found:
        raise RuntimeError(f"no checkpoint in {run_dir}")
    cache_path = run_dir / CACHE_FILE
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    model, tokenizer, config = load_checkpoint(found[-1])
    filler = None
    bound, why = theoretical_reach(config.model)  # of the model trained there, whatever overrides it had
    out: dict[str, Any] = {"checkpoint": str(found[-1]), "theoretical_reach": bound, "theoretical_reach_rule": why}
    for task in ("copy", "context"):
        if task not in args.tasks:
            continue
        key = probe_key(found[-1], task, args)
        if key in cache:
            log(f"{preset}: {task} probe of {found[-1].name} already made")
            report = cache[key]
        else:
            filler = filler or text_filler(config)
            report = probe_text(task, model, tokenizer, filler, args, opts)
            cache[key] = report
            cache_path.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        out[task] = {"reach": reach(report["distances"], "gain_bits_per_byte", 0.0, MIN_GAIN), **report}
    return out


def probe_text(
    task: str, model: Any, tokenizer: Any, filler: Any, args: argparse.Namespace, opts: ProbeOptions
) -> dict[str, Any]:
    if task == "copy":
        return score_copy(
            model, tokenizer, filler, args.copy_distances, args.copy_span, args.copy_trials, "text", args.seed, opts
        ).to_dict()
    streams = [document_stream(tokenizer, t) for t in filler.texts]
    return score_context(model, tokenizer, streams, args.context_distances, args.context_tokens, opts).to_dict()


# --------------------------------------------------------------------------------------------------------------------
# the figure


def plot(results: dict[str, dict[str, Any]], tasks: list[str], path: Path) -> bool:
    """One PNG per task next to ``path`` (``STEM_TASK.png``); False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("reach: matplotlib is not installed (pip install -e '.[plot]'); no figure")
        return False
    for task in tasks:
        reports, marks = [], {}
        for preset, res in results.items():
            entry = res.get(task)
            if not entry or "distances" not in entry:
                continue
            reports.append({**entry, "label": preset})
            if res.get("theoretical_reach"):
                marks[preset] = res["theoretical_reach"]
        if reports:
            plot_probe(reports, path.parent / f"{path.stem}_{task}.png", marks)
    return True


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default=None, help="comma list (default: every bundled preset)")
    p.add_argument("--tasks", default="recall,copy,context", help="comma list of recall, copy, context")
    p.add_argument("--tokens", type=int, default=4_096_000, help="recall: training tokens per preset")
    add_set_option(p, "recall: override one config key for every preset (repeatable)")
    p.add_argument("--text-runs", type=Path, default=None, help="copy, context: run folders of quality.py")
    p.add_argument("--recall-docs", type=int, default=4000, help="recall: training documents")
    p.add_argument("--recall-queries", type=int, default=200, help="recall: test questions per distance")
    p.add_argument("--recall-distances", default="16,64,256,1024,4096", help="recall: test distances (bytes)")
    p.add_argument("--copy-distances", default=",".join(map(str, DEFAULT_COPY_DISTANCES)))
    p.add_argument("--copy-span", type=int, default=64)
    p.add_argument("--copy-trials", type=int, default=32)
    p.add_argument("--context-distances", default=",".join(map(str, DEFAULT_CONTEXT_DISTANCES)))
    p.add_argument("--context-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", type=Path, default=None, help=f"recall runs and data (default {DEFAULT_RUNS})")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON report (default {DEFAULT_OUTPUT}); the figures are written next to it",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, data and budget: seconds (CI)")
    args = p.parse_args(argv)
    args.presets = parse_list(args.presets or (SMOKE_PRESETS if args.smoke else ",".join(list_presets())))
    args.tasks = parse_list(args.tasks)
    if args.smoke:
        args.tokens, args.recall_docs, args.recall_queries = 6 * 4 * 32, 20, 4
        args.recall_distances, args.copy_distances, args.context_distances = "16,64", "16,64", "8,32"
        args.copy_trials, args.context_tokens = 2, 256
    args.recall_distances = [int(x) for x in parse_list(args.recall_distances)]
    args.copy_distances = [int(x) for x in parse_list(args.copy_distances)]
    args.context_distances = [int(x) for x in parse_list(args.context_distances)]
    args.out_dir = args.out_dir or (SMOKE_RUNS if args.smoke else DEFAULT_RUNS)
    args.output = args.output or (SMOKE_OUTPUT if args.smoke else DEFAULT_OUTPUT)
    if args.smoke and args.text_runs is None:
        args.text_runs = args.out_dir  # the smoke run probes its own (recall-trained) runs with copy and context
    if not args.presets or any(t not in TASKS for t in args.tasks) or args.tokens < 1:
        p.error(f"--presets must name a preset, --tasks must be among {', '.join(TASKS)}, --tokens >= 1")
    if {"copy", "context"} & set(args.tasks) and args.text_runs is None:
        p.error("copy and context probe the run folders of quality.py: give --text-runs DIR (or --tasks recall)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {}
    overrides.update(parse_set_args(args.overrides))
    device = resolve_device(args.device)
    opts = ProbeOptions(precision=args.precision)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for preset in args.presets:
        log(f"reach: {preset}")
        mine = overrides_for(preset, overrides)
        cfg = load_config(preset, mine)
        bound, why = theoretical_reach(cfg.model)
        res: dict[str, Any] = {"decoder": cfg.model.decoder, "theoretical_reach": bound, "theoretical_reach_rule": why}
        try:
            if "recall" in args.tasks:
                res["recall"] = run_recall(
                    preset, args, mine, ProbeOptions(seq_len=cfg.train.seq_len, precision=args.precision)
                )
            if {"copy", "context"} & set(args.tasks):
                res.update(run_text(preset, args, opts))
        except Interrupted as e:
            log(f"reach: {e}; run the same command again to resume")
            raise SystemExit(getattr(e, "exit_code", 130)) from None
        except (Exception, SystemExit) as e:  # one broken preset must not lose the others
            log(f"{preset}: failed: {e}\n{traceback.format_exc(limit=3)}")
            res["error"] = f"{type(e).__name__}: {e}"
        results[preset] = res
    plotted = plot(results, args.tasks, args.output)
    report = {
        "benchmark": "reach",
        "timestamp": timestamp(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "smoke": args.smoke,
        "machine": machine_info(torch.get_num_threads()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"device": str(device), "overrides": overrides},
        "presets": results,
        "figures": [f"{args.output.stem}_{t}.png" for t in args.tasks] if plotted else [],
        "wall_s": time.monotonic() - started,
    }
    write_report(report, args.output)
    for preset, res in results.items():
        found = {t: (res.get(t) or {}).get("reach") for t in TASKS if t in res}
        log(f"{preset:<24} theoretical {res['theoretical_reach']}  measured {found}")
    if any("error" in res for res in results.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
