"""Training: lanes of the token stream, carried decoder states, AdamW, checkpoints, exact resume.

One optimizer step reads segment ``i`` of every lane (``train.batch_size`` lanes of ``train.seq_len`` tokens), in
micro-batches of ``train.micro_batch_size`` lanes whose gradients are accumulated. Each lane's decoder state is
carried from one segment to the next and detached after every step (truncated backprop through time, as in
Transformer-XL); at the start of every epoch the states are reset because the lanes start again, and the model
itself empties a lane's memory at every document separator (``model.reset_at_separator``). Parameters are trained in
three groups (:func:`parameter_groups`): weight matrices with weight decay, biases and norms without, and the
decoder's position parameters (spans, AFT biases and decays) without decay at ``train.position_lr_scale`` x lr.

Resuming restores the weights, the optimizer moments, the step, the tokens seen, the data cursor, the lane states and
the RNG state, so a run of N + M steps equals a run of N steps resumed for M more.

This module is the loop (:class:`Trainer`, the optimizer and its schedule, validation) and :func:`train`, which puts
it in its run folder; the folder itself (lock, metrics log, resume and overwrite rules, stop signals) is
:mod:`longctx.run_folder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from longctx import __version__, distributed
from longctx.checkpoint import (
    CONFIG_FILE,
    TrainerMeta,
    TrainerState,
    check_trainer_state,
    check_weights_header,
    find_checkpoints,
    load_trainer_state,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
    remove_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from longctx.config import Config
from longctx.data import Document, Lanes, build_token_cache, cache_root, discover, read_texts, split_documents
from longctx.decoders import State
from longctx.distributed import Dist
from longctx.errors import ConfigError, LongctxError
from longctx.model import LongContextLM, build_model, check_model_size, inference
from longctx.run_folder import (
    EXIT_CODES,
    METRICS_FILE,
    MetricsLog,
    RunOptions,
    SignalFlag,
    check_init_from,
    check_lineage,
    check_loggers,
    clear_out_dir,
    merge_resumed_config,
    prepare_out_dir,
    resolve_resume,
    run_lock,
    writing,
)
from longctx.tokenizer import Tokenizer

log = logging.getLogger("longctx")
STATE_PREFIX = "lane_state."


class Interrupted(LongctxError):
    """Training stopped by SIGINT (exit 130) or SIGTERM (exit 143) after writing a checkpoint."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    last_checkpoint: Path | None
    final_loss: float | None
    val: dict[str, float] | None


# --------------------------------------------------------------------------------------------------------------------
# environment


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` over ``lr_decay_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def non_finite_parameters(model: LongContextLM) -> list[str]:
    """Names of the parameters holding NaN or inf (one synchronisation when all are finite: checked every step)."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])  # (n_params,)
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def parameter_groups(model: LongContextLM) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters by optimizer group.

    * ``decay``: weight matrices and the embedding (the only parameters with weight decay);
    * ``no_decay``: biases, norms, gains and the relative-position biases of the attention;
    * ``position``: what the decoder reports in ``position_parameters()`` (spans, AFT position biases and decay
      rates): no weight decay and ``train.position_lr_scale`` times the learning rate.
    """
    position = {id(p) for p in model.decoder.position_parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "position": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in position:
            groups["position"].append(p)
        elif p.dim() >= 2 and name.endswith("weight"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return groups


def group_lr(group: dict[str, Any], lr: float, cfg: Any) -> float:
    """The learning rate of an optimizer group when the schedule says ``lr``."""
    return lr * (cfg.position_lr_scale if group.get("name") == "position" else 1.0)


def make_optimizer(model: LongContextLM, cfg: Any) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`: decoupled weight decay on matrices only, position parameters faster."""
    groups = [
        {"params": params, "name": name, "weight_decay": cfg.weight_decay if name == "decay" else 0.0}
        for name, params in parameter_groups(model).items()
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
    for group in optimizer.param_groups:
        group["lr"] = group_lr(group, cfg.lr, cfg)
    return optimizer


# --------------------------------------------------------------------------------------------------------------------
# run folder


# --------------------------------------------------------------------------------------------------------------------
# data and tokenizer


def prepare_tokenizer(
    config: Config,
    resume_from: Path | None,
    init_from: Path | None,
    out_dir: Path,
    dist: Dist,
    train_docs: list[Document],
) -> Tokenizer:
    """The run's tokenizer: from the checkpoint, byte-level, or BPE trained by rank 0 and shared through the folder."""
    for source in (resume_from, init_from):
        if source is not None:
            return Tokenizer.from_file(str(source / "tokenizer.json"))
    if config.data.tokenizer == "byte":
        return Tokenizer.byte_level()
    shared = out_dir / "tokenizer.json"
    if dist.main:
        log.info("training a BPE tokenizer (up to %d tokens) on %d documents", config.data.vocab_size, len(train_docs))
        tokenizer = Tokenizer.train_bpe(read_texts(train_docs), config.data.vocab_size)
        if tokenizer.vocab_size < config.data.vocab_size:
            log.info(
                "the BPE tokenizer learned %d tokens (the corpus holds no more merges than that)", tokenizer.vocab_size
            )
        with writing(shared):
            tokenizer.save(str(shared))
    distributed.barrier(dist)
    return tokenizer if dist.main else Tokenizer.from_file(str(shared))


def prepare_data(
    config: Config, tokenizer: Tokenizer, split: tuple[list[Document], list[Document]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token streams (memory-mapped) of the training and validation documents (``split``: found already)."""
    train_docs, val_docs = split or split_documents(discover(config.data.paths), config.data.val_docs)
    root = cache_root(config.data)
    train_tokens = build_token_cache(train_docs, tokenizer, root)
    val_tokens = build_token_cache(val_docs, tokenizer, root) if val_docs else np.zeros(0, dtype=train_tokens.dtype)
    if not val_docs and config.data.val_docs:
        log.warning("only one document: no validation set (give several files to hold some out)")
    return train_tokens, val_tokens


def announce_validation(config: Config, val_docs: list[Document], val_tokens: np.ndarray) -> None:
    """Which documents are held out and how many tokens they hold; a warning when validation cannot run."""
    if not val_docs:
        return
    names = ", ".join(Path(d.name).name for d in val_docs)
    log.info(
        "validation: %d held-out document%s (%s), %s tokens",
        len(val_docs),
        "s" * (len(val_docs) != 1),
        names,
        f"{len(val_tokens):,}",
    )
    if len(val_tokens) < config.train.seq_len + 1:
        log.warning(
            "validation will not run: the held-out documents hold %d tokens, fewer than one segment "
            "(train.seq_len + 1 = %d); hold out more or longer documents (data.val_docs)",
            len(val_tokens),
            config.train.seq_len + 1,
        )


# --------------------------------------------------------------------------------------------------------------------
# validation


def validate(
    model: LongContextLM,
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
) -> dict[str, float] | None:
    """Loss and bits per byte on the held-out stream, read in carry mode over up to ``batch_size`` lanes."""
    cfg = config.train
    budget = cfg.eval_tokens or len(tokens)
    n_lanes = max(1, min(cfg.batch_size, (min(budget, len(tokens)) - 1) // (cfg.seq_len + 1)))
    if len(tokens) < cfg.seq_len + 1:
        return None
    lanes = Lanes(tokens[: min(len(tokens), budget + n_lanes)], n_lanes, cfg.seq_len)
    nll, count, n_bytes = 0.0, 0, 0
    lengths = torch.from_numpy(tokenizer.token_lengths)
    with inference(model, cfg.precision):
        state = model.init_state(n_lanes, device)
        for index in range(lanes.segments_per_epoch):
            x, y = lanes.batch(index, range(n_lanes))
            out = model(x.to(device), state, y.to(device))
            state = out.state
            nll += out.loss.item() * y.numel()
            count += y.numel()
            n_bytes += int(lengths[y].sum())
    loss = nll / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": nll / (max(n_bytes, 1) * math.log(2)),
        "val_tokens": count,
    }


# --------------------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """The training loop over this rank's lanes. With torchrun, rank r owns lanes ``[r * B/W, (r + 1) * B/W)``."""

    def __init__(
        self,
        config: Config,
        model: LongContextLM,
        tokenizer: Tokenizer,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        device: torch.device,
        run: RunOptions,
        dist: Dist,
    ) -> None:
        self.config, self.cfg = config, config.train
        self.model, self.tokenizer, self.device, self.run, self.dist = model, tokenizer, device, run, dist
        self.val_tokens = val_tokens
        self.lanes = Lanes(train_tokens, self.cfg.batch_size, self.cfg.seq_len)
        per_rank = self.cfg.batch_size // dist.world
        self.micro = self.cfg.micro_batch_size or per_rank  # lanes per forward/backward
        self.accum = per_rank // self.micro  # micro-batches per rank and step
        self.first_lane = dist.rank * per_rank
        net = torch.compile(model) if self.cfg.compile else model  # checkpoints always save `model` itself
        self.net = DistributedDataParallel(net) if dist.enabled else net
        self.optimizer = make_optimizer(model, self.cfg)
        self.step, self.tokens_seen, self.cursor, self.elapsed, self.bad_steps = 0, 0, 0, 0.0, 0
        self.states = [model.init_state(self.micro, device) for _ in range(self.accum)]
        self.last_checkpoint: Path | None = None
        self.last_val: dict[str, float] | None = None
        self.metrics: MetricsLog | None = None  # told the newest checkpoint, which its write errors name

    # --------------------------------------------------------------------------------------------- state for resume

    def trainer_state(self) -> TrainerState:
        """Optimizer, all lanes' states (gathered from every rank), RNG states; every rank must call it."""
        tensors, groups = optimizer_to_tensors(self.optimizer)
        lanes = distributed.gather_state(self.dist, type(self.states[0]).concat(self.states))
        tensors.update(lanes.to_tensors(prefix=STATE_PREFIX))
        for rank, rng in enumerate(distributed.gather_tensor(self.dist, torch.get_rng_state())):
            tensors[f"rng.torch.{rank}"] = rng
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = TrainerMeta(
            step=self.step,
            tokens_seen=self.tokens_seen,
            data_cursor=self.cursor,
            elapsed_s=self.elapsed,
            param_groups=groups,
            longctx_version=__version__,
            lanes=self.cfg.batch_size,
            world_size=self.dist.world,
            val=self.last_val,
        )
        return TrainerState(meta=meta, tensors=tensors)

    def restore(self, saved: TrainerState) -> None:
        check_trainer_state(saved, self.optimizer, self.states[0], STATE_PREFIX)  # reads the tensors once checked
        meta, tensors = saved.meta, saved.tensors
        optimizer_from_tensors(self.optimizer, tensors, meta.param_groups)
        self.step, self.tokens_seen, self.cursor, self.elapsed = (
            meta.step,
            meta.tokens_seen,
            meta.data_cursor,
            meta.elapsed_s,
        )
        self.last_val = meta.val
        try:
            lanes = type(self.states[0]).from_tensors(tensors, prefix=STATE_PREFIX).to(self.device)
        except KeyError:
            raise LongctxError(
                "the checkpoint holds no lane states for this decoder; resume with the config that wrote it"
            ) from None
        if next(iter(lanes.tensors().values())).shape[0] != self.cfg.batch_size:
            raise ConfigError("train.batch_size differs from the resumed run's; keep it to resume exactly")
        mb, first = self.micro, self.first_lane
        self.states = [
            lanes.select(torch.arange(first + i * mb, first + (i + 1) * mb, device=self.device))
            for i in range(self.accum)
        ]
        rng = tensors.get(f"rng.torch.{self.dist.rank}")
        if rng is not None and meta.world_size == self.dist.world:
            torch.set_rng_state(rng)
        else:  # another world size: the lanes are redistributed exactly, the random streams start anew
            torch.manual_seed(self.cfg.seed + self.dist.rank + self.step)
        if self.device.type == "cuda" and "rng.cuda" in tensors and self.dist.world == 1:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    # --------------------------------------------------------------------------------------------- one step

    def reset_states(self) -> None:
        every = torch.ones(self.micro, dtype=torch.bool, device=self.device)
        self.states = [s.reset(every) for s in self.states]

    def accumulate(self) -> tuple[float, list[State], dict[str, float]]:
        """Forward and backward over this rank's micro-batches; returns (mean loss, next states, decoder stats)."""
        cfg, mb = self.cfg, self.micro
        total, stats, new_states = 0.0, {}, []
        for i, state in enumerate(self.states):
            x, y = self.lanes.batch(self.cursor, range(self.first_lane + i * mb, self.first_lane + (i + 1) * mb))
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:  # gradients are all-reduced across ranks once, after the last micro-batch
                with autocast(self.device, cfg.precision):
                    out = self.net(x.to(self.device), state, y.to(self.device))
                ((out.loss + out.aux_loss) / self.accum).backward()
            total += out.loss.item() / self.accum
            new_states.append(out.state.detach())
            stats = out.stats
        return distributed.mean(self.dist, total, self.device), new_states, stats

    def train_step(self) -> tuple[float, float, dict[str, float]]:
        """One optimizer step over all lanes; returns (loss, grad norm, decoder stats). NaN loss = step skipped."""
        cfg, model = self.cfg, self.model
        if self.lanes.is_epoch_start(self.cursor) and self.cursor > 0:
            self.reset_states()
        if self.run.before_step is not None:
            self.run.before_step(self)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group_lr(group, lr, cfg)
        total, new_states, stats = self.accumulate()
        norm = float("nan")
        if math.isfinite(total):
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
        if math.isfinite(total) and math.isfinite(norm):
            self.optimizer.step()
            model.decoder.after_optimizer_step()
            bad = non_finite_parameters(model)
            if bad:  # a finite loss and gradient, yet the update overflowed: nothing after this can be saved
                raise LongctxError(
                    f"the update of step {self.step + 1} made the weights non-finite "
                    f"({', '.join(bad[:3])}); the last checkpoint ({self.last_checkpoint or 'none'}) "
                    "is intact; resume from it with a lower --lr or --precision fp32"
                )
            self.states = new_states
            self.bad_steps = 0
        else:  # do not apply the step, and start the lanes from empty memory rather than a poisoned one
            self.bad_steps += 1
            self.reset_states()
            log.warning(
                "step %d: non-finite loss or gradient (%s); step skipped (%d in a row)",
                self.step + 1,
                total,
                self.bad_steps,
            )
            if self.bad_steps >= cfg.max_bad_steps:
                raise LongctxError(
                    f"{self.bad_steps} non-finite steps in a row at step {self.step + 1}; stopped. "
                    "The last checkpoint is intact; lower --lr or use --precision fp32"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.cursor += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        return total, norm, stats

    # --------------------------------------------------------------------------------------------- loop

    def budget_left(self) -> bool:
        cfg = self.cfg
        return self.step < cfg.max_steps and not (cfg.max_tokens and self.tokens_seen >= cfg.max_tokens)

    def save(self) -> Path:
        """Write a checkpoint (rank 0) with the states of every rank's lanes; every rank must call it."""
        path = self.run.out_dir / step_dir_name(self.step)
        if self.last_checkpoint is not None and self.last_checkpoint.resolve() == path.resolve() and path.is_dir():
            return path  # this very step is already saved (a resumed run that trained no step): never rewrite it
        bad = non_finite_parameters(self.model)
        if bad:  # load_checkpoint would refuse these weights: keep the last good checkpoint as the newest
            raise LongctxError(
                f"the weights became non-finite at step {self.step} ({', '.join(bad[:3])}); no "
                f"checkpoint written, the last one ({self.last_checkpoint or 'none'}) is intact; "
                "resume from it with a lower --lr or --precision fp32"
            )
        state = self.trainer_state()
        if self.dist.main:
            try:
                save_checkpoint(path, self.model, self.config, self.tokenizer, state)
            except OSError as e:  # disk full, quota, read-only (safetensors' own errors arrive as OSError)
                raise LongctxError(
                    f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoints "
                    "are intact; free space and continue with --resume auto"
                ) from None
            for old in find_checkpoints(self.run.out_dir)[: -self.cfg.keep_last]:
                remove_checkpoint(old)  # a kill during the deletion leaves no partial step-* folder
        distributed.barrier(self.dist)
        self.last_checkpoint = path
        if self.metrics is not None:
            self.metrics.last_checkpoint = path
        return path

    def run_validation(self) -> dict[str, float] | None:
        """Validation on rank 0 (the others wait): the held-out stream is small and read once."""
        if len(self.val_tokens) and self.dist.main:
            self.last_val = validate(self.model, self.val_tokens, self.tokenizer, self.config, self.device)
        distributed.barrier(self.dist)
        return self.last_val if self.dist.main else None

    def validate_and_log(self, metrics: MetricsLog | None) -> None:
        """Validation, written to ``metrics.jsonl`` with what the decoder learned (spans, biases, decays)."""
        val = self.run_validation()
        if not val:
            return
        if metrics is not None:
            learned = self.model.decoder.describe()
            metrics.write(
                {"step": self.step, "tokens": self.tokens_seen, **val, **({"learned": learned} if learned else {})}
            )
        tqdm.write(
            f"step {self.step}: val loss {val['val_loss']:.4f}, val ppl {val['val_ppl']:.2f}, "
            f"val bpb {val['val_bpb']:.4f}",
            file=sys.stderr,
        )

    def log_step(
        self, metrics: MetricsLog | None, loss: float, norm: float, stats: dict[str, float], rate: float, progress: bool
    ) -> None:
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "lr": lr_at(self.step - 1, self.cfg),
            "grad_norm": norm,
            "tokens_per_s": rate,
            "elapsed_s": self.elapsed,
            **stats,
        }
        if metrics is not None:
            metrics.write(record)
        if not progress:
            log.info(
                "step %d/%d | loss %.4f | ppl %.2f | lr %.2e | %s tok/s",
                self.step,
                self.cfg.max_steps,
                loss,
                record["ppl"],
                record["lr"],
                f"{rate:,.0f}",
            )

    def loop(self, metrics: MetricsLog | None, progress: bool) -> TrainResult:
        cfg = self.cfg
        started, last_log, log_tokens = time.monotonic(), time.monotonic(), 0
        elapsed0 = self.elapsed
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        loss = None
        with SignalFlag() as flag:
            while self.budget_left():
                loss, norm, stats = self.train_step()
                log_tokens += cfg.batch_size * cfg.seq_len
                self.elapsed = elapsed0 + time.monotonic() - started
                bar.update(1)
                # every rank takes the same decision, whichever of them got the signal or ran out of time
                signalled, out_of_time = distributed.any_true(
                    self.dist,
                    [flag.signum is not None, bool(cfg.max_time and time.monotonic() - started >= cfg.max_time)],
                    self.device,
                )
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    now = time.monotonic()
                    rate, last_log, log_tokens = log_tokens / max(now - last_log, 1e-9), now, 0
                    self.log_step(metrics, loss, norm, stats, rate, progress)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                if self.step % cfg.eval_interval == 0:
                    self.validate_and_log(metrics)
                if signalled:
                    bar.close()
                    path = self.save()
                    err = Interrupted(
                        f"interrupted at step {self.step}; checkpoint written to {path}; continue "
                        f"with: longctx train --resume auto --out-dir {self.run.out_dir}"
                    )
                    err.exit_code = EXIT_CODES.get(flag.signum, 143)
                    raise err
                if self.step % cfg.save_interval == 0 and self.bad_steps == 0:
                    self.save()
                if out_of_time:
                    break
            bar.close()
            if self.step % cfg.eval_interval != 0:
                self.validate_and_log(metrics)
            if self.last_checkpoint is None or self.last_checkpoint.name != step_dir_name(self.step):
                self.save()
        return TrainResult(
            steps=self.step,
            tokens=self.tokens_seen,
            elapsed_s=self.elapsed,
            last_checkpoint=self.last_checkpoint,
            final_loss=loss,
            val=self.last_val,
        )


# --------------------------------------------------------------------------------------------------------------------
# entry point


def check_world(config: Config, dist: Dist) -> None:
    t = config.train
    if t.batch_size % dist.world or (t.micro_batch_size and (t.batch_size // dist.world) % t.micro_batch_size):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes "
            f"({dist.world}) x train.micro_batch_size ({t.micro_batch_size or 1}); change --batch-size "
            "or --micro-batch-size"
        )


def train(config: Config, run: RunOptions, overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train (or resume) a run in ``run.out_dir``. ``overrides`` are the keys the user set on this command line.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this function: rank 0 owns the run folder (lock, metrics,
    checkpoints, validation); the others train their lanes and join the collectives.
    """
    run.out_dir = Path(run.out_dir)
    check_loggers(run.loggers)
    if run.resume and run.init_from:
        raise ConfigError(
            "--resume and --init-from exclude each other: resume continues a run, init-from starts a "
            "new one from weights"
        )
    dist = distributed.from_env()
    device = resolve_device(config.train.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.main:
        log.setLevel(logging.ERROR)
    distributed.init(dist, device)
    try:
        with run_lock(run.out_dir) if dist.main else contextlib.nullcontext():
            doomed = prepare_out_dir(run) if dist.main else []
            distributed.barrier(dist)
            result = _train(config, run, overrides or {}, device, dist, doomed)
    finally:
        distributed.shutdown(dist)
    if dist.main:
        summarize(result)
    return result


def absolute_data_paths(config: Config) -> Config:
    """``data.paths`` as absolute paths (globs keep their patterns), relative to the current folder."""
    paths = [os.path.abspath(os.path.expanduser(p)) for p in config.data.paths]
    return dataclasses.replace(config, data=dataclasses.replace(config.data, paths=paths))


def _architecture(config: Config) -> dict[str, Any]:
    """What a preset decides and a resumed run cannot change: the model (but the ids the tokenizer sets) and the
    tokenizer."""
    model = dataclasses.asdict(config.model) | {"vocab_size": None, "separator_id": None}
    return {"model": model, "tokenizer": (config.data.tokenizer, config.data.vocab_size)}


def _dotted(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _train(
    config: Config, run: RunOptions, overrides: dict[str, Any], device: torch.device, dist: Dist, doomed: list[Path]
) -> TrainResult:
    resume_from = resolve_resume(run)
    config = absolute_data_paths(config)  # a checkpoint evaluated from another folder still finds its held-out data
    if resume_from is not None:
        check_lineage(resume_from, run.out_dir)
        requested = config
        config = merge_resumed_config(config, absolute_data_paths(read_config(resume_from)), overrides)
        ignored = [
            key
            for key in overrides
            if not key.startswith("train.") and key != "preset" and _dotted(requested, key) != _dotted(config, key)
        ]
        if "preset" in overrides and _architecture(requested) != _architecture(config):
            ignored.insert(0, f"--preset {overrides['preset']}")
        if ignored:  # the same command line as the interrupted run is fine; a different model or data is not
            raise ConfigError(
                f"resuming {resume_from}: the model and data come from the checkpoint, so "
                f"{', '.join(ignored)} cannot change; start a new run with --init-from instead"
            )
    check_world(config, dist)
    init_from = resolve_checkpoint(Path(run.init_from)) if run.init_from else None
    # the data exist and hold text: found once, before --overwrite deletes anything
    split = split_documents(discover(config.data.paths), config.data.val_docs)
    if init_from is not None:
        check_init_from(init_from, config)
        if any(init_from.resolve().is_relative_to(p.resolve()) for p in doomed):
            raise ConfigError(
                f"--init-from {init_from} lies in --out-dir {run.out_dir}, which --overwrite would "
                "empty; copy the checkpoint elsewhere or pick another --out-dir"
            )
    if dist.main:
        clear_out_dir(doomed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    tokenizer = prepare_tokenizer(config, resume_from, init_from, run.out_dir, dist, split[0])
    if (tokenizer.vocab_size, tokenizer.sep_id) != (config.model.vocab_size, config.model.separator_id):
        config = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size, separator_id=tokenizer.sep_id),
        )
    if not dist.main:
        distributed.barrier(dist)  # rank 0 builds the token caches first; the others then find them
    train_tokens, val_tokens = prepare_data(config, tokenizer, split)
    if dist.main:
        distributed.barrier(dist)
    check_model_size(config.model, "the config", ConfigError)  # before anything is allocated
    for source in (init_from, resume_from):
        if source is not None:
            check_weights_header(config.model, source / "model.safetensors")
    model = build_model(config.model).to(device)
    for source in (init_from, resume_from):
        if source is not None:
            load_weights(model, source / "model.safetensors")
    model.train()
    trainer = Trainer(config, model, tokenizer, train_tokens, val_tokens, device, run, dist)
    if resume_from is not None:
        trainer.restore(load_trainer_state(resume_from))
        if resume_from.resolve().parent == run.out_dir.resolve():
            trainer.last_checkpoint = resume_from  # already saved: a run with no step left writes nothing
        log.info("resumed from %s (step %d, %s tokens seen)", resume_from, trainer.step, f"{trainer.tokens_seen:,}")
    metrics = None
    if dist.main:
        with writing(run.out_dir / CONFIG_FILE, trainer.last_checkpoint):
            (run.out_dir / CONFIG_FILE).write_text(config.to_json())
        announce(config, model, train_tokens, val_tokens, device, run, dist)
        announce_validation(config, split[1], val_tokens)
        metrics = MetricsLog(run.out_dir / METRICS_FILE, trainer.step if resume_from else None, run.loggers)
        metrics.last_checkpoint = trainer.last_checkpoint
        trainer.metrics = metrics
    progress = dist.main and (run.progress if run.progress is not None else sys.stderr.isatty())
    try:
        return trainer.loop(metrics, progress)
    finally:
        if metrics is not None:
            metrics.close()


def announce(
    config: Config,
    model: LongContextLM,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    device: torch.device,
    run: RunOptions,
    dist: Dist,
) -> None:
    t = config.train
    log.info(
        "model: %s decoder, %s parameters, state %s bytes per lane",
        config.model.decoder,
        f"{model.num_parameters():,}",
        f"{model.init_state(1, device).nbytes():,}",
    )
    per_rank = t.batch_size // dist.world
    log.info(
        "data: %s training tokens, %s validation tokens; %d lanes x %d tokens per step, gradient accumulation %d",
        f"{len(train_tokens):,}",
        f"{len(val_tokens):,}",
        t.batch_size,
        t.seq_len,
        per_rank // (t.micro_batch_size or per_rank),
    )
    procs = f", {dist.world} processes" if dist.enabled else ""
    log.info(
        "device %s%s, precision %s, %d threads, seed %d; writing to %s",
        device,
        procs,
        t.precision,
        torch.get_num_threads(),
        t.seed,
        run.out_dir,
    )


def summarize(result: TrainResult) -> None:
    rate = result.tokens / max(result.elapsed_s, 1e-9)
    val = result.val or {}
    parts = [f"{result.steps} steps", f"{result.tokens:,} tokens", f"{result.elapsed_s:.1f} s", f"{rate:,.0f} tok/s"]
    if result.final_loss is not None:
        parts.append(f"train loss {result.final_loss:.4f}")
    if val:
        parts.append(f"val loss {val['val_loss']:.4f} (bpb {val['val_bpb']:.4f})")
    log.info("done: %s", " | ".join(parts))
    if result.last_checkpoint is not None:
        log.info("checkpoint: %s", result.last_checkpoint)
