"""Why do the AFT presets stop learning? Four short trainings of one AFT preset that separate two causes.

At the budgets of ``quality.py`` the training loss of every AFT preset stops falling near 2.5 nats per byte, where the
other decoders go on to 2.1-2.2. Two causes are plausible, and this script trains the preset under the four
combinations of their remedies (one seed, data order and learning-rate schedule for all), plus a reference preset:

* **The far sums dilute the window.** Every token beyond the position-bias window enters the running sums with
  bias 0 (Zhai et al. 2021, eq. 3), so after t tokens the window's ``s`` terms carry about ``s * exp(b) / t`` of the
  total weight (the denominator). The trainer carries each lane's state from segment to segment (tens of thousands
  of tokens per lane), so the window is drowned. Remedy tested: ``reset``, the lane states are emptied before every
  training step, as when the paper trains on fixed-length sequences; the sums then cover at most ``train.seq_len``
  tokens.
* **The position biases learn too slowly.** ``b(δ)`` starts at 0 (conv: γ = β = 0) and AdamW moves a parameter by
  about the learning rate per step, so after a few hundred steps at ``lr <= 1e-3`` no distance is weighted much above
  any other. Remedy tested: ``--bias-rate R``, the biases are parameterised as ``R * θ`` (the same function at
  initialisation: θ starts at 0, and for conv γ = β = 0), so that Adam moves them R times faster. (As 2-D
  parameters, local and full biases also get the trainer's weight decay; at 0.1 x lr per step it is negligible.)

Conditions: ``carried`` (the trainer as it is), ``reset``, ``carried, bias x R``, ``reset, bias x R`` and the
reference preset as it is. Each trains ``--steps`` steps with the preset's warm-up and the cosine decay of a
``--schedule-steps`` run (default 245, the length of the 500k-token runs of ``quality.py``, which shorten the
warm-up to a tenth of the run; this script does not). Per condition the report holds the training losses of every
logged step, the mean of the last three, ``train_wall_s`` (training with its validation and checkpoint), the
trainer's validation at the end (carry mode over the first ``train.eval_tokens`` held-out tokens) and the largest
position bias per layer; the report also counts the document boundaries each lane crosses in ``--steps`` and in
``--schedule-steps`` steps (the trainer carries states across them).

How to run::

    python benchmarks/aft_stall.py --threads 1                       # aft-local-small, 150 steps each (~20 min)
    python benchmarks/aft_stall.py --preset aft-conv-small --bias-rate 10
    python benchmarks/aft_stall.py --smoke --output /tmp/stall.json  # tiny, seconds (CI)

The diagnosis is of the AFT as it was before the decayed far past: every condition runs with ``OLD_FORM`` (the
paper's undecayed far sums, position parameters at the base learning rate, the memory carried across document
separators), which the AFT presets replaced by the remedies this script pointed to.

Both remedies are hooks of this script only (the trainer's ``before_step`` extension point, a patched bias
function); ``longctx train`` is unchanged. The report goes to stdout and ``--output`` (default
``benchmarks/results/aft_stall.json``), progress to stderr; run folders go to ``--out-dir`` (default
``benchmarks/results/aft-stall-runs``, overwritten).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, TINY_MODEL_OVERRIDES, log, machine_info, timestamp, write_report  # noqa: E402

import longctx.train as train_module  # noqa: E402
from longctx.checkpoint import load_weights  # noqa: E402
from longctx.config import Config, load_config, overrides_for  # noqa: E402
from longctx.data import Lanes  # noqa: E402
from longctx.decoders.aft import AFTMixer  # noqa: E402
from longctx.errors import ConfigError  # noqa: E402
from longctx.model import build_model  # noqa: E402
from longctx.run_folder import METRICS_FILE  # noqa: E402
from longctx.tokenizer import Tokenizer  # noqa: E402

OLD_FORM = {"model.aft.far": "uniform", "train.position_lr_scale": 1.0, "model.reset_at_separator": False}


def empty_states(trainer: train_module.Trainer) -> None:
    """Before each step, every lane's state emptied: sums over one segment only (``RunOptions.before_step``)."""
    trainer.reset_states()


@contextlib.contextmanager
def scaled_biases(bias_rate: float) -> Iterator[None]:
    """AFT position biases ``b(δ) = R θ(δ)`` for one training (and for reading its biases back), then the original."""
    log_bias = AFTMixer.log_bias
    if bias_rate != 1.0:

        def scaled(self: AFTMixer) -> torch.Tensor | None:
            b = log_bias(self)
            return None if b is None else bias_rate * b  # (H, s)

        AFTMixer.log_bias = scaled
    try:
        yield
    finally:
        AFTMixer.log_bias = log_bias


def max_bias(config: Config, checkpoint: Path) -> list[float] | None:
    """max_δ |b(δ)| per layer of a trained AFT model (under the hooks it was trained with); None for other decoders."""
    if config.model.decoder != "aft":
        return None
    model = build_model(config.model)
    load_weights(model, checkpoint / "model.safetensors")
    with torch.no_grad():
        biases = [block.mix.log_bias() for block in model.decoder.blocks]
    return [0.0 if b is None else b.abs().max().item() for b in biases]


def boundaries_read(config: Config, steps: list[int]) -> list[list[int]] | None:
    """For each step count, per lane, the document boundaries (SEP tokens after the lane's first) those steps read."""
    if config.data.tokenizer != "byte":
        return None
    tokenizer = Tokenizer.byte_level()
    tokens, _ = train_module.prepare_data(config, tokenizer)
    lanes = Lanes(tokens, config.train.batch_size, config.train.seq_len)
    starts = [b * lanes.lane_len for b in range(lanes.n_lanes)]
    reads = [min(n, lanes.segments_per_epoch) * lanes.seq_len for n in steps]
    return [[int((tokens[a + 1 : a + read] == tokenizer.sep_id).sum()) for a in starts] for read in reads]


def run_condition(
    name: str, preset: str, overrides: dict[str, Any], reset: bool, bias_rate: float, out_dir: Path
) -> dict[str, Any]:
    config = load_config(preset, overrides_for(preset, overrides))
    log(f"aft_stall: {name} ({preset}, {config.train.max_steps} steps)")
    started = time.monotonic()
    run = train_module.RunOptions(
        out_dir=out_dir, overwrite=True, progress=False, before_step=empty_states if reset else None
    )
    with scaled_biases(bias_rate):
        result = train_module.train(config, run)
        biases = max_bias(config, result.last_checkpoint) if result.last_checkpoint else None
    records = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    last = [losses[s] for s in sorted(losses)[-3:]]
    return {
        "preset": preset,
        "decoder": config.model.decoder,
        "reset_every_step": reset,
        "bias_rate": bias_rate,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_wall_s": time.monotonic() - started,
        "loss_last3": sum(last) / len(last) if last else None,
        "val_at_end": result.val,
        "max_bias_per_layer": biases,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="aft-local-small", help="the AFT preset to diagnose")
    p.add_argument(
        "--reference", default="transformer-small", help="a preset trained as it is, for comparison ('' for none)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per condition (default 150)")
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=None,
        help="the learning-rate schedule is that of a run of this many steps (default 245)",
    )
    p.add_argument("--bias-rate", type=float, default=30.0, help="R: the biases are R * θ (default 30)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens at the end (default 32768)")
    p.add_argument("--out-dir", type=Path, default=RESULTS / "aft-stall-runs")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 steps: checks that the script runs")
    args = p.parse_args(argv)
    if args.bias_rate <= 0 or not math.isfinite(args.bias_rate):
        p.error(f"--bias-rate must be a finite number > 0, got {args.bias_rate}")
    steps = args.steps or (3 if args.smoke else 150)
    schedule = args.schedule_steps or (3 if args.smoke else 245)
    if steps < 1 or schedule < steps:
        p.error(f"need 1 <= --steps ({steps}) <= --schedule-steps ({schedule})")
    overrides: dict[str, Any] = {
        "train.max_steps": steps,
        "train.lr_decay_steps": schedule,
        "train.threads": args.threads,
        "train.log_interval": 1 if args.smoke else 10,
        "train.eval_interval": steps,
        "train.save_interval": steps,
        "train.eval_tokens": args.eval_tokens or (512 if args.smoke else 32768),
    }
    overrides.update(OLD_FORM)
    if args.smoke:
        overrides.update(TINY_MODEL_OVERRIDES)
    try:
        config = load_config(args.preset, overrides_for(args.preset, overrides))
    except ConfigError as e:
        p.error(str(e))
    if config.model.decoder != "aft":
        p.error(
            f"--preset {args.preset} is not an AFT preset; give one of aft-simple-small, aft-local-small, "
            "aft-conv-small, aft-full-small"
        )
    conditions = [
        ("carried", args.preset, False, 1.0),
        ("reset", args.preset, True, 1.0),
        (f"carried, bias x {args.bias_rate:g}", args.preset, False, args.bias_rate),
        (f"reset, bias x {args.bias_rate:g}", args.preset, True, args.bias_rate),
    ]
    if args.reference:
        conditions.append((f"reference {args.reference}", args.reference, False, 1.0))
    started = time.monotonic()
    counted = boundaries_read(config, [steps, schedule]) or [None, None]
    boundaries = [{"steps": n, "per_lane": per_lane} for n, per_lane in zip([steps, schedule], counted, strict=True)]
    results = {}
    for i, (name, preset, reset, rate) in enumerate(conditions):
        results[name] = run_condition(name, preset, overrides, reset, rate, args.out_dir / f"condition-{i}")
    report = {
        "benchmark": "aft_stall",
        "timestamp": timestamp(),
        "argv": sys.argv[1:] if argv is None else argv,
        "smoke": args.smoke,
        "machine": machine_info(args.threads),
        "settings": {
            "preset": args.preset,
            "reference": args.reference,
            "steps": steps,
            "schedule_steps": schedule,
            "bias_rate": args.bias_rate,
            "overrides": overrides,
        },
        "document_boundaries_read": boundaries,
        "conditions": results,
        "wall_s": time.monotonic() - started,
    }
    output = args.output or (RESULTS / ("aft_stall_smoke.json" if args.smoke else "aft_stall.json"))
    write_report(report, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
