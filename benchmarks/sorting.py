"""Sorting benchmark (the ∞-former paper's sorting task): can a decoder count symbols over thousands of tokens?

The task
--------
An example of length L is ``x_1 ... x_L SEP y_1 ... y_20`` over a vocabulary of 21 tokens: the symbols 0..19 and the
separator ``SEP`` = 20. It is generated from ``numpy.random.default_rng([seed, split, index, L])`` (split 0 =
training, 1 = evaluation, so the two never share an example, and every example is reproducible on its own):

* two weight vectors ``a`` and ``b`` of 20 integers drawn uniformly from 1..9, normalised to distributions
  ``p = a / sum(a)`` and ``q = b / sum(b)``;
* symbol ``x_t`` (t = 1..L) is drawn from the mixture ``(1 - t / L) p + (t / L) q``: the distribution drifts linearly
  from near ``p`` to ``q`` along the sequence, so the early part of the sequence counts as much as the late part;
* the target ``y_1 .. y_20`` lists all 20 symbols by decreasing count in ``x``, ties (including symbols that never
  occur) by increasing symbol id.

(As in the paper's generator: 20 symbols, integer weights 1..9, a linear drift, the target after a separator; the
paper breaks ties by first occurrence, this script by symbol id, so that the target is a function of the counts.)
Only the 20 target tokens are scored: the loss is the mean cross-entropy of ``y_k`` given everything before it.

Streaming and training
----------------------
Each example is read as one stream through the decoder's memory, in segments of ``train.seq_len`` tokens aligned to
the end of the example (the first segment is the shorter one; the last holds ``SEP`` and the targets); the memory is
carried across the segments of an example and starts empty for every example (a fresh ``init_state`` per batch, the
paper's ``new_doc`` reset). As in the official code, only the last ``--bptt-segments`` segments (default 1) are
backpropagated: the earlier ones run without gradients and only build the memory. Optimiser: the trainer's AdamW
(``longctx.train.make_optimizer``, decoupled weight decay on matrices) with its warm-up + cosine schedule
(``lr_at``) over ``--steps`` steps, gradient clipping ``train.grad_clip``, ``aux_loss`` (span penalty, KL term)
added, ``after_optimizer_step`` called. Every (preset, length) trains the same number of steps on the same examples
(batch ``train.batch_size``, default 8 as in the paper) from the same seed.

The models are small versions of the presets: ``model.n_layer=2, d_model=64, n_head=2, d_ff=256``, trained with
``train.lr=3e-3`` for 3,000 steps by default (the settings of the runs reported in the README; at L = 1024 they lift
every decoder above chance, 400 steps do not; no other settings were swept; run folders made under the earlier
default of 1e-3 are refused: give ``--set train.lr=1e-3`` or another ``--out-dir``). ``--set`` changes any key, for
every preset; windows and memories stay as in the presets (exact windows of 32 to 1,024 tokens, see
``common.attention_window``), so that at L >= 4096 most of the sequence lies beyond every exact window.

Evaluation
----------
On ``--eval-examples`` held-out examples (split 1):

* ``token_accuracy``: teacher forcing; the share of target positions where the argmax of the logits is ``y_k``;
* ``exact_match``: greedy decoding of 20 tokens after ``SEP`` (argmax over the whole vocabulary, fed back one token
  at a time through the carried state); the share of examples whose 20 tokens all equal the target;
  ``greedy_token_accuracy``: the share of decoded positions that equal the target;
* ``window_oracle``: the same two figures for an exact counter that sees only the last W symbols, W being the
  decoder's exact attention window (``common.attention_window``): what perfect use of the window alone gives.
  Chance is 1/20 per token.
* ``teacher_forced_baselines`` (per length, report level): two rules scored like ``token_accuracy``, given the true
  earlier targets: ``elimination`` (the smallest symbol not yet named; reads no input, yet scores ~0.19, since each
  symbol appears once in the target) and ``window_counter[W]`` (the unnamed symbol counted most in the last W). A
  teacher-forced accuracy means counting only above these; ``--baselines-only`` reports them without training.

How to run
----------
::

    python benchmarks/sorting.py --threads 2                        # one preset per decoder, L = 1024,4096,8192 (hours)
    python benchmarks/sorting.py --presets transformer-small,infinite-small --lengths 1024 --steps 100 \\
        --eval-examples 64 --threads 1                               # minutes
    python benchmarks/sorting.py --set model.n_layer=3 --set train.lr=2e-4
    python benchmarks/sorting.py --smoke --output /tmp/sort.json    # tiny, seconds (CI)

Resumable: each (preset, length) trains in ``--out-dir/PRESET-L<length>`` (default
``benchmarks/results/sorting-runs``), saving a checkpoint (``longctx.checkpoint``: weights, optimizer moments and
the progress, without a tokenizer) every ``--save-every`` steps; re-running resumes from there, and a finished pair
(``result.json`` with the same settings) is not redone; a larger ``--steps`` continues a finished run (its cosine
schedule is stretched from there). A folder holding a run with other settings is refused. The JSON report goes to
stdout and ``--output`` (default ``benchmarks/results/sorting.json``); progress goes to stderr. Per (preset, length)
it holds the accuracies above, the mean target loss of the last tenth of the steps, the training wall time and
tokens/s (every token read, memory-building segments included), parameters and state size. A pair that fails is
reported with its error, the others go on, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    TINY_MODEL_OVERRIDES,
    # noqa: E402,
    add_set_option,
    attention_window,
    log,
    machine_info,
    parse_list,
    timestamp,
    write_report,
)

from longctx.checkpoint import (  # noqa: E402
    MODEL_FILE,
    TRAINER_TENSORS,
    TrainerMeta,
    TrainerState,
    find_checkpoints,
    load_trainer_state,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from longctx.config import Config, list_presets, load_config, overrides_for, parse_set_args  # noqa: E402
from longctx.errors import ConfigError  # noqa: E402
from longctx.model import LongContextLM, build_model  # noqa: E402
from longctx.train import lr_at, make_optimizer, resolve_device  # noqa: E402

N_SYMBOLS = 20
SEP = N_SYMBOLS  # token 20
VOCAB = N_SYMBOLS + 1
TRAIN_SPLIT, EVAL_SPLIT = 0, 1
VERSION = 1  # bump when the task or the training changes, so that saved runs are not mixed with new ones

# one preset per decoder (combiner and perceiver-ar when their presets exist)
DECODER_PRESETS = (
    "transformer-small",
    "xl-small",
    "infinite-small",
    "aft-local-small",
    "combiner-small",
    "perceiver-ar-small",
)
DEFAULT_LENGTHS = "1024,4096,8192"
DEFAULT_OUTPUT = RESULTS / "sorting.json"
SMOKE_OUTPUT = RESULTS / "sorting_smoke.json"
DEFAULT_RUNS = RESULTS / "sorting-runs"
SMOKE_RUNS = RESULTS / "sorting-runs-smoke"
TASK_OVERRIDES = {
    "model.n_layer": "2",
    "model.d_model": "64",
    "model.n_head": "2",
    "model.d_ff": "256",
    "train.lr": "3e-3",
}
DEFAULT_STEPS = 3000
SMOKE_OVERRIDES = TINY_MODEL_OVERRIDES


# --------------------------------------------------------------------------------------------------------------------
# the task


def make_example(seed: int, split: int, index: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbols (L,) int64 in 0..19, target (20,) int64): the definition of the module docstring."""
    rng = np.random.default_rng([seed, split, index, length])
    start = rng.integers(1, 10, N_SYMBOLS).astype(np.float64)  # (20,) weights 1..9
    end = rng.integers(1, 10, N_SYMBOLS).astype(np.float64)
    drift = np.arange(1, length + 1, dtype=np.float64)[:, None] / length  # (L, 1) t / L
    probs = (1.0 - drift) * (start / start.sum()) + drift * (end / end.sum())  # (L, 20), rows sum to 1
    cdf = np.cumsum(probs, axis=1)  # (L, 20)
    uniform = rng.random(length)[:, None]  # (L, 1)
    symbols = np.minimum((uniform >= cdf).sum(axis=1), N_SYMBOLS - 1)  # (L,) inverse-CDF sampling
    return symbols.astype(np.int64), sort_by_count(symbols)


def sort_by_count(symbols: np.ndarray) -> np.ndarray:
    """The 20 symbols by decreasing count in ``symbols`` (L,), ties by increasing id; (20,) int64."""
    counts = np.bincount(symbols, minlength=N_SYMBOLS)  # (20,)
    return np.lexsort((np.arange(N_SYMBOLS), -counts)).astype(np.int64)  # last key first: -count, then id


def make_batch(seed: int, split: int, first: int, size: int, length: int) -> torch.Tensor:
    """Examples ``first .. first + size - 1`` of a split as token rows ``x SEP y``: (size, L + 21) int64."""
    rows = []
    for index in range(first, first + size):
        symbols, target = make_example(seed, split, index, length)
        rows.append(np.concatenate([symbols, [SEP], target]))
    return torch.from_numpy(np.stack(rows))


def segment_bounds(n: int, seg_len: int) -> list[tuple[int, int]]:
    """[start, end) of segments of ``seg_len`` covering ``0..n``, aligned to the end (the first one is shorter)."""
    ends = list(range(n, 0, -seg_len))[::-1]  # ascending segment ends, the last one n
    return [(max(0, end - seg_len), end) for end in ends]


# --------------------------------------------------------------------------------------------------------------------
# training


def read_prefix(model: LongContextLM, tokens: torch.Tensor, seg_len: int) -> Any:
    """Stream ``tokens`` (B, n) through the memory from an empty state, without gradients, in segments aligned to
    the end of ``tokens``; the state after the last token (the empty state when n = 0)."""
    state = model.init_state(tokens.shape[0], tokens.device)
    with torch.no_grad():
        for start, end in segment_bounds(tokens.shape[1], seg_len):
            state = model(tokens[:, start:end], state).state
    return state


def train_step(model: LongContextLM, batch: torch.Tensor, seg_len: int, bptt: int) -> tuple[torch.Tensor, float, int]:
    """(loss to backpropagate, mean target NLL, tokens read) of one batch of examples (B, L + 21).

    The inputs ``batch[:, :-1]`` are read in segments aligned to their end; the last ``bptt`` segments (and at least
    the 20 target positions) keep their graph, the earlier ones only build the memory. The loss is the mean NLL of
    the 20 targets plus the decoder's ``aux_loss`` of the backpropagated segments."""
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()  # (B, n) each, n = L + 20
    targets[:, :-N_SYMBOLS] = -100  # score y_1..y_20 only (predicted from SEP, y_1, ..., y_19)
    n = inputs.shape[1]
    bounds = segment_bounds(n, seg_len)
    split = min(bounds[max(0, len(bounds) - bptt)][0], n - N_SYMBOLS)  # first position with a graph
    state = read_prefix(model, inputs[:, :split], seg_len)
    nll = aux = torch.zeros((), device=batch.device)
    for start, end in segment_bounds(n - split, seg_len):
        out = model(inputs[:, split + start : split + end], state)
        logits = out.logits.float().flatten(0, 1)  # (B * t, V)
        nll = nll + F.cross_entropy(
            logits, targets[:, split + start : split + end].flatten(), ignore_index=-100, reduction="sum"
        )
        state, aux = out.state, aux + out.aux_loss
    target_loss = nll / (batch.shape[0] * N_SYMBOLS)
    return target_loss + aux, target_loss.item(), inputs.numel()


def load_progress(
    run_dir: Path, model: LongContextLM, optimizer: torch.optim.Optimizer, key: dict[str, Any]
) -> dict[str, Any]:
    """Restore the newest checkpoint of ``run_dir`` into model and optimizer; its progress dict, or a fresh one.
    A checkpoint made with other settings (``key``) is refused."""
    found = find_checkpoints(run_dir)
    if not found:
        return {"key": key, "step": 0, "elapsed_s": 0.0, "tokens": 0, "losses": []}
    folder = found[-1]
    meta = load_trainer_state(folder).meta
    progress = meta.extra or {}
    if progress.get("key") != key:
        raise SystemExit(
            f"sorting: {run_dir} holds a run with other settings ({progress.get('key')}); give another --out-dir "
            "or delete that folder"
        )
    load_weights(model, folder / MODEL_FILE)
    optimizer_from_tensors(optimizer, load_file(str(folder / TRAINER_TENSORS)), meta.param_groups)
    log(f"  resumed from {folder} at step {meta.step}")
    return {**progress, "step": meta.step, "elapsed_s": meta.elapsed_s, "tokens": meta.tokens_seen}


def save_progress(
    run_dir: Path, model: LongContextLM, cfg: Config, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> None:
    """A checkpoint (weights, optimizer moments, progress) written by ``longctx.checkpoint``; the older ones go."""
    tensors, groups = optimizer_to_tensors(optimizer)
    meta = TrainerMeta(
        step=progress["step"],
        tokens_seen=progress["tokens"],
        data_cursor=progress["step"] * cfg.train.batch_size,
        elapsed_s=progress["elapsed_s"],
        param_groups=groups,
        lanes=cfg.train.batch_size,
        extra={"key": progress["key"], "losses": progress["losses"]},
    )
    path = save_checkpoint(run_dir / step_dir_name(meta.step), model, cfg, None, TrainerState(meta, tensors))
    for old in find_checkpoints(run_dir):
        if old != path:
            remove_checkpoint(old)


def train_model(
    model: LongContextLM, cfg: Config, args: argparse.Namespace, length: int, run_dir: Path, key: dict[str, Any]
) -> dict[str, Any]:
    """Train ``args.steps`` steps (resuming from ``run_dir``); the progress dict (step, elapsed_s, tokens, losses)."""
    t = cfg.train
    optimizer = make_optimizer(model, t)
    progress = load_progress(run_dir, model, optimizer, key)
    model.train()
    started, elapsed0 = time.monotonic(), progress["elapsed_s"]
    for step in range(progress["step"], args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        batch = make_batch(args.seed, TRAIN_SPLIT, step * t.batch_size, t.batch_size, length).to(model.device)
        loss, target_loss, n_tokens = train_step(model, batch, t.seq_len, args.bptt_segments)
        if math.isfinite(loss.item()):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            optimizer.step()
            model.decoder.after_optimizer_step()
        else:
            log(f"  step {step + 1}: non-finite loss, step skipped")
        optimizer.zero_grad(set_to_none=True)
        progress.update(
            step=step + 1, tokens=progress["tokens"] + n_tokens, elapsed_s=elapsed0 + time.monotonic() - started
        )
        progress["losses"].append(round(target_loss, 5))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = progress["tokens"] / max(progress["elapsed_s"], 1e-9)
            log(f"  step {step + 1}/{args.steps} | target loss {target_loss:.4f} | {rate:,.0f} tokens/s")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_progress(run_dir, model, cfg, optimizer, progress)
    return progress


# --------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def evaluate_model(
    model: LongContextLM, args: argparse.Namespace, length: int, seg_len: int, batch_size: int
) -> dict[str, float]:
    """Teacher-forced token accuracy, greedy exact match and greedy token accuracy on the held-out examples."""
    model.eval()
    forced, greedy, exact, n = 0, 0, 0, 0
    for first in range(0, args.eval_examples, batch_size):
        size = min(batch_size, args.eval_examples - first)
        batch = make_batch(args.seed, EVAL_SPLIT, first, size, length).to(model.device)  # (b, L + 21)
        target = batch[:, -N_SYMBOLS:]  # (b, 20)
        state = read_prefix(model, batch[:, :length], seg_len)  # after x_1..x_L
        logits = model(batch[:, length:-1], state).logits  # (b, 20, V): inputs SEP, y_1..y_19
        forced += int((logits.argmax(-1) == target).sum())
        token, decoded = batch[:, length : length + 1], []  # (b, 1) SEP
        for _ in range(N_SYMBOLS):
            out = model(token, state)
            state, token = out.state, out.logits[:, -1].argmax(-1, keepdim=True)  # (b, 1)
            decoded.append(token)
        hits = torch.cat(decoded, dim=1) == target  # (b, 20)
        greedy += int(hits.sum())
        exact += int(hits.all(dim=1).sum())
        n += size
    return {
        "token_accuracy": forced / (n * N_SYMBOLS),
        "exact_match": exact / n,
        "greedy_token_accuracy": greedy / (n * N_SYMBOLS),
    }


def window_oracle(args: argparse.Namespace, length: int, window: int) -> dict[str, float]:
    """Accuracy of sorting by the counts of the last ``window`` symbols only (exact counting inside the window)."""
    tokens, exact = 0, 0
    for index in range(args.eval_examples):
        symbols, target = make_example(args.seed, EVAL_SPLIT, index, length)
        hits = sort_by_count(symbols[-window:]) == target  # (20,)
        tokens += int(hits.sum())
        exact += int(hits.all())
    return {"token_accuracy": tokens / (args.eval_examples * N_SYMBOLS), "exact_match": exact / args.eval_examples}


def teacher_forced_baselines(args: argparse.Namespace, length: int, windows: list[int]) -> dict[str, Any]:
    """Rules scored like ``token_accuracy``: y_k is predicted knowing the true y_1 .. y_{k-1}.

    Knowing the earlier answers is worth much on its own: each symbol appears once in the target, so a rule can
    pick among the symbols not yet named. ``elimination``: the smallest unnamed id (reads no symbol; ties in the
    target go to the smaller id); ``window_counter[W]``: the unnamed symbol counted most often in the last W symbols
    (ties by id). These, not chance or ``window_oracle``, are what teacher-forced accuracies compare with.
    """
    eliminated, counted = 0, dict.fromkeys(windows, 0)
    for index in range(args.eval_examples):
        symbols, target = make_example(args.seed, EVAL_SPLIT, index, length)
        orders = {w: sort_by_count(symbols[-w:]).tolist() for w in windows}
        named: set[int] = set()
        for y in target.tolist():
            eliminated += min(set(range(N_SYMBOLS)) - named) == y
            for w, order in orders.items():
                counted[w] += next(s for s in order if s not in named) == y
            named.add(y)
    n = args.eval_examples * N_SYMBOLS
    return {"elimination": eliminated / n, "window_counter": {str(w): c / n for w, c in counted.items()}}


# --------------------------------------------------------------------------------------------------------------------
# one (preset, length)


def run_pair(
    preset: str, length: int, args: argparse.Namespace, overrides: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Train (resume, or reuse) and evaluate one preset at one sequence length."""
    overrides = overrides_for(preset, overrides)
    cfg = load_config(preset, overrides | {"model.vocab_size": VOCAB, "train.max_steps": args.steps})
    t = cfg.train
    cfg = load_config(
        preset,
        overrides
        | {
            "model.vocab_size": VOCAB,
            "train.max_steps": args.steps,
            "train.warmup_steps": min(t.warmup_steps, args.steps // 10),
        },
    )
    run_dir = args.out_dir / f"{preset}-L{length}"
    key = {
        "version": VERSION,
        "preset": preset,
        "length": length,
        "seed": args.seed,
        "bptt": args.bptt_segments,
        "model": cfg.to_dict()["model"],
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "lr": t.lr,
        "min_lr": t.min_lr,
        "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip,
    }
    done_key = key | {"steps": args.steps, "eval_examples": args.eval_examples}
    done = run_dir / "result.json"
    if done.is_file() and (saved := json.loads(done.read_text(encoding="utf-8"))).get("key") == done_key:
        log(f"  reusing {done}")
        return saved["result"]
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = train_model(model, cfg, args, length, run_dir, key)
    eval_start = time.monotonic()
    accuracy = evaluate_model(model, args, length, t.seq_len, t.batch_size)
    window, rule = attention_window(cfg.model, t.seq_len)
    losses = progress["losses"]
    tail = losses[-max(1, len(losses) // 10) :]
    result = {
        "decoder": cfg.model.decoder,
        "length": length,
        "parameters": model.num_parameters(),
        "state_bytes": model.init_state(1).nbytes(),
        "steps": progress["step"],
        "train_wall_s": progress["elapsed_s"],
        "train_tokens_per_s": progress["tokens"] / max(progress["elapsed_s"], 1e-9),
        "final_loss": sum(tail) / len(tail),
        "eval_wall_s": time.monotonic() - eval_start,
        **accuracy,
        "window": window,
        "window_rule": rule,
        "window_oracle": window_oracle(args, length, window),
    }
    log(
        f"  {preset} L={length}: token accuracy {result['token_accuracy']:.3f}, exact match "
        f"{result['exact_match']:.3f} (window oracle {result['window_oracle']['token_accuracy']:.3f}), "
        f"final loss {result['final_loss']:.3f}, {result['train_wall_s']:.0f} s"
    )
    done.write_text(json.dumps({"key": done_key, "result": result}, indent=1), encoding="utf-8")
    return result


# --------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--presets",
        default=None,
        help="comma list of presets (default: one per decoder, those of "
        f"{', '.join(DECODER_PRESETS)} that exist; transformer-small,infinite-small with --smoke)",
    )
    p.add_argument(
        "--lengths", default=None, help=f"symbols per example, comma list (default {DEFAULT_LENGTHS}; 64 with --smoke)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per (preset, length) (default {DEFAULT_STEPS}; 3 with --smoke)",
    )
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples (default 200; 8 with --smoke)")
    p.add_argument("--bptt-segments", type=int, default=1, help="segments backpropagated per example (default 1)")
    add_set_option(p, "override one config key for every preset (after the small sizes), e.g. --set train.lr=3e-4")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the initial weights (default 0)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines (default 10)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"run folders, one per (preset, length) (default {DEFAULT_RUNS}; {SMOKE_RUNS} with --smoke)",
    )
    p.add_argument(
        "--output", type=Path, default=None, help=f"JSON report (default {DEFAULT_OUTPUT}; {SMOKE_OUTPUT} with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, length 64, 3 steps, 2 presets: seconds (CI)")
    p.add_argument(
        "--baselines-only",
        action="store_true",
        help="train nothing: report the teacher-forced baselines of the lengths and presets' windows",
    )
    args = p.parse_args(argv)
    smoke = args.smoke
    default = ",".join(p for p in DECODER_PRESETS if p in list_presets())
    args.presets = parse_list(args.presets or ("transformer-small,infinite-small" if smoke else default))
    try:
        args.lengths = [int(x) for x in parse_list(args.lengths or ("64" if smoke else DEFAULT_LENGTHS))]
    except ValueError:
        p.error(f"--lengths takes a comma list of integers, got {args.lengths!r}")
    args.steps = args.steps if args.steps is not None else (3 if smoke else DEFAULT_STEPS)
    args.eval_examples = args.eval_examples if args.eval_examples is not None else (8 if smoke else 200)
    args.out_dir = args.out_dir or (SMOKE_RUNS if smoke else DEFAULT_RUNS)
    args.output = args.output or (SMOKE_OUTPUT if smoke else DEFAULT_OUTPUT)
    if not args.presets or not args.lengths or min(args.lengths) < 1:
        p.error("--presets and --lengths must name at least one preset and positive lengths")
    if min(args.steps, args.eval_examples, args.bptt_segments, args.log_every, args.save_every) < 1:
        p.error("--steps, --eval-examples, --bptt-segments, --log-every and --save-every must be >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


DEFINITION = {
    "vocabulary": "symbols 0..19, SEP = 20",
    "example": "x_1..x_L SEP y_1..y_20; x_t ~ (1 - t/L) p + (t/L) q with p, q = integer weights 1..9 normalised; "
    "y = the 20 symbols by decreasing count in x, ties by increasing id; "
    "rng = numpy default_rng([seed, split, index, L]), split 0 = train, 1 = eval",
    "loss": "mean cross-entropy of y_1..y_20 only",
    "streaming": "segments of train.seq_len aligned to the example's end, memory carried within an example and empty "
    "at its start; only the last bptt_segments segments backpropagated",
    "token_accuracy": "teacher-forced argmax accuracy on y_1..y_20",
    "exact_match": "greedy decoding of 20 tokens after SEP equals y exactly",
    "window_oracle": "exact counting of the last W symbols only (W = the decoder's exact attention window)",
    "teacher_forced_baselines": "rules given the true earlier targets, as token_accuracy is: elimination = the "
    "smallest id not yet named; window_counter[W] = the unnamed symbol most frequent in "
    "the last W symbols",
}


def preset_window(preset: str, overrides: dict[str, Any]) -> int | None:
    """The exact window of a preset under the overrides; None when it does not load (its pair reports why)."""
    try:
        cfg = load_config(preset, overrides_for(preset, overrides))
    except ConfigError:
        return None
    return attention_window(cfg.model, cfg.train.seq_len)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = dict(SMOKE_OVERRIDES if args.smoke else TASK_OVERRIDES)
    overrides.update(parse_set_args(args.overrides))
    device = resolve_device(args.device)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    windows = sorted({w for preset in args.presets if (w := preset_window(preset, overrides))})
    baselines = {str(length): teacher_forced_baselines(args, length, windows) for length in args.lengths}
    for length in [] if args.baselines_only else args.lengths:
        for preset in args.presets:
            log(f"sorting: {preset}, L = {length}")
            try:
                result = run_pair(preset, length, args, overrides, device)
            except (Exception, SystemExit) as e:  # one broken pair must not lose the others
                log(f"{preset} L={length}: failed: {e}\n{traceback.format_exc(limit=3)}")
                result = {"error": f"{type(e).__name__}: {e}"}
            results.setdefault(preset, {})[str(length)] = result
    report = {
        "benchmark": "sorting",
        "timestamp": timestamp(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "smoke": args.smoke,
        "machine": machine_info(torch.get_num_threads()),
        "settings": {
            "presets": args.presets,
            "lengths": args.lengths,
            "steps": args.steps,
            "eval_examples": args.eval_examples,
            "bptt_segments": args.bptt_segments,
            "seed": args.seed,
            "device": str(device),
            "out_dir": str(args.out_dir),
            "overrides": overrides,
        },
        "task": DEFINITION,
        "chance_token_accuracy": 1 / N_SYMBOLS,
        "teacher_forced_baselines": baselines,
        "results": results,
        "wall_s": time.monotonic() - started,
    }
    write_report(report, args.output)
    if any("error" in r for by_length in results.values() for r in by_length.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
