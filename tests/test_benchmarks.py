"""The benchmark scripts run (a seconds-long smoke run on a tiny config; the figures themselves are not tested)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import load_config
from longctx.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def _run_smoke(script: str, tmp_path: Path, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``benchmarks/SCRIPT.py --smoke --output ... EXTRA``: exits 0, prints the JSON report it writes."""
    out = tmp_path / f"{script}.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", "--output", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert json.loads(res.stdout) == report
    return report, res


def _run_with_runs(script: str, tmp_path: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """The scripts that train: one thread, run folders under ``tmp_path``."""
    return _run_smoke(script, tmp_path, "--threads", "1", "--out-dir", str(tmp_path / "runs"))


def test_train_speed_smoke(tmp_path):
    result, _ = _run_smoke("train_speed", tmp_path)
    assert {run["precision"] for run in result["results"]} == {"fp32", "bf16"}
    # The FLOP count, recomputed here from the model the report describes: parameters outside the embedding,
    # the tied head, and a transformer query attending to its whole window (K = window).
    cfg = result["model"]
    model = build_model(
        load_config(
            "transformer-small",
            {f"model.{k}": v for k, v in cfg.items() if k in ("n_layer", "n_head", "d_model", "d_ff", "vocab_size")}
            | {"model.transformer.window": cfg["transformer"]["window"]},
        ).model
    )
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    d, L, V, K = cfg["d_model"], cfg["n_layer"], cfg["vocab_size"], cfg["transformer"]["window"]
    assert result["flops"]["flops_per_token"] == 6 * n + 6 * d * V + 12 * L * d * K
    # MFU = model FLOP/s over the matmul peak of the same run; a smoke run's tiny matmuls and a busy machine make
    # the peak itself noisy (a loaded run measured 1.4), so there is no bound on it, only its inputs
    for run in result["results"]:
        peak = result["matmul_peak"][run["precision"]]["flops_per_s"]
        assert run["tokens_per_s"] > 0
        assert run["mfu"] == pytest.approx(result["flops"]["flops_per_token"] * run["tokens_per_s"] / peak)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_per_position_file_names_follow_the_report():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    names = {
        name: quality.per_position_stem(Path("results") / name)
        for name in ("quality.json", "quality_smoke.json", "quality_500k.json", "run.json", "quality2.json")
    }
    assert names == {
        "quality.json": "per_position",
        "quality_smoke.json": "per_position_smoke",
        "quality_500k.json": "per_position_500k",
        "run.json": "run_per_position",
        "quality2.json": "quality2_per_position",
    }


def test_quality_smoke(tmp_path):
    report, res = _run_with_runs("quality", tmp_path)
    assert report["benchmark"] == "quality" and report["settings"]["tokens"] > 0
    assert len(report["presets"]) >= 2
    for preset, r in report["presets"].items():
        assert "error" not in r, (preset, r)
        assert r["tokens_trained"] >= report["settings"]["tokens"] and r["train_tokens_per_s"] > 0
        for key in ("carry_bpb", "cut_bpb", "reset_bpb", "delta_bpb", "reset_delta_bpb", "train_wall_s"):
            assert _finite(r[key]), (preset, key, r[key])
        assert r["window"] >= 1 and r["evaluation"]["cut"]["window"] == 2 * r["window"]
        assert isinstance(r["learned"], dict)  # the decoder's describe(): spans, biases, decays
        assert r["evaluation"]["carry"]["per_position"] and all(
            _finite(row["mean_nll"]) for row in r["evaluation"]["carry"]["per_position"]
        )
    # a one-layer sliding-window transformer reads its whole reach in cut mode: cut equals carry
    assert abs(report["presets"]["transformer-small"]["delta_bpb"]) < 1e-4
    csv_lines = Path(report["per_position_csv"]).read_text().splitlines()
    assert csv_lines[0] == "preset,decoder,mode,start,end,mean_nll,count" and len(csv_lines) > 3
    if report["per_position_png"] is None:  # only without matplotlib, and then it says so
        assert "plot skipped" in res.stderr
    else:
        assert Path(report["per_position_png"]).stat().st_size > 0
    # a second run finds the runs at their budget and the evaluations made: no training, same figures
    again, res2 = _run_with_runs("quality", tmp_path)
    assert "not training" in res2.stderr
    assert {p: r["carry_bpb"] for p, r in again["presets"].items()} == {
        p: r["carry_bpb"] for p, r in report["presets"].items()
    }


def test_sorting_smoke(tmp_path):
    report, _ = _run_with_runs("sorting", tmp_path)
    assert report["benchmark"] == "sorting" and report["task"]["vocabulary"]
    assert len(report["results"]) >= 2
    for preset, by_length in report["results"].items():
        for length, r in by_length.items():
            assert "error" not in r, (preset, length, r)
            assert r["steps"] == report["settings"]["steps"]
            for key in ("token_accuracy", "exact_match", "greedy_token_accuracy"):
                assert 0.0 <= r[key] <= 1.0
            assert _finite(r["final_loss"]) and r["train_tokens_per_s"] > 0
            assert 0.0 <= r["window_oracle"]["token_accuracy"] <= 1.0
    for by_window in report["teacher_forced_baselines"].values():
        assert 0.0 <= by_window["elimination"] <= 1.0 and by_window["window_counter"]
    # more steps continue each run from its checkpoint (written by longctx.checkpoint; the older ones pruned)
    more, res = _run_smoke("sorting", tmp_path, "--threads", "1", "--out-dir", str(tmp_path / "runs"), "--steps", "5")
    assert res.stderr.count("at step 3") == sum(len(by_length) for by_length in report["results"].values())
    for run_dir in (tmp_path / "runs").iterdir():
        assert [p.name for p in run_dir.glob("step-*")] == ["step-00000005"], run_dir
    assert all(r["steps"] == 5 for by_length in more["results"].values() for r in by_length.values())


def test_sorting_examples_are_deterministic_and_sorted():
    spec = importlib.util.spec_from_file_location("sorting_benchmark", ROOT / "benchmarks" / "sorting.py")
    sorting = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sorting)
    symbols, target = sorting.make_example(seed=3, split=1, index=7, length=500)
    again, same = sorting.make_example(seed=3, split=1, index=7, length=500)
    assert (symbols == again).all() and (target == same).all()
    assert not (sorting.make_example(3, 0, 7, 500)[0] == symbols).all()  # the splits differ
    assert sorted(target.tolist()) == list(range(20))
    counts = [int((symbols == s).sum()) for s in target]
    assert counts == sorted(counts, reverse=True)
    batch = sorting.make_batch(3, 1, 7, 2, 500)
    assert batch.shape == (2, 521) and batch[0, 500].item() == sorting.SEP
    assert (batch[0, 501:].numpy() == target).all()
    assert sorting.segment_bounds(1044, 256) == [(0, 20), (20, 276), (276, 532), (532, 788), (788, 1044)]
    # teacher-forced baselines: a counter over the whole sequence, given the earlier answers, is exact; elimination
    # alone (no symbol read) names the last target right every time, so it scores at least 1/20
    base = sorting.teacher_forced_baselines(argparse.Namespace(seed=3, eval_examples=4), 500, [8, 500])
    assert base["window_counter"]["500"] == 1.0
    assert 1 / 20 <= base["elimination"] < 1.0 and base["window_counter"]["8"] < 1.0


def test_speed_smoke(tmp_path):
    report, _ = _run_smoke("speed", tmp_path, "--set", "model.d_ff=48")  # --set reaches every part and child
    presets = report["presets"]
    assert report["overrides"] == {"model.d_ff": "48"}
    assert len(presets) >= 2
    for preset in presets:
        for precision in ("fp32", "bf16"):
            row = report["train"]["runs"][preset][precision]
            peak = report["train"]["matmul_peak_flops_per_s"][precision]
            assert row["tokens_per_s"] > 0 and row["mfu"] == pytest.approx(
                row["flops_per_token"] * row["tokens_per_s"] / peak
            )  # a bound would flake (see above)
        infer = report["infer"][preset]
        assert set(infer["decode_latency_s"]) == set(infer["ingest_tokens_per_s"]) == {"100", "400"}
        assert infer["flatness"] > 0 and infer["state_bytes"] == infer["state_bytes_empty"] > 0  # bounded state
        rss = report["rss"][preset]
        assert [r["bytes"] for r in rss["runs"]] == [2000, 8000] and all(r["peak_rss_bytes"] > 0 for r in rss["runs"])
        assert [r["tokens"] for r in rss["runs"]] == [2000, 8000]  # byte tokenizer: every byte scored
        smoke = load_config(preset, {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.d_ff": 48})
        expected = build_model(smoke.model).num_parameters()
        assert infer["parameters"] == expected and all(r["parameters"] == expected for r in rss["runs"])


def test_xl_speed_smoke(tmp_path):
    report, _ = _run_smoke("xl_speed", tmp_path)
    assert report["train"] and all(row["tokens_per_s"] > 0 for row in report["train"])
    assert report["eval"] and all(row["tokens_per_s"] > 0 for row in report["eval"])


def test_aft_stall_smoke(tmp_path):
    report, _ = _run_with_runs("aft_stall", tmp_path)
    runs = report["conditions"]
    rate = report["settings"]["bias_rate"]
    assert list(runs) == [
        "carried",
        "reset",
        f"carried, bias x {rate:g}",
        f"reset, bias x {rate:g}",
        "reference transformer-small",
    ]
    for r in runs.values():
        assert r["steps"] == report["settings"]["steps"] == 3 and _finite(r["loss_last3"])
    carried, reset, fast = runs["carried"], runs["reset"], runs[f"carried, bias x {rate:g}"]
    # step 1 starts from empty states either way; from step 2 the reset lanes see no carried memory
    assert carried["losses"]["1"] == reset["losses"]["1"] and carried["losses"]["2"] != reset["losses"]["2"]
    # b = R θ: after the same few Adam steps (about lr each for θ) the biases are about R times larger
    for slow, quick in zip(carried["max_bias_per_layer"], fast["max_bias_per_layer"], strict=True):
        assert 0.5 * rate < quick / slow < 1.5 * rate, (slow, quick)
    assert runs["reference transformer-small"]["max_bias_per_layer"] is None
    assert [len(counted["per_lane"]) for counted in report["document_boundaries_read"]] == [4, 4]  # smoke: 4 lanes


def test_aft_stall_counts_the_document_boundaries_lanes_cross(tmp_path):
    spec = importlib.util.spec_from_file_location("aft_stall_benchmark", ROOT / "benchmarks" / "aft_stall.py")
    stall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stall)
    config = load_config(
        "aft-local-small", {"train.batch_size": 4, "train.seq_len": 64, "data.cache_dir": str(tmp_path)}
    )
    one, whole = stall.boundaries_read(config, [1, 10**9])
    assert one == [0, 0, 0, 0]  # one segment of 64 bytes is inside a play
    # a whole epoch: the 39 training plays start with a separator, the first at lane 0's first token (not counted);
    # the others lie inside the lanes, except any in the last < 64 tokens of a lane that no step reads
    assert len(whole) == 4 and 36 <= sum(whole) <= 38 and all(n >= 8 for n in whole)
    assert stall.boundaries_read(load_config("aft-local-small", {"data.tokenizer": "bpe"}), [1]) is None


def test_reach_smoke(tmp_path):
    report, _ = _run_with_runs("reach", tmp_path)
    presets = report["presets"]
    assert set(presets) == {"transformer-small", "aft-local-small"}
    assert presets["transformer-small"]["theoretical_reach"] == 15  # 1 layer, window 16 (the tiny overrides)
    assert presets["aft-local-small"]["theoretical_reach"] is None
    for res in presets.values():
        assert "error" not in res, res
        assert [r["distance"] for r in res["recall"]["distances"]] == [16, 64]
        assert res["recall"]["tokens_trained"] == 6 * 4 * 32
        assert [r["distance"] for r in res["copy"]["distances"]] == [16, 64]
        assert [r["distance"] for r in res["context"]["distances"]] == [8, 32]
    # the tiny transformer sees 15 tokens back: the context beyond 32 tokens is worth nothing to it
    assert abs(presets["transformer-small"]["context"]["distances"][1]["gain_bits_per_byte"]) < 1e-4
    cache = json.loads((tmp_path / "runs" / "transformer-small" / "reach_probe.json").read_text())
    assert len(cache) == 2  # copy and context, reused by a second run with the same checkpoint and settings
