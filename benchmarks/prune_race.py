"""Readers against a training run that prunes: how often do ``info`` / ``eval`` / ``generate`` without ``--model`` fail?

A tiny model trains with ``--save-interval 1 --keep-last 1`` under ``runs/`` (so every step writes a checkpoint and
deletes the previous one) while this process calls the command line (``longctx.cli.main``, in process) in a loop for
``--seconds``, cycling through ``info``, ``eval --max-tokens 64 FILE`` and ``generate -n 4``, none with ``--model``.
Each call ends as: exit 0, one ``error:`` line (counted by its wording), or an uncaught exception (a traceback).

    python benchmarks/prune_race.py --seconds 60 --out benchmarks/results/prune_race.json
    python benchmarks/prune_race.py --code /path/to/older/checkout ...   # the same race against other code
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--code",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="import longctx from this checkout (default: this one)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the counts as JSON here")
    args = parser.parse_args()
    out_file = args.out.resolve() if args.out is not None else None
    sys.path.insert(0, str(args.code.resolve()))
    import torch

    import longctx
    from longctx.cli import main as cli_main
    from longctx.data import bundled_documents

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="prune-race-"))
    data = work / "data"
    data.mkdir()
    for doc in bundled_documents()[:3]:
        with doc.open() as f:
            (data / doc.name.split("/")[-1]).write_bytes(f.read()[:20000])
    (work / "eval.txt").write_text("To be, or not to be, that is the question.\n" * 4)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "LONGCTX_CACHE": str(work / "cache"),
        "PYTHONPATH": str(Path(longctx.__file__).parent.parent),
    }
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "longctx",
            "train",
            "--no-progress",
            "-q",
            "--preset",
            "transformer-small",
            "--data",
            str(data),
            "--out-dir",
            "runs/tiny",
            "--max-steps",
            "1000000",
            "--save-interval",
            "1",
            "--keep-last",
            "1",
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.d_model=32",
            "--set",
            "model.n_head=2",
            "--set",
            "model.d_ff=64",
            "--set",
            "train.eval_interval=1000000",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    commands = [
        ["info"],
        ["eval", "--max-tokens", "64", "--threads", "1", "eval.txt"],
        ["generate", "-p", "To be", "-n", "4", "--seed", "1", "--threads", "1"],
    ]
    outcomes: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    os.chdir(work)
    os.environ["LONGCTX_CACHE"] = str(work / "cache")
    try:
        while not list((work / "runs" / "tiny").glob("step-*")):
            time.sleep(0.2)
        started, calls = time.monotonic(), 0
        while time.monotonic() - started < args.seconds:
            command = commands[calls % len(commands)]
            calls += 1
            saved = sys.stdout, sys.stderr
            err = io.StringIO()
            sys.stdout, sys.stderr = io.StringIO(), err
            try:
                cli_main(command)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0
            except Exception as e:  # noqa: BLE001 - what the user would see as a traceback
                code, kind = -1, f"traceback: {type(e).__name__}"
                outcomes[kind] += 1
                examples.setdefault(kind, str(e)[:200])
            finally:
                sys.stdout, sys.stderr = saved
            if code == 0:
                outcomes["ok"] += 1
            elif code > 0:
                line = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")][-1:] or ["?"]
                kind = (
                    "error: removed while read"
                    if "removed while it was read" in line[0]
                    else "error: truncated or damaged"
                    if "damaged" in line[0]
                    else "error: other"
                )
                outcomes[kind] += 1
                examples.setdefault(kind, line[0][:200])
    finally:
        trainer.kill()
        trainer.wait()
    steps = max((int(p.name.split("-")[1]) for p in (work / "runs" / "tiny").glob("step-*")), default=0)
    report = {
        "seconds": args.seconds,
        "code": str(Path(longctx.__file__).parent.parent),
        "calls": calls,
        "training_steps_pruned_during_the_race": steps,
        "outcomes": dict(outcomes),
        "examples": examples,
    }
    print(json.dumps(report, indent=2))
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
