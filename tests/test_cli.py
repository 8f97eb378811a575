"""End-to-end tests of the ``longctx`` command line: train, eval, generate, info, and one-line user errors.

One tiny checkpoint is trained once per module (as a real subprocess, so the exit code and the streams are the real
ones) and reused everywhere. Most other commands run in-process through ``longctx.cli.main`` (much faster than a
Python start-up with torch); a subprocess is used where the behaviour is about the process itself: exit codes,
tracebacks, ``python -m longctx``, stdin.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longctx.checkpoint import find_checkpoints, load_checkpoint
from longctx.cli import main
from longctx.data import bundled_documents
from longctx.decoders import DECODERS
from longctx.model import READ_SEGMENT

# The tiny model of tests/test_train.py: 1 layer, width 32, about 17 k parameters; 3 steps take well under a second.
# The command-line tests run the transformer baseline (the fastest decoder); the default preset has its own tests.
PRESET = "transformer-small"  # the run folder is runs/transformer-small
TINY_MODEL = [
    "--preset",
    PRESET,
    "--set",
    "model.n_layer=1",
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.d_ff=64",
    "--set",
    "model.transformer.window=16",
]
TINY = [*TINY_MODEL, "--seq-len", "16", "--batch-size", "4", "--threads", "1", "--no-progress"]
EVAL_KEYS = {
    "tokens",
    "bytes",
    "loss",
    "ppl",
    "ppl_stderr",
    "bits_per_byte",
    "byte_perplexity",
    "state_bytes",
    "peak_rss_bytes",
}


# --------------------------------------------------------------------------------------------------------------------
# running the command line


@dataclass
class Result:
    code: int
    out: str
    err: str


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LONGCTX_CACHE": str(root / "cache"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def run_subprocess(cwd: Path, *args: str | Path, stdin: bytes | None = None) -> Result:
    """``python -m longctx ARGS`` in ``cwd`` with its own token cache and one thread."""
    proc = subprocess.run(
        [sys.executable, "-m", "longctx", *map(str, args)],
        cwd=cwd,
        env=_env(cwd),
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


@contextlib.contextmanager
def _process_state(cwd: Path, stdin: bytes) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What a fresh process would have: cwd, stdin/stdout/stderr, the LONGCTX_CACHE variable; all restored after,
    with the ``longctx`` logger (the CLI points it at the current stderr) and torch's thread count."""
    saved_cwd, saved_env = os.getcwd(), os.environ.get("LONGCTX_CACHE")
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    logger = logging.getLogger("longctx")
    saved_logger = list(logger.handlers), logger.level, logger.propagate
    saved_threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    os.environ["LONGCTX_CACHE"] = str(cwd / "cache")
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        logger.handlers[:], logger.level, logger.propagate = saved_logger
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        if saved_env is None:
            os.environ.pop("LONGCTX_CACHE", None)
        else:
            os.environ["LONGCTX_CACHE"] = saved_env


def run_inprocess(cwd: Path, *args: str | Path, stdin: bytes = b"") -> Result:
    """``longctx.cli.main(ARGS)`` as if it were a process started in ``cwd``; an uncaught exception propagates."""
    with _process_state(cwd, stdin) as (out, err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def assert_user_error(res: Result, *fragments: str) -> str:
    """A user mistake: non-zero exit, exactly one line on stderr starting with ``error:``, no traceback."""
    assert res.code != 0, res
    assert "Traceback" not in res.err + res.out, res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: "), res.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# the shared workspace: data files and one trained checkpoint


@dataclass
class Workspace:
    root: Path  # the current directory of every command; holds data/, runs/ and the token cache
    data: Path  # three training documents of 6000 bytes
    eval_file: Path  # 1200 bytes of another play
    prompt_file: Path
    run_dir: Path  # runs/transformer-small
    ckpt: Path  # runs/transformer-small/step-00000003
    train: Result  # what `longctx train` printed


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    docs = bundled_documents()
    for doc in docs[:3]:
        with doc.open() as f:
            (data / doc.name.split("/")[-1]).write_bytes(f.read()[:6000])
    with docs[3].open() as f:
        text = f.read()[20000:21200]
    eval_file = root / "eval.txt"
    eval_file.write_bytes(text)
    prompt_file = root / "prompt.txt"
    prompt_file.write_bytes(text[:100])
    # a high learning rate without warm-up, so that 3 steps visibly train (the result is still an almost
    # context-free model: tests whose outputs must depend on the context use sharp_ckpt)
    res = run_subprocess(
        root,
        "train",
        "--data",
        "data",
        *TINY,
        "--max-steps",
        "3",
        "--log-interval",
        "1",
        "--lr",
        "0.03",
        "--warmup-steps",
        "0",
    )
    assert res.code == 0, res.err
    run_dir = root / "runs" / PRESET
    return Workspace(root, data, eval_file, prompt_file, run_dir, run_dir / "step-00000003", res)


@pytest.fixture
def cli(ws: Workspace) -> Callable[..., Result]:
    """In-process ``longctx ARGS`` in the workspace."""
    return lambda *args, stdin=b"": run_inprocess(ws.root, *args, stdin=stdin)


@pytest.fixture(scope="module")
def bpe_ckpt(ws: Workspace) -> Path:
    """A second, different checkpoint: BPE tokenizer of 300 tokens, trained in-process."""
    out = ws.root / "bpe-run"
    res = run_inprocess(
        ws.root,
        "train",
        "--data",
        "data",
        *TINY,
        "--max-steps",
        "2",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        "--out-dir",
        out,
    )
    assert res.code == 0, res.err
    return find_checkpoints(out)[-1]


def copy_ckpt(ws: Workspace, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ws.ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def sharp_ckpt(ws: Workspace) -> Path:
    """The checkpoint with its matrices redrawn large (std 0.3): logits far from uniform and strongly dependent on
    the context, so that greedy outputs tell states apart (3 training steps give an almost context-free model)."""
    dst = ws.root / "sharp"
    shutil.copytree(ws.ckpt, dst)
    weights = dst / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if t.dim() > 1:
            tensors[name] = torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.3
    save_file(tensors, str(weights), metadata=metadata)
    return dst


# --------------------------------------------------------------------------------------------------------------------
# help


@pytest.mark.slow
def test_python_m_longctx_help(tmp_path: Path) -> None:
    res = run_subprocess(tmp_path, "--help")
    assert res.code == 0, res.err
    for command in ("train", "eval", "generate", "info"):
        assert command in res.out
    assert "Traceback" not in res.err


def test_train_help_lists_the_flags(cli: Callable[..., Result]) -> None:
    res = cli("train", "--help")
    assert res.code == 0, res.err
    for flag in (
        "--data",
        "--preset",
        "--set",
        "--out-dir",
        "--resume",
        "--init-from",
        "--overwrite",
        "--print-config",
        "--max-steps",
        "--seq-len",
        "--batch-size",
        "--tokenizer",
        "--vocab-size",
    ):
        assert flag in res.out, flag


def test_max_time_help_says_what_it_bounds(tmp_path: Path) -> None:
    """--max-time is the training loop's budget; the final validation and checkpoint come on top."""
    res = run_inprocess(tmp_path, "train", "--help")
    assert res.code == 0, res.err
    max_time = " ".join(res.out.split("--max-time", 1)[1].split("--", 1)[0].replace("│", " ").split())
    assert "training loop" in max_time and "come on top" in max_time, max_time


def test_subcommand_help_for_eval_generate_info(cli: Callable[..., Result]) -> None:
    for command, flag in (("eval", "--per-position"), ("generate", "--save-state"), ("info", "checkpoint")):
        res = cli(command, "--help")
        assert res.code == 0 and flag in res.out, (command, res)


# --------------------------------------------------------------------------------------------------------------------
# train


def test_train_writes_checkpoint_metrics_and_run_config(ws: Workspace) -> None:
    assert ws.train.code == 0
    assert [p.name for p in find_checkpoints(ws.run_dir)] == ["step-00000003"]
    files = {p.name for p in ws.ckpt.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.safetensors",
        "trainer_state.json",
    } <= files
    assert not list(ws.run_dir.glob(".tmp-*"))
    records = [json.loads(line) for line in (ws.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]  # --log-interval 1
    assert all(math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 4 * 16 for r in losses)
    run_config = json.loads((ws.run_dir / "config.json").read_text())
    assert run_config["train"]["max_steps"] == 3 and run_config["train"]["seq_len"] == 16
    assert run_config["model"]["d_model"] == 32 and run_config["model"]["transformer"]["window"] == 16
    assert run_config["data"]["paths"] == [str(ws.data)]  # stored absolute: the run can be evaluated from anywhere
    assert json.loads((ws.ckpt / "config.json").read_text())["model"] == run_config["model"]
    assert json.loads((ws.ckpt / "trainer_state.json").read_text())["step"] == 3


def test_train_echoes_each_override_once_on_stderr(ws: Workspace) -> None:
    err = ws.train.err
    for line in (
        "override: train.max_steps = 3",
        "override: train.seq_len = 16",
        "override: model.d_model = 32",
        "override: model.transformer.window = 16",
        'override: data.paths = ["data"]',
    ):
        assert err.count(line) == 1, (line, err)
    assert "Traceback" not in err and "error" not in err
    assert ws.train.out == ""  # stdout stays clean: everything is on stderr
    assert "checkpoint: runs/transformer-small/step-00000003" in err


def test_print_config_prints_json_and_does_not_train(cli: Callable[..., Result], tmp_path: Path) -> None:
    out_dir = tmp_path / "never"
    res = cli("train", "--print-config", *TINY, "--set", "train.lr=0.002", "--out-dir", out_dir)
    assert res.code == 0, res.err
    config = json.loads(res.out)
    assert config["train"]["lr"] == 0.002 and config["model"]["n_layer"] == 1
    assert config["train"]["micro_batch_size"] == 0  # --batch-size alone: no accumulation
    assert set(config) >= {"model", "data", "train"}
    assert not out_dir.exists()
    # what --print-config prints, --preset reads back
    saved = tmp_path / "mine.json"
    saved.write_text(res.out)
    again = cli("train", "--print-config", "--preset", saved, "--out-dir", out_dir)
    assert again.code == 0, again.err
    assert json.loads(again.out) | {"preset": None} == config | {"preset": None}


def test_ctrl_c_in_eval_reports_and_writes_the_partial_result(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path, monkeypatch
) -> None:
    import longctx.model as model_module

    real, calls = model_module.LongContextLM.forward, []

    def interrupted_forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.LongContextLM, "forward", interrupted_forward)
    out = tmp_path / "partial.json"
    res = cli("eval", ws.eval_file, "--model", ws.ckpt, "--seq-len", "16", "-o", out, "-q")
    assert res.code == 130, res.err
    assert "interrupted" in res.err and "partial" in res.err and "PARTIAL" in res.out
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and saved["tokens"] == 3 * 16  # three segments were scored
    assert saved["bits_per_byte"] > 0


def test_ctrl_c_in_generate_says_so(cli: Callable[..., Result], ws: Workspace, monkeypatch) -> None:
    import longctx.model as model_module

    def interrupted_forward(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module.LongContextLM, "forward", interrupted_forward)
    res = cli("generate", "--model", ws.ckpt, "--prompt", "Hello", "-n", "5", "-q")
    assert res.code == 130 and "interrupted" in res.err and "Traceback" not in res.err, res.err


def test_version_presets_and_a_fast_help(tmp_path: Path) -> None:
    """`--version` and `--help` answer without importing torch (well under a second); `presets` lists every preset."""
    from longctx import __version__
    from longctx.config import list_presets

    started = time.perf_counter()
    res = run_subprocess(tmp_path, "--version")
    assert res.code == 0 and res.out.strip() == f"longctx {__version__}"
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, longctx.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False", probe
    assert time.perf_counter() - started < 30  # generous: two interpreters on a loaded machine
    res = run_subprocess(tmp_path, "presets")
    assert res.code == 0, res.err
    lines = res.out.strip().splitlines()
    assert lines[0].split()[:2] == ["preset", "decoder"] and len(lines) == 1 + len(list_presets())
    assert any(line.startswith("infinite-small (default)") and " M " in line for line in lines)


def test_eval_json_says_what_was_evaluated_and_logs_progress(
    cli: Callable[..., Result], ws: Workspace, monkeypatch
) -> None:
    import longctx.cli as cli_module

    monkeypatch.setattr(cli_module, "EVAL_LOG_INTERVAL_S", 1e-9)  # a progress line after every segment
    res = cli(
        "eval", ws.eval_file, "--model", ws.ckpt, "--max-tokens", "64", "--seq-len", "16", "--json", "--no-progress"
    )
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["decoder"] == "transformer" and result["tokenizer"] == "byte" and result["device"] == "cpu"
    assert result["longctx_version"] and result["precision"] == "fp32" and result["preset"] == PRESET
    progress = [line for line in res.err.splitlines() if line.startswith("eval: ")]
    assert len(progress) == 4 and "running ppl" in progress[-1] and "64 tokens" in progress[-1]


def test_generate_into_a_closed_pipe_exits_0_quietly(ws: Workspace) -> None:
    """`longctx generate ... | head -c 10`: the reader leaves early; exit 0 and no error, as `head`'s users expect."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longctx",
            "generate",
            "--model",
            str(ws.ckpt),
            "-n",
            "20000",
            "--ignore-eos",
            "--prompt",
            "Hello",
            "--seed",
            "1",
            "-q",
        ],
        cwd=ws.root,
        env=_env(ws.root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert b"Error" not in err and b"Traceback" not in err, err


def test_plot_draws_runs_or_says_what_is_missing(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path, monkeypatch
) -> None:
    assert_user_error(cli("plot", tmp_path), "metrics.jsonl")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_user_error(cli("plot", ws.run_dir), "matplotlib")
        return
    res = cli("plot", ws.run_dir, ws.run_dir, "-o", tmp_path / "plots" / "loss.png")
    assert res.code == 0, res.err
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert_user_error(cli("plot", ws.run_dir, "-o", tmp_path / "again.png"), "pip install")


def test_small_user_facing_rules(cli: Callable[..., Result], ws: Workspace, tmp_path: Path) -> None:
    """--ppl shows no meaningless default; -c/--stride are refused in carry mode; `info` names its argument;
    -m RUN_FOLDER names the step it used; model.safetensors has the permissions of the other checkpoint files."""
    help_text = cli("eval", "--help").out
    ppl_line = next(line for line in help_text.splitlines() if "--ppl" in line)
    assert "default" not in ppl_line
    assert_user_error(cli("eval", ws.eval_file, "--model", ws.ckpt, "-c", "64", "-q"), "--mode sliding")
    assert_user_error(cli("eval", ws.eval_file, "--model", ws.ckpt, "--stride", "8", "-q"), "--mode sliding")
    assert_user_error(run_inprocess(tmp_path, "info"), "CHECKPOINT argument")
    res = cli("eval", ws.eval_file, "--model", ws.run_dir, "--max-tokens", "20")
    assert res.code == 0 and str(ws.ckpt.name) in res.err, res.err
    modes = {f.name: f.stat().st_mode & 0o777 for f in ws.ckpt.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_train_without_a_preset_trains_the_infinite_former_end_to_end(ws: Workspace, tmp_path: Path) -> None:
    """No --preset: infinite-small (the ∞-former). A tiny version of it trains, evaluates and generates, with the
    run folder, the newest-checkpoint lookup and the prompt file all left to their defaults."""
    res = run_inprocess(tmp_path, "train", "--print-config")
    assert res.code == 0, res.err
    config = json.loads(res.out)
    assert config["preset"] == "infinite-small" and config["model"]["decoder"] == "infinite"
    tiny_ltm = [
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.d_ff=64",
        "model.infinite.mem_len=8",
        "model.infinite.ltm_block=8",
        "model.infinite.n_basis=16",
        "model.infinite.n_samples=16",
    ]
    res = run_inprocess(
        tmp_path,
        "train",
        "--data",
        ws.data,
        *(a for kv in tiny_ltm for a in ("--set", kv)),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--max-steps",
        "2",
    )
    assert res.code == 0, res.err
    assert (tmp_path / "runs" / "infinite-small" / "step-00000002" / "model.safetensors").is_file()
    res = run_inprocess(tmp_path, "eval", "--ppl", ws.eval_file, "--json")  # 1200 bytes: several LTM refits
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert "infinite-small" in report["checkpoint"] and report["tokens"] == 1200
    assert math.isfinite(report["loss"])
    res = run_inprocess(tmp_path, "generate", "--prompt-file", ws.prompt_file, "-n", "20", "--seed", "1")
    assert res.code == 0, res.err
    assert "generated 20 tokens" in res.err


def _set_flags(table: dict, prefix: str = "model.") -> list[str]:
    """``--set`` flags for a nested dict of config values (strings bare, numbers and lists in TOML syntax)."""
    flags = []
    for key, value in table.items():
        if isinstance(value, dict):
            flags += _set_flags(value, f"{prefix}{key}.")
        else:
            flags += ["--set", f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return flags


@pytest.mark.parametrize("case", [*sorted(DECODERS), "xl+previous_token_embedding"])
def test_every_decoder_trains_evaluates_and_generates_through_the_cli(case: str, ws: Workspace, tmp_path: Path) -> None:
    """The tiny config of the contract tests (tests/conftest.py), through train, eval --ppl and generate; and one
    decoder with the model's previous-token embedding, whose state is the decoder's plus the token before."""
    decoder, _, option = case.partition("+")
    model = {k: v for k, v in TINY_BASE.items() if k != "vocab_size"} | DECODERS[decoder].TINY
    if option:
        model[option] = True
    res = run_inprocess(
        tmp_path,
        "train",
        "--preset",
        PRESET,
        "--set",
        f"model.decoder={decoder}",
        *_set_flags(model),
        "--data",
        ws.data,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--max-steps",
        "2",
        "--out-dir",
        "run",
    )
    assert res.code == 0, res.err
    assert f"model: {decoder} decoder" in res.err
    res = run_inprocess(tmp_path, "eval", "--ppl", ws.eval_file, "--model", "run/step-00000002", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["tokens"] == 1200 and math.isfinite(report["loss"]) and report["state_bytes"] > 0
    res = run_inprocess(
        tmp_path,
        "generate",
        "--model",
        "run/step-00000002",
        "--prompt-file",
        ws.prompt_file,
        "-n",
        "12",
        "--seed",
        "1",
        "--ignore-eos",
    )
    assert res.code == 0, res.err
    assert "generated 12 tokens" in res.err
    if option:  # the state after a prompt, saved and read back, continues the same way
        args = ("generate", "--model", "run/step-00000002", "-n", "8", "--seed", "1", "--ignore-eos", "--temp", "0")
        once = run_inprocess(tmp_path, *args, "--prompt", "To be or not to be, that is")
        saved = run_inprocess(tmp_path, *args, "--prompt", "To be or not to be, that is", "--save-state", "s.st")
        again = run_inprocess(tmp_path, *args, "--load-state", "s.st")
        assert once.code == saved.code == again.code == 0, again.err
        assert once.out == saved.out == again.out


def test_underscore_alias_and_several_data_paths_after_one_flag(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path
) -> None:
    a, b = sorted(ws.data.iterdir())[:2]
    out_dir = tmp_path / "run"
    res = cli("train", "--data", a, b, *TINY, "--max_steps", "1", "--out_dir", out_dir)
    assert res.code == 0, res.err
    assert [p.name for p in find_checkpoints(out_dir)] == ["step-00000001"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["data"]["paths"] == [str(a), str(b)]
    assert config["train"]["max_steps"] == 1
    assert not (ws.root / "runs" / "run").exists()


def test_resume_auto_continues_the_run(cli: Callable[..., Result], ws: Workspace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ws.run_dir, run)
    res = cli("train", "--resume", "auto", "--out-dir", run, "--max-steps", "5", "--threads", "1", "--no-progress")
    assert res.code == 0, res.err
    assert "resumed from" in res.err and "step 3" in res.err
    assert find_checkpoints(run)[-1].name == "step-00000005"
    assert json.loads((find_checkpoints(run)[-1] / "trainer_state.json").read_text())["step"] == 5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps == sorted(steps)
    # the model came from the checkpoint, not from the default preset
    assert json.loads((run / "config.json").read_text())["model"]["d_model"] == 32


def test_second_train_into_a_non_empty_out_dir_is_refused(cli: Callable[..., Result], ws: Workspace) -> None:
    weights = ws.ckpt / "model.safetensors"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns, sorted(p.name for p in ws.run_dir.iterdir()))
    res = cli("train", "--data", "data", *TINY, "--max-steps", "1", "-q")  # default --out-dir: the fixture's run
    assert_user_error(res, "not empty", "--resume auto", "--overwrite")
    after = (weights.read_bytes(), weights.stat().st_mtime_ns, sorted(p.name for p in ws.run_dir.iterdir()))
    assert after == before


def test_bpe_tokenizer_is_trained_saved_and_used_by_eval(
    cli: Callable[..., Result], ws: Workspace, bpe_ckpt: Path
) -> None:
    tok = json.loads((bpe_ckpt / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["model"]["merges"]
    config = json.loads((bpe_ckpt / "config.json").read_text())
    assert config["data"]["tokenizer"] == "bpe" and 257 < config["model"]["vocab_size"] <= 300
    res = cli("eval", ws.eval_file, "--model", bpe_ckpt, "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["bytes"] == 1200 and 0 < result["tokens"] < 1200  # merges: fewer tokens than bytes
    info = json.loads(cli("info", bpe_ckpt).out)
    assert info["tokenizer"] == "bpe" and info["vocab_size"] == config["model"]["vocab_size"]


# --------------------------------------------------------------------------------------------------------------------
# eval


def test_eval_prints_a_human_report(cli: Callable[..., Result], ws: Workspace) -> None:
    res = cli("eval", "--ppl", ws.eval_file, "--model", ws.ckpt)
    assert res.code == 0, res.err
    assert "Final estimate: PPL" in res.out
    assert str(ws.eval_file) in res.out and f"mode=carry seq_len={READ_SEGMENT}" in res.out  # trained at 16
    assert "Traceback" not in res.err


def test_eval_default_segments_give_the_training_length_result(
    cli: Callable[..., Result], ws: Workspace, eval_json: dict
) -> None:
    """Carry mode reads in segments of at least READ_SEGMENT tokens by default (speed only): the scores equal those
    read in segments of the training length (16 here), within the float32 rounding that the chunking-invariance
    contract allows (logits within 1e-4; the mean loss over 1,200 tokens moves far less)."""
    assert eval_json["seq_len"] == READ_SEGMENT
    res = cli("eval", ws.eval_file, "--model", ws.ckpt, "--seq-len", "16", "--json")
    assert res.code == 0, res.err
    short = json.loads(res.out)
    assert short["seq_len"] == 16 and short["tokens"] == eval_json["tokens"]
    assert short["loss"] == pytest.approx(eval_json["loss"], abs=1e-5)


def test_eval_json_output_file_and_per_position_csv(cli: Callable[..., Result], ws: Workspace, tmp_path: Path) -> None:
    out_json, csv_file = tmp_path / "sub" / "r.json", tmp_path / "p.csv"
    res = cli(
        "eval", "--ppl", ws.eval_file, "--model", ws.ckpt, "--json", "--output", out_json, "--per-position", csv_file
    )
    assert res.code == 0, res.err
    lines = res.out.strip().splitlines()
    assert len(lines) == 1  # one JSON object on one line
    result = json.loads(lines[0])
    assert EVAL_KEYS <= set(result)
    assert result["tokens"] == result["bytes"] == 1200  # byte tokenizer: one token per byte, all scored
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert result["byte_perplexity"] == pytest.approx(result["ppl"])
    assert result["state_bytes"] > 0 and result["peak_rss_bytes"] > 0 and result["ppl_stderr"] > 0
    assert result["checkpoint"] == str(ws.ckpt)
    assert json.loads(out_json.read_text()) == result
    rows = csv_file.read_text().splitlines()
    assert rows[0] == "start,end,mean_nll,count"
    assert sum(int(r.split(",")[3]) for r in rows[1:]) == 1200
    assert [int(r.split(",")[0]) for r in rows[1:4]] == [1, 2, 4]


@pytest.fixture(scope="module")
def eval_json(ws: Workspace) -> dict:
    """The carry-mode result for the eval file, with --model."""
    res = run_inprocess(ws.root, "eval", ws.eval_file, "--model", ws.ckpt, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)


@pytest.mark.slow
def test_eval_reads_stdin(ws: Workspace, eval_json: dict) -> None:
    res = run_subprocess(
        ws.root, "eval", "-", "--model", ws.ckpt, "--json", "--threads", "1", stdin=ws.eval_file.read_bytes()
    )
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["files"][0]["name"] == "<stdin>"
    assert result["tokens"] == result["bytes"] == 1200
    assert result["loss"] == pytest.approx(eval_json["loss"], rel=1e-6)


def test_eval_without_model_uses_the_most_recent_checkpoint(
    cli: Callable[..., Result], ws: Workspace, eval_json: dict
) -> None:
    res = cli("eval", ws.eval_file, "--json")
    assert res.code == 0, res.err
    assert "using the most recent checkpoint" in res.err and str(Path("runs") / PRESET / "step-00000003") in res.err
    assert json.loads(res.out)["loss"] == pytest.approx(eval_json["loss"], rel=1e-6)


def test_eval_peak_rss_is_its_own_not_its_parents(ws: Workspace) -> None:
    """A parent holding 1 GiB starts `longctx eval`: the reported peak RSS is the child's (ru_maxrss would count the
    parent's pages at the fork, and a benchmark that trained models before starting evals reported gigabytes)."""
    ballast = b"\x01" * (1 << 30)  # 1 GiB, every page touched
    res = run_subprocess(ws.root, "eval", "--ppl", ws.eval_file, "--model", ws.ckpt, "--json")
    assert res.code == 0, res.err
    peak = json.loads(res.out)["peak_rss_bytes"]
    assert len(ballast) == 1 << 30
    assert 0 < peak < 768 * 2**20  # the tiny model's eval needs a few hundred MiB (torch alone ~200)


def test_eval_json_names_the_automatically_picked_checkpoint(cli: Callable[..., Result], ws: Workspace) -> None:
    res = cli("eval", ws.eval_file, "--json", "--max-tokens", "50")
    assert res.code == 0, res.err
    assert json.loads(res.out)["checkpoint"] == str(Path("runs") / PRESET / "step-00000003")


def test_eval_sliding_mode(cli: Callable[..., Result], ws: Workspace, eval_json: dict) -> None:
    res = cli(
        "eval", ws.eval_file, "--model", ws.ckpt, "--mode", "sliding", "--window", "16", "--stride", "8", "--json"
    )
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["mode"] == "sliding" and result["window"] == 16 and result["stride"] == 8
    assert result["tokens"] == 1200 and math.isfinite(result["loss"])
    # a window of 16 tokens sees no more than the model's attention window (16): about the same loss as carry
    assert result["loss"] == pytest.approx(eval_json["loss"], rel=0.05)


# --------------------------------------------------------------------------------------------------------------------
# generate


def generate(
    cli: Callable[..., Result], ws: Workspace, *args: str | Path, stdin: bytes = b"", model: Path | None = None
) -> Result:
    res = cli("generate", "--model", model or ws.ckpt, *args, stdin=stdin)
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    return res


def test_generate_with_a_seed_is_reproducible_and_keeps_stats_on_stderr(
    cli: Callable[..., Result], ws: Workspace
) -> None:
    first = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "20", "--seed", "3")
    again = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "20", "--seed", "3")
    assert first.out == again.out
    assert first.out.endswith("\n") and len(first.out) > 1
    assert "prompt: 100 tokens" in first.err and "seed 3" in first.err and "generated" in first.err
    assert "tok/s" not in first.out and "seed" not in first.out
    other = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "20", "--seed", "4")
    assert other.out != first.out


def test_generate_greedy_is_deterministic_and_reads_stdin(
    cli: Callable[..., Result], ws: Workspace, sharp_ckpt: Path
) -> None:
    greedy = ("-n", "20", "--temperature", "0")
    first = generate(cli, ws, "--prompt-file", ws.prompt_file, *greedy, "--seed", "1", model=sharp_ckpt)
    assert generate(cli, ws, "--prompt-file", ws.prompt_file, *greedy, "--seed", "2", model=sharp_ckpt).out == first.out
    piped = generate(cli, ws, "--prompt-file", "-", *greedy, stdin=ws.prompt_file.read_bytes(), model=sharp_ckpt)
    assert piped.out == first.out
    assert "prompt: 100 tokens from <stdin>" in piped.err
    assert generate(cli, ws, "--prompt", "", *greedy, model=sharp_ckpt).out != first.out  # the prompt does matter


def test_generate_reads_the_prompt_in_read_segments(
    cli: Callable[..., Result], ws: Workspace, sharp_ckpt: Path, monkeypatch
) -> None:
    """By default the prompt is read in segments of at least READ_SEGMENT tokens (one call for these 100 tokens; the
    model trained on 16), and the sampled text is the same as with the training length's segments."""
    import longctx.model as model_module

    widths: list[int] = []
    real = model_module.LongContextLM.forward

    def recording(self, tokens, *args, **kwargs):
        widths.append(tokens.shape[1])
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(model_module.LongContextLM, "forward", recording)
    greedy = ("--prompt-file", ws.prompt_file, "-n", "20", "--temperature", "0")
    default = generate(cli, ws, *greedy, model=sharp_ckpt)
    assert max(widths) == 100  # the separator and 99 prompt tokens; the last one is read with the first sample
    widths.clear()
    short = generate(cli, ws, *greedy, "--seq-len", "16", model=sharp_ckpt)
    assert max(widths) == 16 and short.out == default.out


def test_saved_state_continues_like_reading_the_prompt(
    cli: Callable[..., Result], ws: Workspace, sharp_ckpt: Path, tmp_path: Path
) -> None:
    state = tmp_path / "s.safetensors"
    greedy = ("-n", "30", "--temperature", "0")
    full = generate(cli, ws, "--prompt-file", ws.prompt_file, *greedy, "--save-state", state, model=sharp_ckpt)
    assert state.is_file() and "state after 100 tokens saved to" in full.err
    assert generate(cli, ws, "--load-state", state, "--prompt", "", *greedy, model=sharp_ckpt).out == full.out
    assert generate(cli, ws, "--prompt", "", *greedy, model=sharp_ckpt).out != full.out  # the state does matter
    # a state also continues with more prompt: the same as reading both parts in one go
    more = ws.root / "more.txt"
    more.write_bytes(b" and then some more text.")
    both = ws.root / "both.txt"
    both.write_bytes(ws.prompt_file.read_bytes() + more.read_bytes())
    assert (
        generate(cli, ws, "--load-state", state, "--prompt-file", more, *greedy, model=sharp_ckpt).out
        == generate(cli, ws, "--prompt-file", both, *greedy, model=sharp_ckpt).out
    )


def test_num_samples_are_the_samples_of_consecutive_seeds(cli: Callable[..., Result], ws: Workspace) -> None:
    two = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "10", "--seed", "3", "--num-samples", "2")
    s3 = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "10", "--seed", "3")
    s4 = generate(cli, ws, "--prompt-file", ws.prompt_file, "-n", "10", "--seed", "4")
    assert two.out == s3.out + s4.out
    assert "--- sample 1/2" in two.err and "--- sample 2/2" in two.err
    assert two.err.count("generated ") == 2


def test_stop_string_ends_the_sample_before_it(cli: Callable[..., Result], ws: Workspace) -> None:
    args = ("--prompt-file", ws.prompt_file, "-n", "40", "--seed", "5", "--temperature", "1")
    text = generate(cli, ws, *args).out[:-1]
    stop = next((c for c in text[2:] if c.isascii() and c.isalnum()), None)
    assert stop is not None, text  # 40 nearly uniform bytes hold a letter or digit
    stopped = generate(cli, ws, *args, f"--stop={stop}")
    assert stopped.out == text[: text.index(stop)] + "\n"
    assert "stopped by stop" in stopped.err


# --------------------------------------------------------------------------------------------------------------------
# info


def test_info_prints_json(cli: Callable[..., Result], ws: Workspace) -> None:
    res = cli("info", ws.ckpt)
    assert res.code == 0, res.err
    info = json.loads(res.out)
    announced = re.search(r"model: transformer decoder, ([\d,]+) parameters, state ([\d,]+) bytes", ws.train.err)
    assert announced is not None, ws.train.err
    assert info["parameters"] == int(announced.group(1).replace(",", ""))
    assert info["state_bytes_per_stream"] == int(announced.group(2).replace(",", "")) > 0
    assert info["decoder"] == "transformer" and info["tokenizer"] == "byte" and info["vocab_size"] == 257
    assert info["config"]["model"]["d_model"] == 32


def test_info_of_a_run_folder_uses_its_newest_checkpoint(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(ws.run_dir, run)
    res = cli("train", "--resume", "auto", "--out-dir", run, "--max-steps", "4", "--threads", "1", "-q")
    assert res.code == 0, res.err
    assert [c.name for c in find_checkpoints(run)] == ["step-00000003", "step-00000004"]
    res = cli("info", run)
    assert res.code == 0, res.err
    assert json.loads(res.out)["checkpoint"] == str(run / "step-00000004")


# --------------------------------------------------------------------------------------------------------------------
# user errors: one line, non-zero exit, no traceback


def _edit_config(ckpt: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _damaged(ws: Workspace, tmp: Path, damage: Callable[[Path], object]) -> Path:
    ckpt = copy_ckpt(ws, tmp)
    damage(ckpt)
    return ckpt


def _eval_damaged(damage: Callable[[Path], object]) -> Callable[[Workspace, Path], list]:
    return lambda ws, tmp: ["eval", ws.eval_file, "--model", _damaged(ws, tmp, damage)]


def _train(*args: str | Path) -> Callable[[Workspace, Path], list]:
    return lambda ws, tmp: [
        "train",
        *TINY,
        "--max-steps",
        "1",
        "-q",
        "--out-dir",
        tmp / "run",
        *[a(tmp) if callable(a) else a for a in args],
    ]


def _generate(*args: object) -> Callable[[Workspace, Path], list]:
    return lambda ws, tmp: ["generate", "--model", ws.ckpt, *[a(ws, tmp) if callable(a) else a for a in args]]


def _two_tiny_files(tmp: Path) -> Path:
    folder = tmp / "tiny"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n")
    (folder / "b.txt").write_text("world\n")
    return folder


ERROR_CASES: dict[str, tuple[Callable[[Workspace, Path], list], tuple[str, ...]]] = {
    "missing --data path": (_train("--data", lambda tmp: tmp / "nope.txt"), ("nope.txt", "does not exist")),
    "empty data file": (_train("--data", lambda tmp: _write(tmp / "empty.txt", b"")), ("empty.txt", "empty")),
    "corpus shorter than one segment": (
        _train("--data", _two_tiny_files, "--seq-len", "512"),
        ("fewer than one segment", "--seq-len"),
    ),
    "unknown preset": (_train("--preset", "transfomer-smal"), ("unknown preset", "transformer-small")),
    "unknown --set key": (_train("--set", "train.lrr=0.1"), ("unknown config key train.lrr", "did you mean train.lr")),
    "--set with a wrong type": (_train("--set", "train.max_steps=many"), ("train.max_steps", "integer")),
    "--seq-len 0": (_train("--seq-len", "0"), ("train.seq_len (--seq-len)", "must be >= 1, got 0")),
    # the config is the one place that checks values; the flag is named next to its key
    "--lr 0": (_train("--lr", "0"), ("train.lr (--lr)", "must be a finite number > 0")),
    "--vocab-size 100": (
        _train("--tokenizer", "bpe", "--vocab-size", "100"),
        ("data.vocab_size (--vocab-size)", ">= 300"),
    ),
    "--max-time -1": (_train("--max-time", "-1"), ("train.max_time (--max-time)", "must be >= 0")),
    "--resume with --init-from": (
        lambda ws, tmp: ["train", "--resume", "auto", "--init-from", ws.ckpt, "--out-dir", tmp / "run", "-q"],
        ("--resume", "--init-from"),
    ),
    "a folder as --prompt-file": (_generate("--prompt-file", lambda ws, tmp: tmp), ("--prompt-file", "folder")),
    "missing prompt file": (
        _generate("--prompt-file", lambda ws, tmp: tmp / "nope.txt"),
        ("nope.txt", "does not exist"),
    ),
    "--prompt and --prompt-file": (
        _generate("--prompt", "x", "--prompt-file", lambda ws, tmp: ws.prompt_file),
        ("--prompt", "--prompt-file"),
    ),
    "negative --temperature": (_generate("--temperature", "-1"), ("--temperature", ">= 0")),
    "--top-p 1.5": (_generate("--top-p", "1.5"), ("--top-p", "(0, 1]")),
    "unknown --load-state file": (
        _generate("--load-state", lambda ws, tmp: tmp / "s.safetensors"),
        ("s.safetensors", "does not exist"),
    ),
    "empty eval file": (
        lambda ws, tmp: ["eval", _write(tmp / "empty.txt", b""), "--model", ws.ckpt],
        ("empty.txt", "empty"),
    ),
    "eval --mode unknown": (
        lambda ws, tmp: ["eval", ws.eval_file, "--model", ws.ckpt, "--mode", "fancy"],
        ("--mode", "carry or sliding"),
    ),
    "eval of a missing checkpoint": (
        lambda ws, tmp: ["eval", ws.eval_file, "--model", tmp / "nope"],
        ("nope", "does not exist"),
    ),
    "truncated model.safetensors": (
        _eval_damaged(lambda c: _truncate(c / "model.safetensors")),
        ("model.safetensors", "truncated or damaged"),
    ),
    "empty model.safetensors": (
        _eval_damaged(lambda c: _write(c / "model.safetensors", b"")),
        ("model.safetensors", "truncated or damaged"),
    ),
    "garbage model.safetensors": (
        _eval_damaged(lambda c: _write(c / "model.safetensors", os.urandom(4096))),
        ("model.safetensors", "truncated or damaged"),
    ),
    "no tokenizer.json": (_eval_damaged(lambda c: (c / "tokenizer.json").unlink()), ("missing tokenizer.json",)),
    "tokenizer.json does not parse": (
        _eval_damaged(lambda c: _write(c / "tokenizer.json", b'{"model": [')),
        ("tokenizer.json", "not a valid tokenizer"),
    ),
    "config.json with an unknown key": (
        _eval_damaged(lambda c: _edit_config(c, lambda d: d["model"].update(colour="blue"))),
        ("config.json", "unknown config key model.colour"),
    ),
    "config.json with a wrong type": (
        _eval_damaged(lambda c: _edit_config(c, lambda d: d["model"].update(n_layer="one"))),
        ("config.json", "model.n_layer", "integer"),
    ),
    "config.json that is not JSON": (
        _eval_damaged(lambda c: _write(c / "config.json", b"{")),
        ("config.json", "not valid JSON"),
    ),
    "config.json that does not match the weights": (
        _eval_damaged(lambda c: _edit_config(c, lambda d: d["model"].update(d_ff=128))),
        ("model.safetensors", "different models"),
    ),
    "config.json with more layers than the weights": (
        _eval_damaged(lambda c: _edit_config(c, lambda d: d["model"].update(n_layer=2))),
        ("model.safetensors", "missing"),
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_error_is_one_line(cli: Callable[..., Result], ws: Workspace, tmp_path: Path, case: str) -> None:
    make_args, fragments = ERROR_CASES[case]
    assert_user_error(cli(*make_args(ws, tmp_path)), *fragments)


def test_generate_refuses_a_state_of_another_model(
    cli: Callable[..., Result], ws: Workspace, bpe_ckpt: Path, tmp_path: Path
) -> None:
    state = tmp_path / "bpe-state.safetensors"
    res = cli("generate", "--model", bpe_ckpt, "--prompt", "Hello", "-n", "0", "--save-state", state)
    assert res.code == 0 and state.is_file(), res.err
    res = cli("generate", "--model", ws.ckpt, "--load-state", state, "--prompt", "", "-n", "5")
    assert_user_error(res, "bpe-state.safetensors", "different model")


def test_unknown_option_is_one_line(cli: Callable[..., Result]) -> None:
    assert_user_error(cli("eval", "--frobnicate"), "--frobnicate", "longctx eval --help")
    assert_user_error(cli("trian"), "trian")


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_process_exit_code_and_debug_traceback(tmp_path: Path, debug: bool) -> None:
    res = run_subprocess(tmp_path, "train", "--data", "nope.txt", "-q", *(["--debug"] if debug else []))
    assert res.code != 0
    if debug:  # the traceback of the same user error, for bug reports
        assert "Traceback" in res.err and "DataError" in res.err and "nope.txt" in res.err
        assert not res.err.strip().splitlines()[0].startswith("error:")
    else:
        assert_user_error(res, "nope.txt", "does not exist")


def interrupt_training(ws: Workspace, tmp_path: Path, signals: tuple[int, ...]) -> tuple[int, str, str, Path]:
    """Start a long `longctx train`, send ``signals`` (10 ms apart) once its loop runs; (exit code, out, err, run)."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "longctx",
        "train",
        "--data",
        str(ws.data),
        *TINY,
        "--max-steps",
        "1000000",
        "--log-interval",
        "1",
        "--out-dir",
        str(run),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the training loop runs (its signal handler is installed)
            seen.append(line)
            if line.startswith("step "):
                break
        for i, signum in enumerate(signals):
            if i:
                time.sleep(0.01)
            proc.send_signal(signum)
        out, rest = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    return proc.returncode, out, "".join(seen) + rest, run


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_writes_a_checkpoint_and_exits(ws: Workspace, tmp_path: Path, signum: int, code: int) -> None:
    returncode, out, err, run = interrupt_training(ws, tmp_path, (signum,))
    assert returncode == code, err
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"error: interrupted at step (\d+); checkpoint written to (\S+); continue with: "
        r"longctx train --resume auto --out-dir (\S+)",
        last,
    )
    assert match is not None, err
    step = int(match.group(1))
    assert find_checkpoints(run)[-1] == Path(match.group(2)) == run / f"step-{step:08d}"
    assert json.loads((run / f"step-{step:08d}" / "trainer_state.json").read_text())["step"] == step
    assert not list(run.glob(".tmp-*"))


# --------------------------------------------------------------------------------------------------------------------
# regressions: help on a bare command, unwritable outputs, overrides a resume cannot apply


def test_bare_longctx_prints_the_help(cli: Callable[..., Result]) -> None:
    res = cli()
    assert "Commands:" in res.out + res.err and "train" in res.out + res.err
    assert "error:" not in res.err


@pytest.mark.parametrize(
    "case",
    [
        "eval --output is a folder",
        "generate --save-state is a folder",
        "generate --save-state under a file",
        "eval --per-position under a file",
    ],
)
def test_unwritable_output_is_one_line(cli: Callable[..., Result], ws: Workspace, tmp_path: Path, case: str) -> None:
    """Refused before any work (nothing scored or generated), in one line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if case.startswith("eval --output"):
        res = cli("eval", ws.eval_file, "--model", ws.ckpt, "--max-tokens", "10", "--output", tmp_path)
    elif case.startswith("eval --per-position"):
        res = cli("eval", ws.eval_file, "--model", ws.ckpt, "--per-position", blocker / "dir" / "p.csv")
    elif "is a folder" in case:
        res = cli("generate", "--model", ws.ckpt, "-n", "0", "--save-state", tmp_path)
    else:
        res = cli("generate", "--model", ws.ckpt, "-n", "0", "--save-state", blocker / "no" / "s.safetensors")
    assert_user_error(res, str(tmp_path))
    assert res.out == ""  # nothing was evaluated or generated
    assert not list(tmp_path.parent.glob(f".tmp-{tmp_path.name}-*"))  # no temporary file left beside the folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "--mode", "sliding", "--window", "1"), "--window must be an integer >= 2, got 1"),
        (("eval", "--seq-len", "0"), "--seq-len must be an integer >= 1, got 0"),
        (("eval", "--max-tokens", "-1"), "--max-tokens must be an integer >= 0 (0 = no limit), got -1"),
        (("eval", "--precision", "fp16"), "--precision must be fp32 or bf16, got 'fp16'"),
        (("generate", "--max-new-tokens", "-2"), "--max-new-tokens must be an integer >= 0, got -2"),
        (("generate", "--top-p", "2"), "--top-p must be a number in (0, 1] (1 = off), got 2"),
        (("generate", "--seq-len", "0"), "--seq-len must be an integer >= 1, got 0"),
        (("probe", "--seq-len", "0"), "--seq-len must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_refused_before_the_model_is_read(
    cli: Callable[..., Result], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """The same rule as the library's options class, checked first: the missing checkpoint is never reached."""
    res = cli(*args, "--model", tmp_path / "no-such-checkpoint")
    assert_user_error(res, message)


def test_output_folders_are_created(cli: Callable[..., Result], ws: Workspace, tmp_path: Path) -> None:
    """-o, --per-position and --save-state alike create a missing folder."""
    res = cli(
        "eval",
        ws.eval_file,
        "--model",
        ws.ckpt,
        "--max-tokens",
        "40",
        "-o",
        tmp_path / "a" / "r.json",
        "--per-position",
        tmp_path / "b" / "p.csv",
    )
    assert res.code == 0, res.err
    assert (tmp_path / "a" / "r.json").is_file() and (tmp_path / "b" / "p.csv").is_file()
    res = cli("generate", "--model", ws.ckpt, "-n", "0", "--prompt", "Hi", "--save-state", tmp_path / "c" / "s.st")
    assert res.code == 0, res.err
    assert (tmp_path / "c" / "s.st").is_file()


def test_resume_refuses_a_changed_model(cli: Callable[..., Result], ws: Workspace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ws.run_dir, run)
    res = cli(
        "train", "--resume", "auto", "--out-dir", run, "--max-steps", "4", "--set", "model.d_model=64", "--threads", "1"
    )
    assert res.code == 2, res.err
    errors = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.d_model cannot change" in errors[0] and "--init-from" in errors[0], res.err
    assert [c.name for c in find_checkpoints(run)] == ["step-00000003"]  # nothing trained, nothing removed


def test_checkpoint_finds_its_held_out_data_from_another_folder(ws: Workspace, tmp_path: Path) -> None:
    """The run was trained with ``--data data`` (relative); the checkpoint stores the absolute path."""
    config = json.loads((ws.ckpt / "config.json").read_text())
    assert config["data"]["paths"] == [str(ws.data)]
    res = run_inprocess(tmp_path, "eval", "--model", ws.ckpt, "--max-tokens", "50", "--json", "-q")
    assert res.code == 0, res.err
    assert json.loads(res.out)["tokens"] == 50


def test_vanished_training_data_is_said_clearly(ws: Workspace, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ws.ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["data"]["paths"] = [str(tmp_path / "gone")]
    (ckpt / "config.json").write_text(json.dumps(config))
    res = run_inprocess(tmp_path, "eval", "--model", ckpt, "-q")
    assert_user_error(res, "no longer where it was", "FILE")


@pytest.mark.parametrize("command", [["eval"], ["generate", "-n", "1"]])
@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x"])
def test_unknown_device_is_one_line(cli: Callable[..., Result], ws: Workspace, command: list[str], device: str) -> None:
    res = cli(*command, "--model", ws.ckpt, "--device", device, "-q")
    assert_user_error(res, f"--device {device!r}", "cpu")


def test_resume_refuses_another_preset_and_accepts_the_same_command(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(ws.run_dir, run)
    before = sorted(p.name for p in run.iterdir())
    res = cli(
        "train",
        "--resume",
        "auto",
        "--out-dir",
        run,
        "--preset",
        "xl-small",
        "--max-steps",
        "4",
        "--threads",
        "1",
        "-q",
    )
    assert_user_error(res, "--preset xl-small", "--init-from")
    assert sorted(p.name for p in run.iterdir()) == before
    res = cli("train", "--resume", "auto", "--out-dir", run, *TINY, "--max-steps", "4")
    assert res.code == 0, res.err


# --------------------------------------------------------------------------------------------------------------------
# hostile inputs: any bytes, FIFOs, huge single lines


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=400))
def test_eval_and_generate_take_any_bytes(
    cli: Callable[..., Result], ws: Workspace, tmp_path: Path, data: bytes
) -> None:
    """Random bytes, NUL bytes, invalid UTF-8: scored exactly (byte tokenizer) and usable as a prompt."""
    path = tmp_path / "hostile.bin"
    path.write_bytes(data)
    res = cli("eval", path, "--model", ws.ckpt, "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["tokens"] == result["bytes"] == len(data)
    gen = cli("generate", "--prompt-file", path, "--model", ws.ckpt, "-n", "3", "--seed", "1")
    assert gen.code == 0 and "Traceback" not in gen.err


def test_bpe_checkpoint_reads_invalid_utf8_with_one_warning(
    cli: Callable[..., Result], bpe_ckpt: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fair is foul\n" + b"\xff\xfe\x00 and foul is fair\n" * 20)
    res = cli("eval", path, "--model", bpe_ckpt, "--json")
    assert res.code == 0, res.err
    warnings = [ln for ln in res.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "bad.txt" in warnings[0] and "byte 13" in warnings[0]


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_fifo_input_is_read_as_a_stream(ws: Workspace, tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    text = ws.eval_file.read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(text)

    writer = threading.Thread(target=feed)
    writer.start()
    args = ["eval", fifo, "--json"] if command == "eval" else ["generate", "--prompt-file", fifo, "-n", "2"]
    res = run_inprocess(ws.root, *args, "--model", ws.ckpt)
    writer.join(timeout=60)
    assert res.code == 0, res.err
    if command == "eval":
        assert json.loads(res.out)["tokens"] == len(text)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_huge_single_line_is_encoded_in_bounded_memory(bpe_ckpt: Path, kind: str) -> None:
    """A single line of 200 MB (byte tokenizer) or 4.5 MB (BPE, slower to encode) never held whole: the peak of
    Python allocations stays a small multiple of the 1 MB read chunk."""
    import tracemalloc

    from longctx.tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level() if kind == "byte" else Tokenizer.from_file(str(bpe_ckpt / "tokenizer.json"))
    total = 200_000_000 if kind == "byte" else 4_500_000

    class Endless(io.RawIOBase):  # "word word word ..." without a newline, generated as it is read
        def __init__(self) -> None:
            self.left = total

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            n = min(len(buffer), self.left)
            buffer[:n] = (b"fair foul " * (n // 10 + 1))[:n]
            self.left -= n
            return n

    tracemalloc.start()
    tokens = read = 0
    for ids, n in tokenizer.iter_encode(io.BufferedReader(Endless(), 1 << 20), where="huge"):
        tokens += len(ids)
        read += n
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert read == total and tokens > 0
    assert peak < 64 * 2**20, peak  # 200 MB read; at most 4 chunks of text and their ids are ever alive


@pytest.mark.slow
def test_second_ctrl_c_during_the_save_does_not_corrupt_it(ws: Workspace, tmp_path: Path) -> None:
    """Two Ctrl-C in quick succession: the second arrives while the first one's checkpoint is being written (or
    after it); either way the run exits 130 and every checkpoint on disk is complete."""
    returncode, _, err, run = interrupt_training(ws, tmp_path, (signal.SIGINT, signal.SIGINT))
    assert returncode == 130, err
    assert "Traceback" not in err
    ckpts = find_checkpoints(run)
    assert ckpts and not list(run.glob(".tmp-*"))
    for ckpt in ckpts:
        load_checkpoint(ckpt)
