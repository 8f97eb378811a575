"""Training: exact resume, checkpoints, budgets, bad steps, run-folder rules."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from longctx.checkpoint import find_checkpoints, load_checkpoint
from longctx.config import load_config, overrides_for
from longctx.data import bundled_documents
from longctx.errors import LongctxError
from longctx.train import RunOptions, lr_at, train


def tiny_overrides(tmp_path, **extra):
    text_dir = tmp_path / "data"
    if not text_dir.exists():
        text_dir.mkdir()
        for doc in bundled_documents()[:3]:
            with doc.open() as f:
                (text_dir / doc.name.split("/")[-1]).write_bytes(f.read()[:6000])
    base = {
        "model.n_layer": 1,
        "model.d_model": 32,
        "model.n_head": 2,
        "model.d_ff": 64,
        "model.transformer.window": 16,
        "train.seq_len": 16,
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "train.log_interval": 1,
        "train.eval_interval": 1000,
        "train.save_interval": 1000,
        "train.warmup_steps": 2,
        "train.eval_tokens": 512,
        "train.threads": 1,
        "data.paths": [str(text_dir)],
        "data.cache_dir": str(tmp_path / "cache"),
    }
    return base | extra


def losses(run_dir):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # the schedule length is fixed (lr_decay_steps) so that both runs follow the same learning rates
    full = tmp_path / "full"
    cfg = load_config(
        "transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 7, "train.lr_decay_steps": 7})
    )
    train(cfg, RunOptions(out_dir=full, progress=False))

    part = tmp_path / "part"
    cfg4 = load_config(
        "transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.lr_decay_steps": 7})
    )
    train(cfg4, RunOptions(out_dir=part, progress=False))
    overrides = {"train.max_steps": 7}
    train(
        load_config("transformer-small", tiny_overrides(tmp_path, **overrides)),
        RunOptions(out_dir=part, resume="auto", progress=False),
        overrides,
    )

    assert losses(part) == losses(full)  # same losses, step by step (CPU, fp32, same seed)
    a, _, _ = load_checkpoint(find_checkpoints(full)[-1])
    b, _, _ = load_checkpoint(find_checkpoints(part)[-1])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 2}))
    result = train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    model, tokenizer, config = load_checkpoint(result.last_checkpoint)
    # the trainer takes the vocabulary and the separator from the tokenizer
    assert config.model == dataclasses.replace(cfg.model, separator_id=tokenizer.sep_id)
    assert tokenizer.vocab_size == config.model.vocab_size and config.model.separator_id == 256
    assert set(p.name for p in result.last_checkpoint.iterdir()) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.safetensors",
        "trainer_state.json",
    }
    tokens = torch.randint(0, 257, (2, 20))
    again, _, _ = load_checkpoint(result.last_checkpoint)
    with torch.no_grad():
        la = model(tokens, model.init_state(2)).logits
        lb = again(tokens, again.init_state(2)).logits
    assert torch.equal(la, lb)
    assert again.head.weight.data_ptr() == again.embed.weight.data_ptr()  # tying survives loading


def test_keep_last_and_final_checkpoint(tmp_path):
    cfg = load_config(
        "transformer-small",
        tiny_overrides(tmp_path, **{"train.max_steps": 5, "train.save_interval": 1, "train.keep_last": 2}),
    )
    train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-00000004", "step-00000005"]
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_token_budget_stops_training(tmp_path):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_tokens": 200}))
    result = train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    assert result.steps == 4 and result.tokens == 4 * 4 * 16  # 64 tokens per step: 4 steps reach 200


def test_non_empty_out_dir_is_refused_without_resume_or_overwrite(tmp_path):
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    with pytest.raises(LongctxError, match="not empty"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    before = find_checkpoints(tmp_path / "run")
    assert before  # the refused run lost nothing
    train(cfg, RunOptions(out_dir=tmp_path / "run", overwrite=True, progress=False))


def test_overwrite_deletes_nothing_when_the_command_is_wrong(tmp_path):
    """--overwrite with missing data or an incompatible --init-from: refused before the old run is touched."""
    from longctx.errors import ConfigError, DataError

    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    keep = tmp_path / "keep"
    train(cfg, RunOptions(out_dir=keep, progress=False))
    before = sorted(p.name for p in keep.iterdir())
    bad_data = load_config(
        "transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1, "data.paths": [str(tmp_path / "nodir")]})
    )
    with pytest.raises(DataError):
        train(bad_data, RunOptions(out_dir=keep, overwrite=True, progress=False))
    xl = load_config(
        "xl-small",
        overrides_for("xl-small", tiny_overrides(tmp_path, **{"train.max_steps": 1, "model.xl.mem_len": 16})),
    )
    with pytest.raises(ConfigError, match=r"--init-from .*model.decoder = \"transformer\" there, \"xl\" here"):
        train(xl, RunOptions(out_dir=keep, overwrite=True, init_from=str(find_checkpoints(keep)[-1]), progress=False))
    same = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    with pytest.raises(ConfigError, match="--overwrite would empty"):  # it would delete its own starting point
        train(same, RunOptions(out_dir=keep, overwrite=True, init_from=str(find_checkpoints(keep)[-1]), progress=False))
    assert sorted(p.name for p in keep.iterdir()) == before
    assert find_checkpoints(keep) and (keep / "metrics.jsonl").read_text()


def test_held_out_documents_are_named_and_a_too_short_one_is_warned_about(tmp_path, caplog):
    import logging

    data = tmp_path / "six"
    data.mkdir()
    for i in range(5):
        (data / f"doc{i}.txt").write_text("some text to train on. " * 40)
    (data / "doc9.txt").write_text("a held-out file of forty-five bytes, no more.")
    cfg = load_config(
        "transformer-small",
        tiny_overrides(tmp_path, **{"train.max_steps": 1, "train.seq_len": 64, "data.paths": [str(data)]}),
    )
    with caplog.at_level(logging.INFO, logger="longctx"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 held-out document (doc9.txt), 46 tokens" in m for m in messages), messages
    assert any(
        "validation will not run" in m and r.levelno == logging.WARNING for m, r in zip(messages, caplog.records)
    )


def test_bpe_prints_the_size_it_learned(tmp_path, caplog):
    """--vocab-size 100000 on a small corpus learns far fewer tokens; the size said is the real one."""
    import logging

    cfg = load_config(
        "transformer-small",
        tiny_overrides(tmp_path, **{"train.max_steps": 1, "data.tokenizer": "bpe", "data.vocab_size": 100000}),
    )
    with caplog.at_level(logging.INFO, logger="longctx"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    learned = json.loads((find_checkpoints(tmp_path / "run")[-1] / "config.json").read_text())["model"]["vocab_size"]
    messages = [r.getMessage() for r in caplog.records]
    assert learned < 100000 and any(f"learned {learned} tokens" in m for m in messages), messages
    assert not any("(100000 tokens)" in m for m in messages), messages


def test_non_finite_loss_skips_steps_then_stops(tmp_path, monkeypatch):
    cfg = load_config(
        "transformer-small",
        tiny_overrides(tmp_path, **{"train.max_steps": 10, "train.max_bad_steps": 3, "train.save_interval": 2}),
    )
    import longctx.model as model_module

    real = model_module.LongContextLM.forward
    calls = {"n": 0}

    def poisoned(self, tokens, state, targets=None):
        out = real(self, tokens, state, targets)
        calls["n"] += 1
        if self.training and calls["n"] > 4:  # after 2 good steps (2 micro-batches each), every loss is NaN
            return type(out)(out.logits, out.state, out.loss * float("nan"), out.aux_loss, out.stats)
        return out

    monkeypatch.setattr(model_module.LongContextLM, "forward", poisoned)
    with pytest.raises(LongctxError, match="3 non-finite steps in a row at step 5"):
        train(cfg, RunOptions(out_dir=tmp_path / "run", progress=False))
    ckpts = find_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-00000002"]
    model, _, _ = load_checkpoint(ckpts[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config("transformer-small", {"train.warmup_steps": 10, "train.max_steps": 110}).train
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 10)
    assert lr_at(9, cfg) == pytest.approx(cfg.lr)
    assert lr_at(60, cfg) == pytest.approx(cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr))
    assert lr_at(110, cfg) == pytest.approx(cfg.min_lr)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))
    assert not math.isnan(lr_at(10_000, cfg))


# --------------------------------------------------------------------------------------------------------------------
# parameter groups


def _tiny_model(decoder: str, **sub):
    from longctx.config import Config
    from longctx.model import build_model

    model = {"decoder": decoder, "n_layer": 2, "d_model": 32, "n_head": 2, "d_ff": 64, "vocab_size": 61, **sub}
    torch.manual_seed(0)
    return build_model(Config.from_dict({"model": model}).model)


@pytest.mark.parametrize(
    "decoder,sub,position",
    [
        ("xl", {"xl": {"span_mode": "adaptive", "mem_len": 8}}, "mix.span.ratio"),
        ("xl", {"xl": {"span_mode": "dynamic", "mem_len": 8}}, "mix.span.proj.bias"),
        ("aft", {"aft": {"variant": "local", "window": 4}}, "mix.bias"),
    ],
)
def test_parameter_groups(decoder, sub, position):
    from longctx.train import parameter_groups

    model = _tiny_model(decoder, **sub)
    groups = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert sum(map(len, by_group.values())) == len(names)  # every parameter in exactly one group
    assert any(n.endswith(position) for n in by_group["position"])
    assert "embed.weight" in by_group["decay"]  # the tied embedding is the one matrix named "embed.weight"
    assert all(n.endswith("weight") for n in by_group["decay"])
    assert not any("norm" in n for n in by_group["decay"])  # norm gains are 1-D: never decayed
    assert not any(n.endswith(("pos_bias_u", "pos_bias_v", "bias")) for n in by_group["decay"])


def test_position_parameters_move_position_lr_scale_times_faster():
    """Adam's first step moves every parameter with a non-zero gradient by the learning rate (up to eps): the span
    ratios must move ``train.position_lr_scale`` times as far as an ordinary bias, and lose nothing to weight decay."""
    from longctx.config import TrainConfig
    from longctx.train import make_optimizer

    model = _tiny_model("xl", xl={"span_mode": "adaptive", "mem_len": 8, "span_init": 0.5})
    cfg = TrainConfig(lr=1e-3, position_lr_scale=10.0, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    ratio = model.decoder.blocks[0].mix.span.ratio
    norm_bias = model.norm.bias
    before_ratio, before_bias = ratio.detach().clone(), norm_bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    torch.testing.assert_close((before_ratio - ratio.detach()).abs(), torch.full_like(ratio, 1e-2), rtol=1e-3, atol=0)
    torch.testing.assert_close(
        (before_bias - norm_bias.detach()).abs(), torch.full_like(norm_bias, 1e-3), rtol=1e-3, atol=0
    )


def test_final_validation_and_learned_spans_reach_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        "xl-span-small",
        overrides_for("xl-span-small", tiny_overrides(tmp_path, **{"train.max_steps": 3, "model.xl.mem_len": 16})),
    )
    train(cfg, RunOptions(out_dir=out, progress=False))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r]
    assert final and final[-1]["step"] == 3
    spans = final[-1]["learned"]["spans"]
    assert len(spans) == 1 and len(spans[0]) == 2  # one layer, two heads


def test_csv_logger_mirrors_metrics_and_is_trimmed_on_resume(tmp_path):
    import csv

    from longctx.errors import ConfigError
    from longctx.run_folder import CSV_COLUMNS

    out = tmp_path / "run"
    extra = {"train.max_steps": 4, "train.save_interval": 2, "train.eval_interval": 2}
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **extra))
    train(cfg, RunOptions(out_dir=out, progress=False, loggers=("csv",)))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2", "3", "4"]
    assert [r["step"] for r in rows if r["val_loss"]] == ["2", "4"]
    # a kill after step 4's lines but before its checkpoint: resuming from step 2 drops steps 3-4 from both files
    from longctx.checkpoint import remove_checkpoint

    remove_checkpoint(out / "step-00000004")
    train(cfg, RunOptions(out_dir=out, progress=False, resume="auto", loggers=("csv",)), {})
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2", "3", "4"]
    with pytest.raises(ConfigError, match="not a logger"):
        train(cfg, RunOptions(out_dir=tmp_path / "x", progress=False, loggers=("wandb",)))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            train(cfg, RunOptions(out_dir=tmp_path / "y", progress=False, loggers=("tensorboard",)))
        assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())


def test_before_step_is_called_before_every_step_and_can_change_the_run(tmp_path):
    """``RunOptions.before_step`` (the extension point of experiments) runs once per step, before it; emptying the
    lanes' states there changes the losses from the second step on (the memory is no longer carried)."""
    cfg = load_config("transformer-small", tiny_overrides(tmp_path, **{"train.max_steps": 4}))
    seen = []

    def empty(trainer):
        seen.append(trainer.step)
        trainer.reset_states()

    train(cfg, RunOptions(out_dir=tmp_path / "plain", progress=False))
    train(cfg, RunOptions(out_dir=tmp_path / "reset", progress=False, before_step=empty))
    assert seen == [0, 1, 2, 3]
    plain, reset = losses(tmp_path / "plain"), losses(tmp_path / "reset")
    assert plain[1] == reset[1]  # the first step starts from empty states either way
    assert plain[4] != reset[4]
