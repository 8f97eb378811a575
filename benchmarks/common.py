"""Helpers shared by the benchmark scripts (``quality.py``, ``reach.py``, ``sorting.py``, ...).

* :func:`attention_window`: the number of tokens a decoder attends to exactly (token by token), the window to which
  the "memory cut" of ``quality.py`` and the window oracle of ``sorting.py`` are set;
* :func:`machine_info`: what the figures were measured on;
* :func:`write_report`: the JSON report on stdout and in a file;
* :func:`parse_list`: comma lists of flags;
* :func:`budget_overrides`, :func:`train_preset`: every preset trained alike, resumable run folders;
* ``TINY_MODEL_OVERRIDES``: the tiny models of ``--smoke``;
* :func:`log`: progress on stderr (stdout holds only the JSON report);
* the machine (:func:`cpu_model`, :func:`cpu_flags`, :func:`load_average`, :func:`matmul_peak`) and the model-FLOP
  count (:func:`model_flops`, formula in ``train_speed.py``);
* :class:`TrainRun`, :class:`XTransformersRun`: one model's timed training steps, run interleaved with others
  (``speed.py``, ``xl_speed.py``).

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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longctx.checkpoint import find_checkpoints, read_config
from longctx.config import Config, ModelConfig
from longctx.decoders import DECODERS
from longctx.model import LongContextLM, build_model
from longctx.train import RunOptions, make_optimizer, train

RESULTS = Path(__file__).resolve().parent / "results"


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: config keys changed for every preset."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


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
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load_average(),
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


# --------------------------------------------------------------------------------------------------------------------
# the machine: CPU, load, matmul peak


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The bf16/AVX-512/AMX flags of the CPU (Linux only; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512f", "amx", "avx2")))
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none): a load above the core count means a shared,
    busy machine and unreliable timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (CUDA runs them asynchronously) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype,
    size: int,
    repeats: int,
    device: torch.device = torch.device("cpu"),
    shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Median FLOP/s of a square ``size`` x ``size`` matmul in ``dtype`` on ``device`` (2 * size^3 FLOPs each), or of
    an (M, K) x (K, N) one for ``shape`` = (M, K, N)."""
    m, k, n = shape or (size, size, size)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    for _ in range(2):  # warm up the kernel selection and the caches
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * m * k * n
    median = statistics.median(times)
    return {
        "size": size,
        "shape": [m, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "times_s": [round(t, 6) for t in times],
        "median_s": median,
        "flops_per_s": flops / median,
        "best_flops_per_s": flops / min(times),
    }


# --------------------------------------------------------------------------------------------------------------------
# model FLOPs (the formula is in train_speed.py's docstring)


def attended_keys(cfg: Config) -> int:
    """Keys a query attends to in steady state (``Decoder.attended_keys``); 0 for decoders without attention."""
    return DECODERS[cfg.model.decoder].attended_keys(cfg.model)


def model_flops(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    embed = model.embed.weight  # type: ignore[union-attr]
    params = list({id(p): p for p in model.parameters()}.values())  # the tied head counts once
    n_total = sum(p.numel() for p in params)
    n_non_embedding = sum(p.numel() for p in params if p is not embed)
    m = cfg.model
    keys = attended_keys(cfg)
    dense = 6 * n_non_embedding
    head = 6 * m.d_model * m.vocab_size
    attention = 6 * m.n_layer * m.d_model * keys * 2
    return {
        "formula": "6*N_non_embedding + 6*d_model*vocab_size (tied head) + 12*n_layer*d_model*K (K = attended keys)",
        "n_params": n_total,
        "n_params_non_embedding": n_non_embedding,
        "attended_keys_per_query": keys,
        "dense_flops_per_token": dense,
        "head_flops_per_token": head,
        "attention_flops_per_token": attention,
        "flops_per_token": dense + head + attention,
    }


# --------------------------------------------------------------------------------------------------------------------
# interleaved training steps (speed.py, xl_speed.py)


class TrainRun:
    """One model, optimizer, carried state and fixed random data; :meth:`step` runs and times one training step."""

    def __init__(self, config: Config, precision: str, seed: int, compiled: bool = False) -> None:
        torch.manual_seed(seed)
        self.model = self.build(config)
        self.net = torch.compile(self.model) if compiled else self.model  # compiled on the first (untimed) step
        self.optimizer = make_optimizer(self.model, config.train)  # type: ignore[arg-type]
        self.batch, self.seq_len = config.train.batch_size, config.train.seq_len
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, config.model.vocab_size, (self.batch, self.seq_len + 1), generator=gen)
        self.bf16 = precision == "bf16"
        self.times: list[float] = []
        self.warmup_s = 0.0  # the untimed steps (compilation included)

    def build(self, config: Config) -> torch.nn.Module:
        model = build_model(config.model).train()
        self.state = model.init_state(config.train.batch_size)
        return model

    def loss(self) -> torch.Tensor:
        """Forward with the carried state; keeps the next (detached) state."""
        out = self.net(self.data[:, :-1], self.state, self.data[:, 1:])
        self.state = out.state.detach()
        return out.loss + out.aux_loss

    def step(self, timed: bool) -> None:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if isinstance(self.model, LongContextLM):
            self.model.decoder.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - t0)
        else:
            self.warmup_s += time.perf_counter() - t0

    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / statistics.median(self.times)


def xtransformers_model(config: Config, recurrent: bool) -> torch.nn.Module:
    """x-transformers' decoder at the size of ``config``: the Transformer-XL recurrence (``max_mem_len`` =
    ``mem_len``, relative position bias) if ``recurrent``, else a plain window of ``train.seq_len`` tokens with rotary
    positions (no memory). Needs the optional package: pip install x-transformers."""
    from x_transformers import Decoder, TransformerWrapper

    m = config.model
    position = {"rel_pos_bias": True} if recurrent else {"rotary_pos_emb": True}
    return TransformerWrapper(
        num_tokens=m.vocab_size,
        max_seq_len=config.train.seq_len,
        max_mem_len=m.xl.mem_len if recurrent else 0,
        attn_layers=Decoder(dim=m.d_model, depth=m.n_layer, heads=m.n_head, ff_mult=m.d_ff // m.d_model, **position),
    )


class XTransformersRun(TrainRun):
    """The reference of the issue: x-transformers' Transformer-XL recurrence (``TransformerWrapper`` with
    ``max_mem_len`` and ``return_mems``, relative position bias) at the size of ``config``, memory = ``mem_len``."""

    def build(self, config: Config) -> torch.nn.Module:
        self.mems = None
        return xtransformers_model(config, recurrent=True).train()

    def loss(self) -> torch.Tensor:
        logits, self.mems = self.model(self.data[:, :-1], mems=self.mems, return_mems=True)  # mems: detached
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.data[:, 1:].flatten())
