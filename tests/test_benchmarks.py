"""The benchmark scripts run (a seconds-long smoke run on a tiny config; the figures themselves are not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--smoke", "--output", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(res.stdout) == result
    assert {run["precision"] for run in result["results"]} == {"fp32", "bf16"}
    assert all(run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 for run in result["results"])
