"""The run folder of a training: its lock, its metrics log, the checkpoints it holds, resuming, and stop signals.

``longctx train --out-dir DIR`` owns DIR while it runs (:func:`run_lock`): one process at a time. DIR holds
``metrics.jsonl`` (and optionally ``metrics.csv`` and ``tensorboard/``), written by :class:`MetricsLog`, which on a
resume drops the records of steps after the checkpoint it resumes from, and the checkpoints ``step-NNNNNNNN/``
(written by :mod:`longctx.checkpoint`). Everything here is found or refused before any training or deletion starts:
a non-empty folder without ``--overwrite`` or ``--resume``, a checkpoint of another run, an ``--init-from`` of
another architecture. :class:`SignalFlag` turns SIGINT, SIGTERM and SIGHUP into a flag the loop checks between
steps, so that a checkpoint is written before the process exits. The training loop itself is in
:mod:`longctx.train`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.checkpoint import (
    check_weights_header,
    find_checkpoints,
    load_weights,
    read_config,
    recover_temporary,
    resolve_checkpoint,
)
from longctx.config import Config
from longctx.errors import CheckpointError, ConfigError, LongctxError
from longctx.model import build_model
from longctx.tokenizer import Tokenizer
from longctx.validate import loads_json

if TYPE_CHECKING:
    from longctx.train import Trainer

log = logging.getLogger("longctx")

METRICS_FILE = "metrics.jsonl"


LOCK_FILE = ".lock"


@dataclass
class RunOptions:
    out_dir: Path
    resume: str | None = None  # None, "auto" or a checkpoint path
    init_from: str | None = None  # checkpoint whose weights start a new run
    overwrite: bool = False
    progress: bool | None = None  # None = a bar when stderr is a terminal
    loggers: tuple[str, ...] = ()  # besides metrics.jsonl: "csv" (metrics.csv), "tensorboard" (tensorboard/)
    # extension point for experiments: called with the Trainer before each optimizer step (e.g. to empty the lanes'
    # states, as benchmarks/aft_stall.py does); None for `longctx train`
    before_step: Callable[[Trainer], None] | None = None


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """One training process per folder. The OS drops the lock when the process dies, so it never stays stuck.
    Taking it is the run's first write: a folder that cannot be written (a file, under a file, read-only, a name
    too long, a full disk) is one line before any work."""
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise LongctxError(f"--out-dir {out_dir} is a file; give a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise LongctxError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}; give a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LongctxError(
                f"another longctx train is writing to {out_dir}; wait for it or choose another --out-dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            raise LongctxError(
                f"cannot write to --out-dir {out_dir}: {e.strerror or e}; free space there or give another folder"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: Path, last_checkpoint: Path | None = None) -> Iterator[None]:
    """A failed write of a run file (disk full, quota, read-only) -> one line naming the file; the checkpoints
    already written are untouched."""
    try:
        yield
    except OSError as e:
        kept = f"the last checkpoint ({last_checkpoint}) is intact; " if last_checkpoint else ""
        raise LongctxError(
            f"cannot write {path}: {e.strerror or e}; {kept}free space and continue with --resume auto"
        ) from None


def prepare_out_dir(run: RunOptions) -> list[Path]:
    """Refuse to mix a new run into a folder that holds another one, unless asked to overwrite it.

    Returns what ``--overwrite`` will delete; :func:`clear_out_dir` deletes it only once the rest of the command
    (data, ``--init-from``, config) has been checked, so a mistake never costs the old run.
    """
    out = run.out_dir
    if out.exists() and not out.is_dir():
        raise LongctxError(f"--out-dir {out} is a file; give a folder")
    if out.is_dir():  # temporary folders left by a process killed while saving: recovered when complete
        for path in recover_temporary(out):
            log.warning("recovered %s from a save that was interrupted", path)
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if not entries or run.resume:
        return []
    if not run.overwrite:
        raise LongctxError(
            f"--out-dir {out} is not empty; continue that run with --resume auto, pick another "
            "--out-dir, or replace it with --overwrite"
        )
    return entries


def clear_out_dir(entries: list[Path]) -> None:
    """Delete what ``--overwrite`` replaces; a symbolic link is removed itself, never what it points to."""
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def check_init_from(init_from: Path, config: Config) -> None:
    """``--init-from``: the checkpoint's weights must fit the new run's model; else name what differs."""
    tokenizer = Tokenizer.from_file(str(init_from / "tokenizer.json"))
    wanted = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size, separator_id=tokenizer.sep_id)
    try:
        check_weights_header(wanted, init_from / "model.safetensors")
        load_weights(build_model(wanted), init_from / "model.safetensors")
    except CheckpointError:
        have = dataclasses.asdict(read_config(init_from).model)
        want = dataclasses.asdict(wanted)
        differ = [
            f"model.{k} = {json.dumps(have.get(k))} there, {json.dumps(want[k])} here"
            for k in want
            if have.get(k) != want[k] and (k == "decoder" or k == wanted.decoder or not isinstance(want[k], dict))
        ]
        raise ConfigError(
            f"--init-from {init_from} holds another architecture than the new run's preset "
            f"({'; '.join(differ) or 'the weights differ'}); pick the checkpoint's --preset or "
            "--set the keys to match"
        ) from None


def resolve_resume(run: RunOptions) -> Path | None:
    if run.resume is None:
        return None
    if run.resume == "auto":
        found = find_checkpoints(run.out_dir)
        return found[-1] if found else None
    return resolve_checkpoint(Path(run.resume))


def merge_resumed_config(requested: Config, checkpoint: Config, overrides: dict[str, Any]) -> Config:
    """Model and data come from the checkpoint; ``train.*`` keys the user set now (e.g. a longer budget) win."""
    train = dataclasses.asdict(checkpoint.train)
    for key in overrides:
        if key.startswith("train."):
            train[key.split(".", 1)[1]] = getattr(requested.train, key.split(".", 1)[1])
    return dataclasses.replace(checkpoint, train=type(checkpoint.train)(**train))


CSV_FILE = "metrics.csv"


TENSORBOARD_DIR = "tensorboard"


LOGGERS = ("csv", "tensorboard")


CSV_COLUMNS = (
    "step",
    "tokens",
    "loss",
    "ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "val_tokens",
)


def _trim(path: Path, keep_up_to_step: int | None, step_of: Callable[[str], int]) -> None:
    """Drop the lines an interrupted run wrote after its checkpoint: a new file renamed over the old, so that a kill
    never leaves it half-written."""
    if keep_up_to_step is None or not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and step_of(ln) <= keep_up_to_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _csv_step(line: str) -> int:
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else 0  # the header is kept


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log step and validation, flushed at once; with ``loggers``, the same
    records in ``metrics.csv`` (fixed columns) and TensorBoard event files (``tensorboard/``)."""

    def __init__(self, path: Path, keep_up_to_step: int | None, loggers: tuple[str, ...] = ()) -> None:
        with writing(path):
            self._open(path, keep_up_to_step, loggers)
        self.last_checkpoint: Path | None = None  # named when a write fails

    def _open(self, path: Path, keep_up_to_step: int | None, loggers: tuple[str, ...]) -> None:
        self.path = path
        _trim(path, keep_up_to_step, _step_of)
        self.file = open(path, "a", encoding="utf-8")
        self.csv: Any = None
        if "csv" in loggers:
            csv_path = path.with_name(CSV_FILE)
            _trim(csv_path, keep_up_to_step, _csv_step)
            fresh = not csv_path.exists() or csv_path.stat().st_size == 0
            self.csv_file = open(csv_path, "a", encoding="utf-8", newline="")
            self.csv = csv.DictWriter(self.csv_file, CSV_COLUMNS, extrasaction="ignore")
            if fresh:
                self.csv.writeheader()
        self.tensorboard: Any = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter  # checked by check_loggers before any work

            purge = keep_up_to_step + 1 if keep_up_to_step is not None else None
            self.tensorboard = SummaryWriter(str(path.parent / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path, self.last_checkpoint):
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        safe = _json_safe(record)
        self.file.write(json.dumps(safe, allow_nan=False) + "\n")
        self.file.flush()
        if self.csv is not None:
            self.csv.writerow({k: "" if safe.get(k) is None else safe[k] for k in CSV_COLUMNS})
            self.csv_file.flush()
        if self.tensorboard is not None:
            for key, value in safe.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(
                        ("val/" if key.startswith("val_") else "train/") + key, value, record["step"]
                    )
            self.tensorboard.flush()

    def close(self) -> None:
        """Every record was flushed when written; a close that fails to flush a failed write again (a full disk)
        must not hide the error that ends the run."""
        with contextlib.suppress(OSError):
            self.file.close()
        if self.csv is not None:
            with contextlib.suppress(OSError):
                self.csv_file.close()
        if self.tensorboard is not None:
            with contextlib.suppress(OSError):
                self.tensorboard.close()


def check_loggers(loggers: tuple[str, ...]) -> None:
    """Unknown loggers and a missing TensorBoard are found before any work."""
    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(
                f"--logger {name!r} is not a logger; use {' or '.join(LOGGERS)} (metrics.jsonl is always written)"
            )
    if "tensorboard" in loggers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--logger tensorboard needs the tensorboard package: pip install tensorboard "
                "(or the extra: pip install 'longctx[tensorboard]')"
            ) from None


def _json_safe(value: Any) -> Any:
    """NaN and infinities (not JSON) become null, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _step_of(line: str) -> int:
    try:
        return int(loads_json(line, "metrics.jsonl").get("step", 0))
    except (LongctxError, AttributeError, TypeError, ValueError):
        return 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal was closed


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class SignalFlag:
    """SIGINT / SIGTERM / SIGHUP set a flag; the loop checks it after each step, saves, and exits 130 / 143 / 129."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                "(signals are ignored until it is written)",
                file=sys.stderr,
            )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_lineage(resume_from: Path, out_dir: Path) -> None:
    """A resumed run continues the newest checkpoint of its own folder, or starts a branch in a folder without
    checkpoints: it never writes beside (and prunes) checkpoints of another line of training."""
    found = find_checkpoints(out_dir)
    if not found or found[-1].resolve() == resume_from.resolve():
        return
    if resume_from.resolve().parent == out_dir.resolve():
        raise ConfigError(
            f"--resume {resume_from} is not the newest checkpoint of {out_dir} ({found[-1].name} is); "
            "continuing it there would mix two lines of training and prune the newer one: give an "
            "empty --out-dir to branch from it, or --resume auto to continue the newest"
        )
    raise ConfigError(
        f"--out-dir {out_dir} holds another run's checkpoints; resume {resume_from} into its own "
        "folder (--out-dir "
        f"{resume_from.parent}) or into an empty one"
    )
