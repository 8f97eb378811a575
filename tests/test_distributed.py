"""Data-parallel training (DDP, gloo, 2 CPU processes) equals single-process training with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from test_train import losses, tiny_overrides

from longctx.config import load_config
from longctx.train import RunOptions, train

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from longctx import distributed
    from longctx.config import load_config
    from longctx import train as T

    overrides, out_dir, report = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    step = T.Trainer.train_step
    gaps = []

    def checked(self):  # after every step: the largest difference between this rank's parameters and rank 0's
        result = step(self)
        flat = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        gaps.append(max((part - flat).abs().max().item() for part in distributed.gather_tensor(self.dist, flat)))
        return result

    T.Trainer.train_step = checked
    T.train(load_config("transformer-small", overrides), T.RunOptions(out_dir=out_dir, progress=False))
    with open(report, "w") as f:
        json.dump(gaps, f)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    steps = 5
    overrides = tiny_overrides(tmp_path, **{"train.max_steps": steps, "train.micro_batch_size": 1})
    single = tmp_path / "single"
    train(load_config("transformer-small", overrides), RunOptions(out_dir=single, progress=False))

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        report = str(tmp_path / f"{rank}.json")
        cmd = [sys.executable, str(script), json.dumps(overrides), str(tmp_path / "ddp"), report]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]

    for rank in range(2):  # rank 1 holds exactly rank 0's parameters after every step
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [0.0] * steps
    # Same global batch and seed: the gradients are the same sums taken in another order (an all-reduce of two
    # halves), so the losses agree to float32 rounding; 1e-5 relative is far above it and far below a real change.
    one, two = losses(single), losses(tmp_path / "ddp")
    assert one.keys() == two.keys() == set(range(1, steps + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), step
    assert not (tmp_path / "ddp" / "metrics.jsonl").read_text().count('"step": 1,') > 1  # only rank 0 logs
