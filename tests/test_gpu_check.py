"""``benchmarks/gpu_check.sh --device cpu --smoke`` runs end to end (every stage, tiny sizes, no install): the GPU
check cannot rot unnoticed on machines without a GPU. 30-45 s on a busy 2-core machine (load 6-10)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--smoke",
            "--out",
            str(out),
            "--budget",
            "400",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s["status"] for s in summary["stages"]}
    assert stages == {
        "tests-gpu": "ok",
        "train_speed/transformer-small": "ok",
        "train_speed/perceiver-ar-small": "ok",
        "quality/transformer-small": "ok",
    }, summary["stages"]
    assert (out / "tests-gpu.xml").exists()
    for preset in ("transformer-small", "perceiver-ar-small"):
        report = json.loads((out / "train_speed" / f"{preset}.json").read_text())
        assert report["machine"]["device"] == "cpu" and report["results"][0]["precision"] == "bf16"
        speed = summary["train_speed_bf16"][preset]
        assert speed["tokens_per_s"] > 0 and speed["mfu"] > 0
    quality = summary["quality_bpb"]["transformer-small"]
    assert quality["tokens_trained"] > 0 and math.isfinite(quality["carry_bpb"])
