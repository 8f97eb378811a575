"""Reliability: nothing executes what a file contains, failed writes lose nothing, damaged caches are rebuilt,
one run per folder."""

from __future__ import annotations

import errno
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import tiny_overrides

import longctx
import longctx.checkpoint as checkpoint_module
from longctx.checkpoint import find_checkpoints, load_checkpoint
from longctx.config import load_config
from longctx.data import build_token_cache, discover
from longctx.errors import LongctxError
from longctx.run_folder import run_lock
from longctx.tokenizer import Tokenizer
from longctx.train import RunOptions, train

PACKAGE = Path(longctx.__file__).parent
FORBIDDEN = re.compile(
    r"import pickle|from pickle|\bpickle\.|torch\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(|"
    r"yaml\.load\(|marshal\.loads|shelve\."
)


def test_package_source_never_deserialises_code():
    hits = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line) and "weights_only=True" not in line:
                hits.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert hits == []


class Trap:
    """Unpickling this object creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_beside_a_checkpoint_are_never_opened(tmp_path):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 2}))
    result = train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "trainer_state.pt", "optimizer.pt", "rng_state.pth", "model.pt"):
        (result.last_checkpoint / name).write_bytes(pickle.dumps(Trap(marker)))
    load_checkpoint(result.last_checkpoint)
    overrides = {"train.max_steps": 3}
    train(
        load_config("transformer-small", tiny_overrides(tmp_path, **overrides)),
        RunOptions(out_dir=tmp_path / "run", resume="auto", progress=False),
        overrides,
    )
    assert not marker.exists()


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.save_interval": 2}))
    real = checkpoint_module._save_tensors
    calls = {"n": 0}

    def full_disk(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (weights + trainer state) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_module, "_save_tensors", full_disk)
    with pytest.raises(LongctxError, match="No space left on device.*previous checkpoints are intact"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert not list((tmp_path / "run").glob(".tmp-*"))  # no half-written folder left
    load_checkpoint(tmp_path / "run" / "step-00000002")


@pytest.mark.parametrize("damage", ["truncate", "modify"])
def test_damaged_token_cache_is_rebuilt(tmp_path, damage):
    doc = tmp_path / "d.txt"
    doc.write_text("some text to cache\n" * 50)
    tok, root = Tokenizer.byte_level(), tmp_path / "cache"
    good = build_token_cache(discover([str(doc)]), tok, root).tolist()
    (cache,) = root.glob("*.bin")
    data = bytearray(cache.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[10] ^= 0x01
    cache.write_bytes(bytes(data))
    assert build_token_cache(discover([str(doc)]), tok, root).tolist() == good


def test_second_run_in_the_same_folder_is_refused(tmp_path):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    with run_lock(tmp_path / "run"):
        with pytest.raises(LongctxError, match="another longctx train is writing"):
            train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))


def test_a_killed_process_does_not_leave_the_lock_stuck(tmp_path):
    holder = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from longctx.run_folder import run_lock
        with run_lock(Path({str(tmp_path / "run")!r})):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LongctxError):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path / "run"):  # the OS released the dead process's lock
        pass


def test_a_checkpoint_deletion_cut_short_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """keep_last pruning renames a checkpoint away before deleting its files: a kill in the middle of the deletion
    (here: the delete stops after one file) leaves no step-* folder with some files missing."""
    step = tmp_path / "step-00000001"
    step.mkdir()
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.safetensors",
        "trainer_state.json",
    ):
        (step / name).write_bytes(b"x")
    assert find_checkpoints(tmp_path) == [step]

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "tokenizer.json").unlink()
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after it runs

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.remove_checkpoint(step)
    assert find_checkpoints(tmp_path) == []  # the half-deleted folder is not a checkpoint any more
    assert [p.name.startswith(".tmp-") for p in tmp_path.iterdir()] == [True]  # cleaned when a run starts


@pytest.mark.slow
def test_random_kills_resume_to_the_same_weights(tmp_path):
    """SIGKILL at random moments (a checkpoint is written every step, so many kills land in writes); every resume
    starts from a complete checkpoint and the final weights equal those of an uninterrupted run."""
    import json
    import os
    import random
    import signal
    import time

    import torch

    steps = 100
    overrides = tiny_overrides(
        tmp_path,
        **{"train.max_steps": steps, "train.save_interval": 1, "train.keep_last": 2, "train.lr_decay_steps": steps},
    )
    reference = train(load_config("transformer-small", overrides), RunOptions(out_dir=tmp_path / "ref", progress=False))
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "longctx",
        "train",
        "--preset",
        "transformer-small",
        "--no-progress",
        "--resume",
        "auto",
        "--out-dir",
        str(run),
    ]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "LONGCTX_CACHE": str(tmp_path / "cache")}
    rng = random.Random(20261122)
    kills = 0
    while kills < 20:
        # kill after 1 to 3 logged steps of this process plus up to 20 ms: the moment depends on training progress,
        # not on how fast this machine starts Python, and often falls inside a checkpoint write (one per step)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        wanted, logged = rng.randint(1, 3), 0
        for line in proc.stderr:
            logged += line.startswith("step ")
            if logged >= wanted:
                break
        time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is not None:
            break  # finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        for ckpt in find_checkpoints(run):  # whatever a resume could pick is complete and loadable
            assert {p.name for p in ckpt.iterdir()} >= {
                "model.safetensors",
                "config.json",
                "tokenizer.json",
                "trainer_state.safetensors",
                "trainer_state.json",
            }
            load_checkpoint(ckpt)
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills == 20, f"only {kills} kills before the run finished"
    a, _, _ = load_checkpoint(reference.last_checkpoint)
    b, _, _ = load_checkpoint(find_checkpoints(run)[-1])
    assert find_checkpoints(run)[-1].name == f"step-{steps:08d}"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_weights_of_the_wrong_dtype_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from longctx.errors import CheckpointError

    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    ckpt = train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False)).last_checkpoint
    weights = ckpt / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights), metadata=metadata)
    with pytest.raises(CheckpointError, match="float16.*the config needs .*float32"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------------------------------
# lines of training, re-saves, non-finite weights, metrics


def _run(tmp_path, out, resume=None, **extra):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **extra))
    return train(cfg, RunOptions(out_dir=out, resume=resume, progress=False), {k: v for k, v in extra.items()})


def test_resuming_an_older_checkpoint_never_prunes_the_newer_line(tmp_path):
    from longctx.errors import ConfigError

    br = tmp_path / "br"
    _run(tmp_path, br, **{"train.max_steps": 6, "train.save_interval": 2, "train.keep_last": 2})
    assert [p.name for p in find_checkpoints(br)] == ["step-00000004", "step-00000006"]
    with pytest.raises(ConfigError, match="not the newest checkpoint"):
        _run(
            tmp_path,
            br,
            resume=str(br / "step-00000004"),
            **{"train.max_steps": 5, "train.save_interval": 1, "train.keep_last": 1, "train.lr": 1e-4},
        )
    other = tmp_path / "other"
    _run(tmp_path, other, **{"train.max_steps": 2})
    metrics = (other / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds another run's checkpoints"):
        _run(tmp_path, other, resume=str(br / "step-00000006"), **{"train.max_steps": 8})
    assert (other / "metrics.jsonl").read_text() == metrics and len(find_checkpoints(other)) == 1
    branch = tmp_path / "branch"  # a branch goes to an empty folder and leaves the original line alone
    _run(tmp_path, branch, resume=str(br / "step-00000004"), **{"train.max_steps": 5, "train.keep_last": 1})
    assert [p.name for p in find_checkpoints(branch)] == ["step-00000005"]
    assert [p.name for p in find_checkpoints(br)] == ["step-00000004", "step-00000006"]


def test_a_finished_run_resumed_rewrites_nothing_and_interrupted_saves_are_recovered(tmp_path):
    run = tmp_path / "run"
    _run(tmp_path, run, **{"train.max_steps": 2, "train.keep_last": 1})
    last = find_checkpoints(run)[-1]
    before = {f.name: f.stat().st_mtime_ns for f in last.iterdir()}
    _run(tmp_path, run, resume="auto", **{"train.max_steps": 2, "train.keep_last": 1})
    assert find_checkpoints(run) == [last] and {f.name: f.stat().st_mtime_ns for f in last.iterdir()} == before
    # a kill between the two renames of a re-save: the complete checkpoint sits under a temporary name
    last.rename(run / f".tmp-old-{last.name}-4242")
    (run / ".tmp-step-00000003-4242").mkdir()  # an incomplete new write: deleted
    result = _run(tmp_path, run, resume="auto", **{"train.max_steps": 3, "train.keep_last": 1})
    assert result.steps == 3  # resumed at step 2 (recovered), not restarted from 0
    assert not list(run.glob(".tmp-*"))


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    import torch

    real_step = torch.optim.AdamW.step
    calls = []

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # a finite loss, but the update leaves a NaN in the weights
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    run = tmp_path / "run"
    with pytest.raises(LongctxError, match="update of step 3 made the weights non-finite"):
        _run(tmp_path, run, **{"train.max_steps": 6, "train.save_interval": 2})
    assert [p.name for p in find_checkpoints(run)] == ["step-00000002"]
    load_checkpoint(find_checkpoints(run)[-1])  # the newest checkpoint loads


def test_metrics_are_strict_json(tmp_path):
    import json

    from longctx.run_folder import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, None)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "learned": {"x": [float("-inf"), 1.0]}})
    log.write({"step": 2, "loss": 1.5})
    log.close()

    def refuse(name):
        raise ValueError(name)

    records = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
    assert records[0] == {"step": 1, "loss": None, "grad_norm": None, "learned": {"x": [None, 1.0]}}
    MetricsLog(path, keep_up_to_step=1).close()  # a resume at step 1 drops the later line, through a rename
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


# --------------------------------------------------------------------------------------------------------------------
# failed writes: real full and read-only file systems (root only), injected errors, unwritable and too-long paths


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(kb, readonly=False)``: a small file system of its own (skipped unless root and ``mount`` works)."""
    import os

    mounted = []

    def mount(kb: int, readonly: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={kb}k" + (",ro" if readonly else "")
        if (
            os.geteuid() != 0
            or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode
            != 0
        ):
            pytest.skip("needs root and a working mount for a small file system")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _cli_train(tmp_path, out_dir, *extra: str, **keys):
    """``longctx train -q`` of the tiny model, in this process; returns the Result."""
    import json

    from test_cli import run_inprocess

    args = ["train", "-q", "--no-progress", "--preset", "transformer-small", "--out-dir", str(out_dir), *extra]
    for key, value in tiny_overrides(tmp_path, **keys).items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return run_inprocess(tmp_path, *args)


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    import os

    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        os.fsync(f.fileno())


def test_safetensors_own_error_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """A real full disk makes safetensors raise SafetensorError, not OSError (the writer is made to raise it)."""
    from safetensors import SafetensorError

    real = checkpoint_module.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (weights + trainer state) fits, the second does not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.save_interval": 2}))
    with pytest.raises(LongctxError, match="No space left on device.*previous checkpoints are intact"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert not list((tmp_path / "run").glob(".tmp-*"))
    load_checkpoint(tmp_path / "run" / "step-00000002")


def test_a_real_full_disk_during_checkpoints_is_one_line(tmp_path, tmpfs):
    from test_cli import assert_user_error

    disk = tmpfs(768)
    run = disk / "run"
    res = _cli_train(tmp_path, run, **{"train.max_steps": 40, "train.save_interval": 1, "train.keep_last": 40})
    assert_user_error(res, "No space left on device")
    found = find_checkpoints(run)
    assert found and not list(run.glob(".tmp-*"))  # earlier checkpoints are there, no half-written one
    for ckpt in found:
        load_checkpoint(ckpt)


def test_a_full_disk_for_the_lock_metrics_and_token_cache_is_one_line(tmp_path, tmpfs):
    from test_cli import assert_user_error

    disk = tmpfs(256)
    (disk / "run").mkdir()
    _fill(disk)
    assert_user_error(
        _cli_train(tmp_path, disk / "run", **{"train.max_steps": 1}), "--out-dir", "No space left on device"
    )
    assert_user_error(
        _cli_train(tmp_path, tmp_path / "run", **{"train.max_steps": 1, "data.cache_dir": str(disk / "cache")}),
        "token cache",
        "No space left on device",
    )


def test_a_failed_metrics_write_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    import errno

    from longctx.run_folder import MetricsLog

    real = MetricsLog._write

    def full_at_step_3(self, record):
        if record.get("step") == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(MetricsLog, "_write", full_at_step_3)
    with pytest.raises(
        LongctxError,
        match=r"metrics.jsonl: No space left on device; the last checkpoint "
        r"\(.*step-00000002\) is intact",
    ):
        _run(tmp_path, tmp_path / "run", **{"train.max_steps": 4, "train.save_interval": 1, "train.keep_last": 5})
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-00000001", "step-00000002"]


def test_out_dir_that_is_a_file_under_a_file_too_long_or_read_only_is_one_line(tmp_path, tmpfs):
    from test_cli import assert_user_error

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    assert_user_error(_cli_train(tmp_path, blocker, **{"train.max_steps": 1}), "is a file")
    assert_user_error(
        _cli_train(tmp_path, blocker / "run", **{"train.max_steps": 1}), "cannot write to --out-dir", "Not a directory"
    )
    assert_user_error(_cli_train(tmp_path, tmp_path / ("r" * 300), **{"train.max_steps": 1}), "File name too long")
    assert_user_error(
        _cli_train(tmp_path, tmp_path / "run", **{"train.max_steps": 1, "data.cache_dir": str(blocker / "cache")}),
        "token cache",
        "Not a directory",
    )
    assert blocker.read_text() == "a file"
    readonly = tmpfs(64, readonly=True)
    assert_user_error(_cli_train(tmp_path, readonly / "run", **{"train.max_steps": 1}), "Read-only file system")


def _state_and_model(tmp_path):
    from longctx.checkpoint import SavedState

    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    ckpt = train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False)).last_checkpoint
    model, tokenizer, config = load_checkpoint(ckpt)
    return SavedState(model.init_state(1), tokens=0, last_token=0), config, tokenizer, ckpt


def test_save_state_failures_are_one_line(tmp_path, tmpfs, monkeypatch):
    """A read-only folder used to fail a second time in the cleanup (a traceback); a name near the system's limit
    used to fail on its temporary's longer name."""
    import os

    from longctx.checkpoint import load_state, save_state
    from longctx.errors import CheckpointError

    saved, config, tokenizer, ckpt = _state_and_model(tmp_path)
    long_name = tmp_path / ("s" * 250)
    save_state(long_name, saved, config, tokenizer)
    assert load_state(long_name, load_checkpoint(ckpt)[0], config, tokenizer).tokens == 0
    assert os.listdir(tmp_path).count(long_name.name) == 1 and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(CheckpointError, match="cannot write state file .*Not a directory"):
        save_state(ckpt / "model.safetensors" / "state", saved, config, tokenizer)
    readonly = tmpfs(64, readonly=True)
    with pytest.raises(CheckpointError, match="cannot write state file .*Read-only file system"):
        save_state(readonly / "state.safetensors", saved, config, tokenizer)


def test_save_state_with_safetensors_failing_is_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from longctx.checkpoint import save_state
    from longctx.errors import CheckpointError

    saved, config, tokenizer, _ = _state_and_model(tmp_path)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_state(tmp_path / "state.safetensors", saved, config, tokenizer)
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "state.safetensors").exists()


def test_generate_save_state_name_too_long_is_found_before_work(tmp_path):
    from test_cli import assert_user_error, run_inprocess

    _, _, _, ckpt = _state_and_model(tmp_path)
    res = run_inprocess(
        tmp_path, "generate", "-q", "-m", ckpt, "-p", "hi", "-n", "1", "--save-state", tmp_path / ("s" * 300)
    )
    assert_user_error(res, "--save-state", "cannot be written (File name too long)")


def test_paths_longer_than_the_system_allows_are_one_line(tmp_path):
    from test_cli import assert_user_error, run_inprocess

    long = str(tmp_path / ("x" * 300))
    for args in (
        ["info", long],
        ["eval", "-m", long],
        ["generate", "-m", long],
        ["plot", long],
        ["train", "-q", "--data", long, "--max-steps", "1", "--out-dir", str(tmp_path / "run")],
    ):
        assert_user_error(run_inprocess(tmp_path, *args), "is longer than this system allows")


# --------------------------------------------------------------------------------------------------------------------
# loading while a training run prunes


def _pruning_reader(monkeypatch):
    """The first config read of a checkpoint stands for a training run writing the next step and pruning the one
    being read (renamed away, as remove_checkpoint does)."""
    import shutil

    real = checkpoint_module.read_config
    events = []

    def read_config(path):
        if not events:
            newer = path.parent / f"step-{int(path.name.split('-')[1]) + 1:08d}"
            shutil.copytree(path, newer)
            checkpoint_module.remove_checkpoint(path)
            events.append(newer)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "read_config", read_config)
    return events


def test_a_checkpoint_pruned_while_it_is_read_is_picked_again(tmp_path, monkeypatch):
    from test_cli import run_inprocess

    run = tmp_path / "runs" / "tiny"
    _run(tmp_path, run, **{"train.max_steps": 2, "train.save_interval": 1, "train.keep_last": 1})
    events = _pruning_reader(monkeypatch)
    res = run_inprocess(tmp_path, "info")  # no checkpoint named: the newest under runs/
    assert res.code == 0, res.err
    assert '"checkpoint": "runs/tiny/step-00000003"' in res.out and events
    events.clear()
    model, _, _ = load_checkpoint(run)  # a run folder: its newest, looked up again
    assert [p.name for p in find_checkpoints(run)] == ["step-00000004"]


def test_a_named_checkpoint_pruned_while_it_is_read_is_reported_as_such(tmp_path, monkeypatch):
    from test_cli import assert_user_error, run_inprocess

    run = tmp_path / "run"
    _run(tmp_path, run, **{"train.max_steps": 1, "train.save_interval": 1})
    _pruning_reader(monkeypatch)
    res = run_inprocess(tmp_path, "info", run / "step-00000001")
    line = assert_user_error(res, "step-00000001 was removed while it was read (a training run pruned it); run again")
    assert "damaged" not in line


def test_the_newest_checkpoint_is_found_while_one_is_deleted(tmp_path, monkeypatch):
    from longctx.checkpoint import find_latest_checkpoint

    for step in (1, 2):
        (tmp_path / "a" / f"step-0000000{step}").mkdir(parents=True)
        (tmp_path / "a" / f"step-0000000{step}" / "model.safetensors").write_bytes(b"x")
    real_is_file = Path.is_file

    def pruned_after_listing(self):  # the listing sees step 1, then the run deletes it before its mtime is read
        found = real_is_file(self)
        if found and self.parent.name == "step-00000001":
            checkpoint_module.remove_checkpoint(self.parent)
        return found

    monkeypatch.setattr(Path, "is_file", pruned_after_listing)
    assert find_latest_checkpoint(tmp_path).name == "step-00000002"


# --------------------------------------------------------------------------------------------------------------------
# stale temporaries and outdated token caches


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_and_outdated_caches_are_deleted(tmp_path):
    import fcntl
    import os
    import time

    doc = tmp_path / "d.txt"
    doc.write_text("some text to cache\n" * 50)
    tok, root = Tokenizer.byte_level(), tmp_path / "cache"
    build_token_cache(discover([str(doc)]), tok, root)
    (first,) = root.glob("*.bin")
    gone = tmp_path / "gone.txt"  # a cache of a file that no longer exists is kept: not provably stale
    gone.write_text("other text\n" * 20)
    build_token_cache(discover([str(gone)]), tok, root)
    gone.unlink()
    dead, alive = _dead_pid(), os.getppid()
    stale = root / f".tmp-abc.bin-{dead}"
    stale.mkdir()
    (stale / ".tmpXYZ").write_bytes(b"\0" * 1000)
    legacy = root / f"{'0' * 24}.tmp{dead}"
    legacy.write_bytes(b"\0" * 1000)
    running = root / f".tmp-def.bin-{alive}"
    running.mkdir()
    elsewhere = root / f".tmp-ghi.bin-{_dead_pid()}"  # a writer on another machine: its pid means nothing here,
    elsewhere.mkdir()  # but it holds the lock
    fd = os.open(elsewhere, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        time.sleep(0.01)
        doc.write_text("the text has changed\n" * 50)  # newer than the first cache: it can never be used again
        build_token_cache(discover([str(doc)]), tok, root)
    finally:
        os.close(fd)
    assert not stale.exists() and not legacy.exists() and not first.exists()
    assert not first.with_suffix(".json").exists()
    assert running.exists() and elsewhere.exists()
    assert len(list(root.glob("*.bin"))) == 2  # the new cache and the one of the vanished file


def test_temporaries_of_killed_save_state_writes_are_deleted(tmp_path):
    from longctx.checkpoint import save_state

    saved, config, tokenizer, _ = _state_and_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".tmp-state.st-{_dead_pid()}"
    stale.mkdir()
    (stale / ".tmpQWERTY").write_bytes(b"\0" * 1000)  # safetensors' own temporary, left by a kill
    other = out / f".tmp-other.st-{_dead_pid()}"  # not this file's: left alone in a folder of the user's
    other.mkdir()
    save_state(out / "state.st", saved, config, tokenizer)
    assert sorted(p.name for p in out.iterdir()) == sorted([other.name, "state.st"])
