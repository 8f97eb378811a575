"""The ``longctx`` command line: train, eval, generate, info.

Each command parses its flags, then calls one library function. User mistakes end with one line on stderr
(``error: ...``) and a non-zero exit code; ``--debug`` anywhere on the line shows the traceback instead.
Long flags also accept underscores (``--out_dir``), as LitGPT and nanoGPT users type them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import typer

from longctx.config import DEFAULT_PRESET, Config, load_config, parse_set_args
from longctx.errors import ConfigError, DataError, LongctxError
from longctx.validate import check_options, loads_json

log = logging.getLogger("longctx")
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train, evaluate and sample long-context language models with bounded memory.",
)

RUNS_ROOT = Path("runs")
UsageError = typer.BadParameter.__base__  # typer's (vendored) click UsageError: bad flags, missing values
DATA_FLAGS = ("--data",)
EVAL_LOG_INTERVAL_S = 10.0  # eval without a progress bar (a log file): one progress line this often


# --------------------------------------------------------------------------------------------------------------------
# shared helpers


class Interrupted(LongctxError):
    """Ctrl-C after part of the work: what was done is said (or written) first; exit code 130."""

    exit_code = 130


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def setup_logging(quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def build_config(
    preset: str, flags: dict[str, Any], sets: list[str] | None, flag_names: dict[str, str] | None = None
) -> tuple[Config, dict[str, Any]]:
    """Preset + flag values + ``--set`` items -> config; each override is echoed once on stderr.

    The config is the one place where values are checked: a flag whose value it refuses is named in the error next to
    its key (``flag_names``: dotted key -> flag), so the flags carry no limits of their own to disagree with it.
    """
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_set_args(sets or []))
    try:
        config = load_config(preset, overrides)
    except ConfigError as e:
        message = str(e)
        for key, flag in (flag_names or {}).items():
            if flags.get(key) is not None and f"{key} " in message:
                raise ConfigError(message.replace(f"{key} ", f"{key} ({flag}) ", 1)) from None
        raise
    for key in overrides:
        value = config.to_dict()
        for part in key.split("."):
            value = value[part]
        log.info("override: %s = %s", key, json.dumps(value))
    return config, overrides


def pick_checkpoint(model: Path | None, flag: str = "--model PATH") -> Path:
    """``--model`` (a checkpoint, or a run folder: its newest checkpoint, named on stderr) or, without it, the most
    recently written checkpoint under ./runs (said on stderr)."""
    from longctx.checkpoint import find_latest_checkpoint, resolve_checkpoint

    if model is not None:
        found = resolve_checkpoint(model)
        if found != Path(model):
            log.info("using the newest checkpoint of %s: %s", model, found)
        return found
    found = find_latest_checkpoint(RUNS_ROOT)
    if found is None:
        raise LongctxError(
            f"no checkpoint given and none under {RUNS_ROOT}/; train one with `longctx train` or give {flag}"
        )
    log.info("using the most recent checkpoint: %s", found)
    return found


def load_for_inference(model_path: Path | None, device_name: str, threads: int) -> tuple[Any, Any, Config, Any, Path]:
    """(model on the device, tokenizer, config, device, the checkpoint loaded). A checkpoint that a training run
    prunes while it is read is picked again once (:func:`longctx.checkpoint.load_newest`)."""
    from longctx.checkpoint import load_newest
    from longctx.train import resolve_device

    if threads:
        import torch

        torch.set_num_threads(threads)
    device = resolve_device(device_name)  # a wrong --device is found before the checkpoint is read
    model, tokenizer, config, path = load_newest(lambda: pick_checkpoint(model_path))
    return model.to(device), tokenizer, config, device, path


def check_output(path: Path | None, flag: str) -> None:
    """Before any work: ``path`` can be written (its folder is created if missing), so that a long evaluation or
    prompt is never lost to a bad output path at the end."""
    if path is None:
        return
    try:
        if path.is_dir():
            raise ConfigError(f"{flag} {str(path)!r} is a folder; give a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a folder under a file, a read-only file system, a name too long
        raise ConfigError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e}); give another path") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag} {str(path)!r} is not writable; give another path")


def open_input(path: str, what: str) -> tuple[str, BinaryIO]:
    """(name, binary stream) for a path or ``-`` (stdin); one-line errors for what cannot be read."""
    if path == "-":
        return "<stdin>", sys.stdin.buffer
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {path!r} does not exist")
    if p.is_dir():
        raise DataError(f"{what} {path!r} is a folder; give a file")
    try:
        f = open(p, "rb")
    except OSError as e:
        raise DataError(f"cannot read {what} {path!r}: {e.strerror}") from None
    mode = os.fstat(f.fileno()).st_mode
    if stat.S_ISREG(mode) and os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise DataError(f"{what} {path!r} is empty (0 bytes)")
    return str(p), f


# --------------------------------------------------------------------------------------------------------------------
# train


@app.command()
def train(
    data: list[str] = typer.Option(
        None,
        "--data",
        help="Text files, folders or globs (each file is one document). Default: the bundled Shakespeare corpus.",
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help=f"Preset name (models/NAME.toml) or TOML path. Default: {DEFAULT_PRESET}; on --resume: the resumed run's.",
    ),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: --set train.lr=3e-4 (repeatable)."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Run folder. Default: runs/<preset>."),
    resume: str = typer.Option(
        None, "--resume", help="'auto' (newest checkpoint in --out-dir, if any) or a checkpoint folder."
    ),
    init_from: Path = typer.Option(None, "--init-from", help="Start a new run from this checkpoint's weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what a non-empty --out-dir holds."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective config as JSON and exit."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (train.max_steps)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Token budget; 0 = none."),
    max_time: float = typer.Option(
        None,
        "--max-time",
        help="Time budget in seconds of the training loop (the final validation and checkpoint come on top); 0 = none.",
    ),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per segment and lane."),
    batch_size: int = typer.Option(None, "--batch-size", help="Lanes per optimizer step."),
    micro_batch_size: int = typer.Option(
        None,
        "--micro-batch-size",
        help="Lanes per forward/backward (gradient accumulation); default: all lanes of a process.",
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(None, "--warmup-steps"),
    precision: str = typer.Option(None, "--precision", help="fp32 or bf16 (autocast)."),
    threads: int = typer.Option(None, "--threads", help="Torch threads; 0 = default."),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default off)."),
    log_interval: int = typer.Option(None, "--log-interval"),
    eval_interval: int = typer.Option(None, "--eval-interval"),
    save_interval: int = typer.Option(None, "--save-interval"),
    keep_last: int = typer.Option(None, "--keep-last", help="Checkpoints to keep."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="byte (default) or bpe (trained on the corpus)."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="BPE vocabulary size."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    logger: list[str] = typer.Option(
        None,
        "--logger",
        help="Also log to: csv (metrics.csv) or tensorboard "
        "(tensorboard/; needs the tensorboard package). Repeatable; metrics.jsonl "
        "is always written.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Train a model (default: the default preset on the bundled corpus). Resumable; checkpoints in safetensors."""
    from longctx.train import RunOptions
    from longctx.train import train as run_training

    setup_logging(quiet)
    flags = {
        "train.max_steps": max_steps,
        "train.max_tokens": max_tokens,
        "train.max_time": max_time,
        "train.seq_len": seq_len,
        "train.batch_size": batch_size,
        "train.micro_batch_size": micro_batch_size,
        "train.lr": lr,
        "train.warmup_steps": warmup_steps,
        "train.precision": precision,
        "train.threads": threads,
        "train.seed": seed,
        "train.device": device,
        "train.compile": compile_,
        "train.log_interval": log_interval,
        "train.eval_interval": eval_interval,
        "train.save_interval": save_interval,
        "train.keep_last": keep_last,
        "data.tokenizer": tokenizer,
        "data.vocab_size": vocab_size,
        "data.paths": list(data) if data else None,
    }
    given_preset, preset = preset, preset or DEFAULT_PRESET
    flag_names = {key: "--" + key.split(".")[1].replace("_", "-") for key in flags}
    flag_names.update({"train.compile": "--compile", "data.paths": "--data"})
    config, overrides = build_config(preset, flags, set_, flag_names)
    if print_config:
        typer.echo(config.to_json())
        return
    if given_preset is not None:  # a resumed run must not silently ignore another preset
        overrides["preset"] = given_preset
    name = Path(preset).stem if preset.endswith((".toml", ".json")) else preset
    if out_dir is None and resume not in (None, "auto"):  # --resume PATH continues in the checkpoint's own folder
        from longctx.checkpoint import resolve_checkpoint

        out_dir = resolve_checkpoint(Path(resume)).parent
    run = RunOptions(
        out_dir=out_dir or RUNS_ROOT / name,
        resume=resume,
        init_from=str(init_from) if init_from else None,
        overwrite=overwrite,
        progress=progress,
        loggers=tuple(logger or ()),
    )
    run_training(config, run, overrides)


# --------------------------------------------------------------------------------------------------------------------
# eval


def eval_documents(files: list[str], config: Config) -> list[Any]:
    from longctx.data import Document, discover, split_documents

    if not files:
        try:
            found = discover(config.data.paths)
        except DataError as e:
            raise DataError(
                f"the checkpoint's training data is no longer where it was ({e}); give FILE arguments to evaluate"
            ) from None
        _, held_out = split_documents(found, config.data.val_docs)
        if not held_out:
            raise DataError("the checkpoint's training data has no held-out documents; give FILE arguments")
        log.info("evaluating the %d held-out documents of the training data", len(held_out))
        return held_out
    docs = []
    for f in files:
        if f == "-":
            data = sys.stdin.buffer
            docs.append(Document("<stdin>", 0, 0, lambda d=data: contextlib.nullcontext(d)))
            continue
        p = Path(f).expanduser()
        if p.exists() and not p.is_dir() and not p.is_file():
            name, stream = open_input(f, "file")  # a FIFO or device: read it once, as a stream
            docs.append(Document(name, 0, 0, lambda s=stream: s))
            continue
        docs.extend(discover([f]))
    return docs


@app.command("eval")
def eval_(
    files: list[str] = typer.Argument(
        None, help="Files to evaluate ('-' = stdin). Default: the held-out documents of the checkpoint's training data."
    ),
    ppl: bool = typer.Option(
        True,
        "--ppl",
        show_default=False,
        help="Measure loss, perplexity and bits per byte: the only task, so optional.",
    ),
    model: Path = typer.Option(None, "--model", "-m", help="Checkpoint folder. Default: newest under runs/."),
    mode: str = typer.Option("carry", "--mode", help="carry (memory carried through each file) or sliding."),
    seq_len: int = typer.Option(
        None, "--seq-len", help="carry: tokens per forward call (speed only). Default: training seq_len, at least 1024."
    ),
    window: int = typer.Option(None, "--window", "--ctx-size", "-c", help="sliding: tokens per window."),
    stride: int = typer.Option(None, "--stride", help="sliding: step between windows (default window/2)."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="Stop after this many tokens (0 = all)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file."),
    per_position: Path = typer.Option(None, "--per-position", help="Write mean NLL per position bucket (CSV)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0),
    progress: bool = typer.Option(None, "--progress/--no-progress"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate loss, perplexity and bits per byte on files of any length, in bounded memory."""
    from longctx.model import read_segment
    from longctx.scoring import EvalOptions, evaluate_documents, format_report, write_per_position_csv

    setup_logging(quiet)
    given = dict(mode=mode, precision=precision, seq_len=seq_len, window=window, stride=stride, max_tokens=max_tokens)
    check_options(given, EvalOptions.RULES)
    if mode == "carry" and (window is not None or stride is not None):
        raise ConfigError(
            "--window/-c and --stride apply to --mode sliding; carry mode reads each file whole "
            "(its segments: --seq-len)"
        )
    check_output(output, "--output")
    check_output(per_position, "--per-position")
    net, tokenizer, config, device, model = load_for_inference(model, device, threads)  # recorded in the result
    docs = eval_documents(list(files or []), config)
    win = window or config.train.seq_len
    opts = EvalOptions(
        mode=mode,
        seq_len=seq_len or read_segment(config.train.seq_len),
        window=win,
        stride=stride or max(1, win // 2),
        max_tokens=max_tokens,
        per_position_buckets=per_position is not None,
        progress=sys.stderr.isatty() if progress is None else progress,
        precision=precision,
        partial_on_interrupt=True,
        log_interval_s=EVAL_LOG_INTERVAL_S,
    )
    result = evaluate_documents(net, tokenizer, docs, opts)
    from longctx import __version__

    result.update(
        checkpoint=str(model),
        longctx_version=__version__,
        decoder=config.model.decoder,
        preset=config.preset,
        tokenizer=tokenizer.kind,
        device=str(device),
    )
    if result.get("partial") and not result["tokens"]:
        raise Interrupted("interrupted before any token was scored; nothing to report")
    if output is not None:
        try:
            output.write_text(json.dumps(result, indent=2))
        except OSError as e:
            raise LongctxError(f"cannot write --output {str(output)!r}: {e.strerror or e}") from None
    if per_position is not None:
        try:
            write_per_position_csv(result, per_position)
        except OSError as e:
            raise LongctxError(f"cannot write --per-position {str(per_position)!r}: {e.strerror or e}") from None
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(format_report(result))
    if result.get("partial"):
        raise Interrupted(
            f"interrupted: the result above is partial, over the {result['tokens']:,} tokens scored "
            f"so far{' (also written to ' + str(output) + ')' if output is not None else ''}"
        )


# --------------------------------------------------------------------------------------------------------------------
# generate


def prompt_chunks(prompt: str | None, prompt_file: str | None, tokenizer: Any) -> tuple[Any, str]:
    """Token chunks of the prompt, read incrementally from a file or stdin."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        name, stream = open_input(prompt_file, "--prompt-file")
    else:
        name, stream = "--prompt", io.BytesIO((prompt or "").encode("utf-8"))
    return (ids for ids, _ in tokenizer.iter_encode(stream, where=name)), name


@app.command()
def generate(
    prompt_file: str = typer.Option(None, "--prompt-file", "-f", help="Prompt of any length ('-' = stdin)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    model: Path = typer.Option(None, "--model", "-m", help="Checkpoint folder. Default: newest under runs/."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", "--n-predict"),
    temperature: float = typer.Option(0.8, "--temperature", "--temp", help="0 = greedy."),
    top_k: int = typer.Option(50, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off."),
    min_p: float = typer.Option(0.0, "--min-p", help="0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", "--repeat-penalty", help="1 = off."),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Tokens the repetition penalty looks back on."),
    seed: int = typer.Option(None, "--seed", help="Default: random (printed)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable)."),
    num_samples: int = typer.Option(1, "--num-samples", min=1),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it is generated."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going after the end-of-document token."),
    save_state: Path = typer.Option(None, "--save-state", help="Save the memory after the prompt (safetensors)."),
    load_state: Path = typer.Option(None, "--load-state", help="Start from a memory saved with --save-state."),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Prompt tokens per forward call (speed only). Default: training seq_len, at least 1024."
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Read a prompt of any length into the memory, then sample text (streamed to stdout; statistics to stderr)."""
    import random

    from longctx.checkpoint import load_state as read_state
    from longctx.checkpoint import save_state as write_state
    from longctx.model import read_segment
    from longctx.sampling import READ_RULES, RECENT_TOKENS, SamplingOptions, read_prompt

    setup_logging(quiet)
    check_options({"precision": precision, "seq_len": seq_len}, READ_RULES)
    check_output(save_state, "--save-state")  # before a long prompt is read
    seed = random.randrange(2**31) if seed is None else seed
    opts = SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repeat_last_n=repeat_last_n,
        seed=seed,
        stop=list(stop or []),
        ignore_eos=ignore_eos,
    )
    net, tokenizer, config, _, _ = load_for_inference(model, device, threads)
    start = read_state(load_state, net, config, tokenizer) if load_state is not None else None
    chunks, name = prompt_chunks(prompt, prompt_file, tokenizer)
    result = read_prompt(
        net,
        tokenizer,
        chunks,
        seq_len or read_segment(config.train.seq_len),
        start=start,
        precision=precision,
        keep_recent=max(RECENT_TOKENS, repeat_last_n),
        progress=sys.stderr.isatty() and not quiet,
    )
    rate = result.prompt_tokens / max(result.elapsed_s, 1e-9)
    log.info(
        "prompt: %s tokens from %s in %.2f s (%s tok/s); state %s bytes; seed %d; temperature %g, top-k %d, "
        "top-p %g, min-p %g, repetition penalty %g",
        f"{result.prompt_tokens:,}",
        name,
        result.elapsed_s,
        f"{rate:,.0f}",
        f"{result.saved.state.nbytes():,}",
        seed,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
    )
    if save_state is not None:
        write_state(save_state, result.saved, config, tokenizer)
        log.info("state after %s tokens saved to %s", f"{result.saved.tokens:,}", save_state)
    try:
        _samples(net, tokenizer, result, opts, num_samples, stream, precision)
    except BrokenPipeError:  # `longctx generate ... | head`: the reader has what it wanted; exit 0 quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        raise typer.Exit(0) from None


def _samples(net: Any, tokenizer: Any, result: Any, opts: Any, num_samples: int, stream: bool, precision: str) -> None:
    """Sample ``num_samples`` continuations of the prompt read into ``result``; text to stdout, statistics to stderr."""
    from longctx.sampling import sample

    for i in range(num_samples):
        if num_samples > 1:
            log.info("--- sample %d/%d", i + 1, num_samples)
        started = time.perf_counter()
        on_text = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
        out = sample(net, tokenizer, result, opts, sample_index=i, on_text=on_text, precision=precision)
        if not stream:
            sys.stdout.write(out.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        elapsed = time.perf_counter() - started
        log.info(
            "generated %d tokens in %.2f s (%.1f tok/s); stopped by %s",
            len(out.tokens),
            elapsed,
            len(out.tokens) / max(elapsed, 1e-9),
            out.stop_reason,
        )


# --------------------------------------------------------------------------------------------------------------------
# info


@app.command()
def info(checkpoint: Path = typer.Argument(None, help="Checkpoint folder. Default: newest under runs/.")) -> None:
    """Print a checkpoint's config, parameter count, state size and learned quantities."""
    from longctx.checkpoint import load_newest

    setup_logging()
    model, tokenizer, config, path = load_newest(lambda: pick_checkpoint(checkpoint, flag="a CHECKPOINT argument"))
    summary = {
        "checkpoint": str(path),
        "decoder": config.model.decoder,
        "parameters": model.num_parameters(),
        "state_bytes_per_stream": model.init_state(1).nbytes(),
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        **model.decoder.describe(),
        "config": config.to_dict(),
    }
    typer.echo(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------------------------------------------------
# plot


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (each holds a metrics.jsonl)."),
    output: Path = typer.Option(Path("loss.png"), "--output", "-o", help="The PNG to write."),
) -> None:
    """Draw the training and validation loss of one or several runs against tokens seen (matplotlib)."""
    from longctx.run_folder import METRICS_FILE

    setup_logging()
    curves = []
    for run in runs:
        path = run / METRICS_FILE if run.is_dir() else run
        if not path.is_file():
            raise DataError(f"{str(run)!r} holds no {METRICS_FILE}; give run folders written by longctx train")
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            record = loads_json(line, f"{path}:{n}", DataError, what="JSON")
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n} is not a JSON object; the metrics file is damaged")
            records.append(record)
        curves.append((str(run), records))
    check_output(output, "--output")
    require_matplotlib("longctx plot")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, records) in enumerate(curves):
        colour = f"C{i % 10}"
        train_pts = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None and "tokens" in r]
        val_pts = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None and "tokens" in r]
        if train_pts:
            ax.plot(*zip(*train_pts), color=colour, alpha=0.5, linewidth=1, label=f"{name} (train)")
        if val_pts:
            ax.plot(*zip(*val_pts), color=colour, marker="o", linewidth=2, label=f"{name} (validation)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=120)
    except OSError as e:
        raise LongctxError(f"cannot write --output {str(output)!r}: {e.strerror or e}") from None
    log.info("wrote %s (%d run%s)", output, len(curves), "s" * (len(curves) != 1))


# --------------------------------------------------------------------------------------------------------------------
# probe


probe_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(probe_app, name="probe")


def parse_distances(text: str | None, default: tuple[int, ...], flag: str = "--distances") -> tuple[int, ...]:
    """``"64,256,1k"`` -> (64, 256, 1024); one line for anything else."""
    if text is None:
        return default
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        scale = 1024 if item.endswith("k") else 1
        try:
            value = int(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated whole numbers (e.g. 64,256,1k), got {item!r}") from None
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
        values.append(value)
    if not values:
        raise ConfigError(f"{flag} is empty; give e.g. 64,256,1024")
    return tuple(sorted(set(values)))


def probe_filler(files: list[str] | None, config: Config | None, strip: str = "") -> Any:
    """The filler: ``files``, or the checkpoint's held-out documents, or (if those are gone) the bundled corpus."""
    from longctx.data import bundled_documents, discover, split_documents
    from longctx.probe import load_filler

    if files:
        return load_filler(discover(list(files)), strip)
    if config is not None:
        try:
            _, held_out = split_documents(discover(config.data.paths), config.data.val_docs)
        except DataError:
            held_out = []
        if held_out:
            log.info("filler: the %d held-out documents of the checkpoint's training data", len(held_out))
            return load_filler(held_out, strip)
    if config is not None:
        log.info("filler: the bundled corpus (the checkpoint's held-out documents are not available)")
    return load_filler(bundled_documents(), strip)


def recall_spec_for(folder: Path) -> Any:
    from longctx.probe import RECALL_SPEC, RecallSpec

    for where in (folder / RECALL_SPEC, folder.parent / RECALL_SPEC):
        if where.is_file():
            return RecallSpec.from_json(where.read_text(encoding="utf-8"), str(where))
    raise DataError(
        f"no {RECALL_SPEC} in {str(folder)!r} or its parent; give the test/ folder that `longctx probe make-data` wrote"
    )


@probe_app.callback(invoke_without_command=True)
def probe(
    ctx: typer.Context,
    task: str = typer.Option(
        "copy",
        "--task",
        help="copy (zero-shot), context (zero-shot) or recall (needs training on `longctx probe make-data` data).",
    ),
    model: Path = typer.Option(None, "--model", "-m", help="Checkpoint folder. Default: newest under runs/."),
    distances: str = typer.Option(
        None,
        "--distances",
        help="Comma list. copy: bytes between the two occurrences "
        "(64,256,1024,4096,16384); context: tokens of context kept (32,64,...,16384); "
        "recall: the distances of the test data.",
    ),
    span: int = typer.Option(64, "--span", min=4, help="copy: bytes of the planted passage."),
    content: str = typer.Option(
        "text", "--content", help="copy: text (a passage from elsewhere in the filler) or random (letters and digits)."
    ),
    trials: int = typer.Option(32, "--trials", min=2, help="copy: trials per distance."),
    tokens: int = typer.Option(16384, "--tokens", min=256, help="context: tokens scored (the same at every d)."),
    filler: list[str] = typer.Option(
        None,
        "--filler",
        help="copy, context: text files or folders. Default: the "
        "checkpoint's held-out documents, else the bundled corpus.",
    ),
    data: Path = typer.Option(None, "--data", help="recall: the test/ folder written by `longctx probe make-data`."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per forward call. Default: training seq_len."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file."),
    plot_file: Path = typer.Option(None, "--plot", help="Draw the result against distance (PNG; needs matplotlib)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0),
    progress: bool = typer.Option(None, "--progress/--no-progress"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """How far back does a model read? Scores by distance: copy, context or recall."""
    if ctx.invoked_subcommand is not None:
        return
    import torch

    from longctx.probe import (
        DEFAULT_CONTEXT_DISTANCES,
        DEFAULT_COPY_DISTANCES,
        ProbeOptions,
        document_stream,
        format_probe,
        plot_probe,
        score_context,
        score_copy,
        score_recall,
    )

    setup_logging(quiet)
    if task not in ("copy", "context", "recall"):
        raise ConfigError(f"--task must be copy, context or recall, got {task!r}")
    if content not in ("text", "random"):
        raise ConfigError(f"--content must be text or random, got {content!r}")
    check_options({"seq_len": seq_len, "precision": precision}, ProbeOptions.RULES)
    if task == "recall" and data is None:
        raise ConfigError("--task recall needs --data DIR/test (make it with `longctx probe make-data`)")
    if task != "recall" and data is not None:
        raise ConfigError("--data is the recall task's test folder; copy and context read --filler")
    ladder = parse_distances(distances, DEFAULT_COPY_DISTANCES if task == "copy" else DEFAULT_CONTEXT_DISTANCES)
    spec = recall_spec_for(data) if task == "recall" else None
    if data is not None and not data.is_dir():
        raise DataError(f"--data {str(data)!r} is not a folder; give the test/ folder of `longctx probe make-data`")
    check_output(output, "--output")
    check_output(plot_file, "--plot")
    if plot_file is not None:
        require_matplotlib("--plot")
    net, tokenizer, config, dev, path = load_for_inference(model, device, threads)
    opts = ProbeOptions(
        seq_len=seq_len or config.train.seq_len,
        precision=precision,  # type: ignore[arg-type]
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    net.eval()
    with torch.inference_mode():
        if task == "copy":
            result = score_copy(net, tokenizer, probe_filler(filler, config), ladder, span, trials, content, seed, opts)  # type: ignore[arg-type]
        elif task == "context":
            fill = probe_filler(filler, config)
            streams = [document_stream(tokenizer, t) for t in fill.texts]
            result = score_context(net, tokenizer, streams, ladder, tokens, opts)
        else:
            assert spec is not None and data is not None
            if distances is not None:
                spec.distances = ladder
            texts = [p.read_bytes() for p in sorted(data.glob("*.txt"))]
            if not texts:
                raise DataError(
                    f"--data {str(data)!r} holds no .txt files; give the test/ folder of `longctx probe make-data`"
                )
            result = score_recall(net, tokenizer, texts, spec, opts)
    from longctx import __version__

    result.settings.update(
        checkpoint=str(path),
        decoder=config.model.decoder,
        preset=config.preset,
        seq_len=opts.seq_len,
        precision=precision,
        device=str(dev),
        longctx_version=__version__,
    )
    report = result.to_dict()
    if output is not None:
        try:
            output.write_text(json.dumps(report, indent=2))
        except OSError as e:
            raise LongctxError(f"cannot write --output {str(output)!r}: {e.strerror or e}") from None
    if plot_file is not None:
        plot_probe([report], plot_file)
        log.info("wrote %s", plot_file)
    typer.echo(json.dumps(report) if json_out else format_probe(report))


def require_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs matplotlib: pip install 'longctx[plot]' (or pip install matplotlib)") from None


@probe_app.command("make-data")
def probe_make_data(
    out: Path = typer.Option(..., "--out", help="Folder to create: train/, test/ and recall.json."),
    task: str = typer.Option("recall", "--task", help="recall (the only task that needs training data)."),
    docs: int = typer.Option(2000, "--docs", min=1, help="Training documents."),
    queries: int = typer.Option(200, "--queries", min=1, help="Test questions per distance."),
    distances: str = typer.Option(None, "--distances", help="Test distances in bytes (16,64,256,1024,4096)."),
    filler: list[str] = typer.Option(None, "--filler", help="Text files or folders. Default: the bundled corpus."),
    event_every: int = typer.Option(16, "--event-every", help="Training: bytes of document per fact or question."),
    list_share: float = typer.Option(
        0.5, "--list-share", help="Training: share of documents that are lists of facts and questions, no filler."
    ),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write training and test data for --task recall: `longctx train --data OUT/train`, then
    `longctx probe --task recall --data OUT/test`."""
    from longctx.probe import DEFAULT_RECALL_DISTANCES, RECALL_KEYS, RecallSpec, write_recall_data

    setup_logging(quiet)
    if task != "recall":
        raise ConfigError(f"make-data writes data for --task recall only (copy and context need none), got {task!r}")
    spec = RecallSpec(
        distances=parse_distances(distances, DEFAULT_RECALL_DISTANCES), event_every=event_every, list_share=list_share
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder; give a new folder")
    fill = probe_filler(filler, None, strip=RECALL_KEYS)
    if fill.longest < max(spec.distances) + 1024:
        raise DataError(
            f"test distances up to {max(spec.distances):,} bytes need a filler document of "
            f"{max(spec.distances) + 1024:,} bytes; the longest has {fill.longest:,}"
        )
    try:
        summary = write_recall_data(out, fill, spec, docs, queries, seed)
    except OSError as e:
        raise LongctxError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None
    log.info(
        "wrote %s: %d training documents (%s bytes), %d test documents (%d questions per distance)",
        out,
        summary["train_docs"],
        f"{summary['train_bytes']:,}",
        summary["test_docs"],
        queries,
    )
    log.info("next: longctx train --data %s ... ; longctx probe --task recall --data %s", out / "train", out / "test")


# --------------------------------------------------------------------------------------------------------------------
# presets, version


@app.command()
def presets() -> None:
    """List the bundled presets: decoder, parameters and memory per stream, one line each."""
    import torch

    from longctx.config import list_presets
    from longctx.model import build_model

    setup_logging()
    rows = []
    for name in list_presets():
        config = load_config(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = build_model(config.model)
        state = model.init_state(1, device="meta").nbytes()
        default = " (default)" if name == DEFAULT_PRESET else ""
        rows.append(
            (name + default, config.model.decoder, f"{model.num_parameters() / 1e6:.2f} M", f"{state / 1e6:.2f} MB")
        )
    widths = [
        max(len(r[i]) for r in rows + [("preset", "decoder", "parameters", "state per stream")]) for i in range(4)
    ]
    for row in [("preset", "decoder", "parameters", "state per stream"), *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _version(value: bool) -> None:
    if value:
        from longctx import __version__

        typer.echo(f"longctx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, evaluate and sample long-context language models with bounded memory."""


# --------------------------------------------------------------------------------------------------------------------
# entry point


def normalize_argv(argv: list[str]) -> list[str]:
    """``--out_dir`` -> ``--out-dir``; ``--data a b c`` (e.g. a shell glob) -> ``--data a --data b --data c``."""
    out: list[str] = []
    in_data = False
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("---"):
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
            in_data = arg in DATA_FLAGS
            out.append(arg)
        elif in_data and out[-1] not in DATA_FLAGS and not arg.startswith("-"):
            out.extend(["--data", arg])
        else:
            if arg.startswith("-"):
                in_data = False
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="longctx", standalone_mode=False)
        if code == 130:  # typer turns a Ctrl-C into this return code, silently
            print("interrupted", file=sys.stderr)
        sys.exit(code if isinstance(code, int) else 0)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `longctx`: the help, not an error line
            e.show()
            sys.exit(2)
        if debug:
            raise
        where = (
            f"longctx {e.ctx.info_name} --help" if e.ctx is not None and e.ctx.parent is not None else "longctx --help"
        )
        print(f"error: {e.format_message()} (see {where})", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C inside a prompt or a click callback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except LongctxError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if e.exit_code in (130, 143):  # stopped by a signal, checkpoint written: one more Ctrl-C must not break the
            for sig in (signal.SIGINT, signal.SIGTERM):  # interpreter's teardown into a traceback
                signal.signal(sig, signal.SIG_IGN)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `longctx generate ... | head`
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:  # a path given longer than the system allows: any look at it fails, wherever it is made
        if debug or e.errno != errno.ENAMETOOLONG:
            raise
        name = str(e.filename)
        short = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]}"
        print(f"error: the path {short!r} is longer than this system allows; give a shorter one", file=sys.stderr)
        sys.exit(2)
