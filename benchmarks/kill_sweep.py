"""Kill sweep: SIGKILL a training run at random moments and at aimed system calls; nothing may be lost.

A tiny model (1 layer, width 32, ``--seq-len 16 --batch-size 4``) trains for ``--steps`` steps with
``--save-interval 1 --keep-last 2``, so that nearly every moment is inside or next to a checkpoint write or a prune.

1. ``--random`` kills: ``longctx train --resume auto`` is started, killed (SIGKILL) after 1 to 3 logged steps plus
   0 to 30 ms, and started again, until the kills are done;
2. aimed kills: the same command under ``strace -f -e inject=SYSCALLS:signal=KILL:when=N``, which kills the process
   on its N-th rename (the checkpoint's rename into place, safetensors' own renames, the prune's rename away), fsync,
   or unlink (the prune's deletion), for N = 1 .. ``--aim-depth``;
3. the finished run is resumed (a re-save of an existing step would happen here) under the same aimed kills;
4. the run is finished with ``--resume auto``.

After every kill: each checkpoint a resume could pick is complete and loads (weights and trainer state); the newest
never goes back; and the next start resumes from the newest checkpoint (or a complete one it recovers), never from
an older one or from step 0. At the end the weights must equal an uninterrupted run's bit for bit.

    python benchmarks/kill_sweep.py --out benchmarks/results/kill_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longctx.checkpoint import (  # noqa: E402
    find_checkpoints,
    is_complete_checkpoint,
    load_checkpoint,
    load_trainer_state,
)
from longctx.data import bundled_documents  # noqa: E402

AIMS = {"rename": "rename,renameat,renameat2", "fsync": "fsync,fdatasync", "unlink": "unlink,unlinkat,rmdir"}
RESUMED = re.compile(r"resumed from \S+ \(step (\d+),")


def train_command(out_dir: Path, data: Path, steps: int) -> list[str]:
    sets = {
        "model.n_layer": 1,
        "model.d_model": 32,
        "model.n_head": 2,
        "model.d_ff": 64,
        "model.transformer.window": 16,
        "train.lr_decay_steps": steps,
        "train.warmup_steps": 2,
        "train.eval_interval": 10**6,
        "train.micro_batch_size": 2,
    }
    cmd = [
        sys.executable,
        "-m",
        "longctx",
        "train",
        "--preset",
        "transformer-small",
        "--no-progress",
        "--data",
        str(data),
        "--out-dir",
        str(out_dir),
        "--max-steps",
        str(steps),
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--save-interval",
        "1",
        "--keep-last",
        "2",
        "--log-interval",
        "1",
        "--resume",
        "auto",
    ]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def check_run(run: Path, newest_before: int) -> tuple[int, list[str]]:
    """(newest step, problems): every checkpoint a resume could pick must be complete and load."""
    problems = []
    found = find_checkpoints(run)
    for ckpt in found:
        if not is_complete_checkpoint(ckpt):
            problems.append(f"{ckpt.name} is incomplete")
            continue
        try:
            load_checkpoint(ckpt)
            load_trainer_state(ckpt)
        except Exception as e:  # noqa: BLE001 - any failure is a finding
            problems.append(f"{ckpt.name} does not load: {e}")
    newest = int(found[-1].name.split("-")[1]) if found else 0
    if newest < newest_before:
        problems.append(f"the newest checkpoint went back from step {newest_before} to {newest}")
    return newest, problems


def recoverable(run: Path) -> int:
    """The newest step held complete under a temporary name (a kill between the write and its rename)."""
    steps = [
        int(m.group(1))
        for p in run.glob(".tmp-*")
        if (m := re.fullmatch(r"\.tmp-(?:old-)?step-(\d+)-\d+", p.name)) and is_complete_checkpoint(p)
    ]
    return max(steps, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--random", type=int, default=40, help="random kills")
    parser.add_argument("--aim-depth", type=int, default=8, help="kill at the 1st .. N-th call of each syscall set")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    strace = shutil.which("strace")
    work = Path(tempfile.mkdtemp(prefix="kill-sweep-"))
    data = work / "data"
    data.mkdir()
    for doc in bundled_documents()[:3]:
        with doc.open() as f:
            (data / doc.name.split("/")[-1]).write_bytes(f.read()[:6000])
    env = os.environ | {"OMP_NUM_THREADS": "1", "LONGCTX_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()

    reference = work / "reference"
    done = subprocess.run(train_command(reference, data, args.steps), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = work / "killed"
    cmd = train_command(run, data, args.steps)
    events: list[dict[str, Any]] = []
    newest = 0
    pending_check: dict[str, Any] | None = None  # the resume of the next start is checked against this

    def note_start(stderr: str) -> None:
        """The start after a kill must resume from the newest (or a recovered) checkpoint."""
        nonlocal pending_check
        if pending_check is None:
            return
        found = RESUMED.search(stderr)
        if "recovered" in stderr:
            pending_check["recovered_on_next_start"] = True
        if found is None and "model: " not in stderr:
            return  # killed itself before it resumed or started afresh: the start after it is judged instead
        step = int(found.group(1)) if found else 0
        want = max(pending_check["newest_after_kill"], pending_check["recoverable"])
        pending_check["next_start_resumed_at"] = step
        if step != want and not (want == 0 and not found):
            pending_check["problems"].append(f"the next start resumed at step {step}, not {want}")
        pending_check = None

    def after_kill(kind: str, **detail: Any) -> None:
        nonlocal newest, pending_check
        if pending_check is not None:  # the start just killed never got to resume: its successor is judged
            detail["previous_start_killed_before_resuming"] = True
        temporaries = [p.name for p in run.glob(".tmp-*")] if run.is_dir() else []
        held = recoverable(run) if run.is_dir() else 0
        newest, problems = check_run(run, newest)
        event = {
            "kind": kind,
            **detail,
            "newest_after_kill": newest,
            "temporaries_left": len(temporaries),
            "recoverable": held,
            "problems": problems,
        }
        events.append(event)
        pending_check = event

    # 1. random kills
    while sum(e["kind"] == "random" for e in events) < args.random:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        wanted, logged, seen = rng.randint(1, 3), 0, []
        for line in proc.stderr:
            seen.append(line)
            logged += line.startswith("step ")
            if logged >= wanted:
                break
        note_start("".join(seen))
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is not None:
            raise SystemExit(f"the run finished before {args.random} random kills; raise --steps")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        after_kill("random", after_logged_steps=wanted)

    # 2. and 3. aimed kills (a finished run last)
    aimed: list[tuple[str, int, bool]] = [(name, n, False) for name in AIMS for n in range(1, args.aim_depth + 1)]
    aimed += [(name, n, True) for name in AIMS for n in range(1, 4)]
    strace_missing = strace is None
    for name, n, finished in [] if strace_missing else aimed:
        if finished and newest < args.steps:  # finish the run first: the aimed kills then hit a resume of it
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            note_start(done.stderr)
            assert done.returncode == 0, done.stderr[-2000:]
            newest, _ = check_run(run, newest)
        traced = [
            strace,
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            f"trace={AIMS[name]}",
            "-e",
            f"inject={AIMS[name]}:signal=KILL:when={n}",
            *cmd,
        ]
        done = subprocess.run(traced, env=env, capture_output=True, text=True)
        note_start(done.stderr)
        killed = done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        if not killed and done.returncode != 0:
            raise SystemExit(f"{name} #{n}: exit {done.returncode}: {done.stderr[-1500:]}")
        if killed:
            after_kill("aimed", syscall=name, when=n, finished_run=finished)
        else:
            events.append(
                {
                    "kind": "aimed",
                    "syscall": name,
                    "when": n,
                    "finished_run": finished,
                    "not_reached": True,
                    "problems": [],
                }
            )

    # 4. finish
    final = subprocess.run(cmd, env=env, capture_output=True, text=True)
    note_start(final.stderr)
    assert final.returncode == 0, final.stderr[-2000:]
    newest, problems = check_run(run, newest)
    import torch
    from safetensors.torch import load_file

    ref = load_file(str(find_checkpoints(reference)[-1] / "model.safetensors"))
    got = load_file(str(find_checkpoints(run)[-1] / "model.safetensors"))
    equal = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    random_kills = [e for e in events if e["kind"] == "random"]
    aimed_kills = [e for e in events if e["kind"] == "aimed" and not e.get("not_reached")]
    report = {
        "steps": args.steps,
        "save_interval": 1,
        "keep_last": 2,
        "seed": args.seed,
        "random_kills": len(random_kills),
        "random_kills_leaving_a_temporary": sum(e["temporaries_left"] > 0 for e in random_kills),
        "aimed_kills": len(aimed_kills),
        "strace": strace or "not installed",
        "aimed_by_syscall": {name: sum(e.get("syscall") == name for e in aimed_kills) for name in AIMS},
        "aimed_on_a_finished_run": sum(bool(e.get("finished_run")) for e in aimed_kills),
        "aimed_not_reached": sum(bool(e.get("not_reached")) for e in events),
        "kills_followed_by_a_recovery": sum(bool(e.get("recovered_on_next_start")) for e in events),
        "problems": [
            f"{e['kind']} {e.get('syscall', '')}#{e.get('when', '')}: {p}" for e in events for p in e["problems"]
        ]
        + problems,
        "final_step": newest,
        "final_weights_equal_uninterrupted_bit_for_bit": equal,
        "wall_s": round(time.monotonic() - started, 1),
        "events": events,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "events"}, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    if report["problems"] or not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
