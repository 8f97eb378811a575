"""Helpers shared by the benchmark scripts (``quality.py``, ``reach.py``, ``sorting.py``, ...).

* :func:`attention_window`: the number of tokens a decoder attends to exactly (token by token), the window to which
  the "memory cut" of ``quality.py`` and the window oracle of ``sorting.py`` are set;
* :func:`machine_info`: what the figures were measured on;
* :func:`write_report`: the JSON report on stdout and in a file;
* :func:`parse_list`: comma lists of flags;
* :func:`budget_overrides`, :func:`train_preset`: every preset trained alike, resumable run folders;
* ``TINY_MODEL_OVERRIDES``: the tiny models of ``--smoke``.

Not a script: import it from a sibling script (``sys.path`` holds the script's folder when it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from longctx.checkpoint import find_checkpoints, read_config
from longctx.config import Config, ModelConfig
from longctx.decoders import DECODERS
from longctx.train import RunOptions, train

RESULTS = Path(__file__).resolve().parent / "results"

# tiny sizes for every decoder (keys of unused decoders are harmless): windows of 16, 1 layer of width 32 (--smoke)
TINY_MODEL_OVERRIDES = {
    "model.n_layer": "1",
    "model.d_model": "32",
    "model.n_head": "2",
    "model.d_ff": "64",
    "model.transformer.window": "16",
    "model.xl.mem_len": "16",
    "model.infinite.mem_len": "16",
    "model.infinite.ltm_block": "16",
    "model.infinite.n_basis": "32",
    "model.infinite.n_samples": "32",
    "model.aft.window": "8",
    "model.aft.max_distance": "32",
    "model.combiner.segment": "8",
    "model.combiner.max_summaries": "3",
    "model.perceiver_ar.context": "32",
    "model.perceiver_ar.latents": "16",
    "train.seq_len": "32",
    "train.batch_size": "4",
}


def log(message: str) -> None:
    """Progress goes to stderr; stdout holds only the JSON report."""
    print(message, file=sys.stderr, flush=True)


def parse_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def attention_window(model: ModelConfig, seq_len: int) -> tuple[int, str]:
    """(W, why): how many tokens a query of this decoder reads exactly, itself included (``Decoder.exact_window``)."""
    return DECODERS[model.decoder].exact_window(model, seq_len)


def theoretical_reach(model: ModelConfig) -> tuple[int | None, str]:
    """(R, why): how far a token's information can travel forward, None for a recurrent memory (``Decoder.reach``)."""
    return DECODERS[model.decoder].reach(model)


def budget_overrides(cfg: Config, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The keys that make every preset train alike: budget, seed, precision, threads, device. A budget shorter than
    ten times the preset's warm-up gets a warm-up of a tenth of its steps (unless ``train.warmup_steps`` is set), so
    that the learning rate reaches its peak and decays in short runs too."""
    per_step = cfg.train.batch_size * cfg.train.seq_len
    steps = max(1, math.ceil(args.tokens / per_step))
    keys: dict[str, Any] = {
        "train.max_steps": steps,
        "train.max_tokens": args.tokens,
        "train.seed": args.seed,
        "train.precision": args.precision,
        "train.threads": args.threads,
        "train.device": args.device,
    }
    if "train.warmup_steps" not in overrides:
        keys["train.warmup_steps"] = min(cfg.train.warmup_steps, steps // 10)
    return keys


def run_progress(out_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(newest complete checkpoint, its trainer_state.json) of a run folder; (None, {}) before the first one."""
    found = find_checkpoints(out_dir)
    if not found:
        return None, {}
    meta_file = found[-1] / "trainer_state.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return found[-1], meta


def check_same_model(checkpoint: Path, cfg: Config) -> None:
    """Refuse to resume a run folder that holds another model (the tokenizer sets vocab_size and separator_id, so
    they are not compared)."""
    unset = {"vocab_size": None, "separator_id": None}
    saved = dataclasses.asdict(read_config(checkpoint).model) | unset
    wanted = dataclasses.asdict(cfg.model) | unset
    if saved != wanted:
        differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise SystemExit(
            f"benchmark: {checkpoint.parent} holds a run of another model "
            f"(model.{', model.'.join(differ)} differ); give another --out-dir or delete that folder"
        )


def train_preset(preset: str, cfg: Config, overrides: dict[str, Any], out_dir: Path) -> None:
    """Train (or resume) the run of ``preset`` until it reaches the budget; no-op when it already has."""
    checkpoint, meta = run_progress(out_dir)
    if checkpoint is not None:
        check_same_model(checkpoint, cfg)
        if meta.get("step", 0) >= cfg.train.max_steps:
            log(
                f"{preset}: {out_dir} already holds {meta['step']} steps ({meta.get('tokens_seen', 0):,} tokens); "
                "not training"
            )
            return
        log(f"{preset}: resuming {checkpoint} at step {meta.get('step', 0)} of {cfg.train.max_steps}")
    else:
        log(f"{preset}: training {cfg.train.max_steps} steps in {out_dir}")
    train(cfg, RunOptions(out_dir=out_dir, resume="auto", progress=False), overrides)


def setup_logging() -> None:
    """The trainer's progress lines (logger ``longctx``) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logger = logging.getLogger("longctx")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, software versions, threads, load average: a load above the core count means timings of a busy machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load,
    }


def timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_report(report: dict[str, Any], output: Path) -> None:
    """Print ``report`` as JSON on stdout and write it to ``output`` (its folder is created)."""
    text = json.dumps(report, indent=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n", encoding="utf-8")
    print(text)
    log(f"wrote {output}")
