"""Configuration: presets, dotted overrides with type checks, unknown keys, ranges, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx.config import (
    DEFAULT_PRESET,
    AFTConfig,
    Config,
    ModelConfig,
    TrainConfig,
    list_presets,
    load_config,
    parse_set_args,
    preset_dir,
)
from longctx.errors import ConfigError, LongctxError
from longctx.model import build_model

# --------------------------------------------------------------------------------------------------------------------
# presets


def test_load_a_preset() -> None:
    cfg = load_config("transformer-small")
    assert isinstance(cfg, Config)
    assert cfg.preset == "transformer-small"
    assert cfg.model.decoder == "transformer"
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.d_ff) == (6, 256, 4, 1024)
    assert cfg.model.transformer.window == 256
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)


def test_no_name_means_the_default_preset_the_infinite_former() -> None:
    assert DEFAULT_PRESET == "infinite-small" and DEFAULT_PRESET in list_presets()
    cfg = load_config()
    assert cfg.preset == "infinite-small" and cfg.model.decoder == "infinite"
    assert load_config("infinite-small").to_dict() == cfg.to_dict()
    # same size class as the baseline
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.d_ff) == (6, 256, 4, 1024)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("no-such-preset")
    message = str(info.value)
    assert "no-such-preset" in message
    for name in list_presets():
        assert name in message
    assert issubclass(ConfigError, LongctxError)


def test_close_preset_name_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean transformer-small"):
        load_config("transformer-smal")


def test_preset_by_path(tmp_path: Path) -> None:
    bundled = preset_dir() / "transformer-small.toml"
    assert load_config(str(bundled)).to_dict() | {"preset": ""} == load_config("transformer-small").to_dict() | {
        "preset": ""
    }

    path = tmp_path / "mine.toml"
    path.write_text("[model]\nn_layer = 3\n\n[model.transformer]\nwindow = 16\n\n[train]\nlr = 5e-4\n")
    cfg = load_config(str(path))
    assert cfg.model.n_layer == 3 and cfg.model.transformer.window == 16 and cfg.train.lr == 5e-4
    assert cfg.model.d_model == ModelConfig().d_model  # unset keys keep their defaults
    assert cfg.preset == str(path)


def test_missing_or_invalid_preset_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


def test_unknown_key_in_preset_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[train]\nwarmup_step = 10\n")
    with pytest.raises(ConfigError, match=r"train\.warmup_step.*did you mean train\.warmup_steps"):
        load_config(str(path))


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_parses_and_builds(name: str) -> None:
    cfg = load_config(name)
    model = build_model(cfg.model)
    assert model.num_parameters() > 0
    with torch.no_grad():
        out = model(torch.zeros(1, 3, dtype=torch.long), model.init_state(1))
    assert out.logits.shape == (1, 3, cfg.model.vocab_size)


# --------------------------------------------------------------------------------------------------------------------
# overrides


def test_string_overrides_are_parsed_and_type_checked() -> None:
    cfg = load_config(
        "transformer-small",
        {
            "train.lr": "3e-4",
            "train.seq_len": "512",
            "model.transformer.window": "64",
            "train.precision": "bf16",
            "data.paths": "a.txt,b.txt",
            "train.device": "cpu",
        },
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.seq_len == 512 and isinstance(cfg.train.seq_len, int)
    assert cfg.model.transformer.window == 64
    assert cfg.train.precision == "bf16"
    assert cfg.data.paths == ["a.txt", "b.txt"]
    assert cfg.train.device == "cpu"
    # ints are accepted for float keys and become floats
    cfg = load_config(None, {"train.lr": "1"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.seq_len", "abc"),
        ("train.seq_len", "1.5"),  # float for an int key
        ("train.seq_len", "true"),  # bool is not an int
        ("train.lr", "fast"),
        ("train.precision", "fp16"),  # not one of the Literal choices
        ("model.decoder", "no-such-decoder"),
        ("data.paths", 3),
    ],
)
def test_override_with_wrong_type_is_an_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("transformer-small", {key: value})


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("train.lrr", "train.lr"), ("trian.lr", "train"), ("model.transformer.windw", "model.transformer.window")],
)
def test_unknown_key_suggests_the_closest(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("transformer-small", {key: "1"})
    message = str(info.value)
    assert "unknown config key" in message
    assert f"did you mean {suggestion}?" in message


def test_keys_that_are_tables_or_leaves_are_errors() -> None:
    with pytest.raises(ConfigError, match="is a table"):
        load_config(None, {"model.transformer": "1"})
    with pytest.raises(ConfigError, match="has no sub-keys"):
        load_config(None, {"train.lr.x": "1"})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.seq_len": "0"}, "train.seq_len"),
        ({"train.lr": "-1e-3"}, "train.lr"),
        ({"train.lr": "0"}, "train.lr"),
        ({"train.batch_size": "6", "train.micro_batch_size": "4"}, "train.batch_size"),
        ({"train.min_lr": "1e-2"}, "train.min_lr"),  # above train.lr
        ({"model.d_model": "30"}, "model.d_model"),  # not divisible by n_head = 4
        ({"model.dropout": "1.0"}, "model.dropout"),
        ({"model.transformer.window": "0"}, "model.transformer.window"),
        ({"train.device": "tpu"}, "train.device"),
        ({"data.vocab_size": "10"}, "data.vocab_size"),
    ],
)
def test_out_of_range_values_are_errors(overrides: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("transformer-small", overrides)


def test_dataclasses_validate_directly() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(seq_len=0)
    with pytest.raises(ConfigError):
        ModelConfig(decoder="transformer", d_model=32, n_head=32)  # head width 1 is odd: no rotary pairs
    assert TrainConfig(batch_size=8, micro_batch_size=2).micro_batch_size == 2


def test_position_rules_apply_to_the_decoders_that_need_them() -> None:
    """Even head widths for rotary positions, an even d_model for sinusoidal tables; AFT has neither."""
    for decoder in ("transformer", "perceiver_ar", "combiner"):
        with pytest.raises(ConfigError, match="must be even for the rotary positions"):
            ModelConfig(decoder=decoder, d_model=36, n_head=12)  # head width 3
    for decoder in ("xl", "infinite"):
        with pytest.raises(ConfigError, match="must be even for the sinusoidal relative positions"):
            ModelConfig(decoder=decoder, d_model=33, n_head=3)
        assert ModelConfig(decoder=decoder, d_model=36, n_head=12).head_dim == 3  # no per-head rule
    odd = [
        ModelConfig(decoder="xl", d_model=36, n_head=12, vocab_size=61),
        ModelConfig(decoder="infinite", d_model=36, n_head=12, vocab_size=61),
        ModelConfig(decoder="aft", d_model=33, n_head=3, vocab_size=61, aft=AFTConfig(heads=3)),
    ]
    for cfg in odd:  # and such models run
        model = build_model(cfg).eval()
        with torch.no_grad():
            out = model(torch.randint(0, 61, (1, 9)), model.init_state(1))
        assert torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------------------------------------------------
# round trips and --set parsing


def test_dict_and_json_round_trip() -> None:
    cfg = load_config("transformer-small", {"train.lr": "3e-4", "data.paths": "x.txt"})
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    assert Config.from_dict({}) == Config()


def test_from_dict_rejects_unknown_keys_and_non_tables() -> None:
    data = load_config().to_dict()
    data["train"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"did you mean train\.lr\?"):
        Config.from_dict(data)
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_dict({"model": 3})


def test_parse_set_args() -> None:
    assert parse_set_args(["train.lr=3e-4", " model.n_layer = 2 ", "data.paths=a=b"]) == {
        "train.lr": "3e-4",
        "model.n_layer": "2",
        "data.paths": "a=b",
    }
    assert parse_set_args([]) == {}
    for bad in ("train.lr", "=3", " =3"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_set_args([bad])


def test_options_of_a_decoder_the_config_does_not_use_are_refused() -> None:
    with pytest.raises(ConfigError, match="model.infinite.mem_len is an option of the infinite decoder"):
        load_config("xl-small", {"model.infinite.mem_len": 5})
    # switching the decoder makes its section apply (the preset's own section stays, unused)
    assert (
        load_config("xl-small", {"model.decoder": "infinite", "model.infinite.mem_len": 8}).model.infinite.mem_len == 8
    )


def test_a_preset_file_with_another_decoders_table_is_refused(tmp_path) -> None:
    preset = tmp_path / "mine.toml"
    preset.write_text('[model]\ndecoder = "xl"\n\n[model.infinite]\nmem_len = 8\n')
    with pytest.raises(ConfigError, match=r"sets \[model.infinite\] but its decoder is 'xl'"):
        load_config(str(preset))
    preset.write_text('[model]\ndecoder = "xl"\n\n[model.infinite]\nmem_len = 256\n')  # the default: harmless
    assert load_config(str(preset)).model.decoder == "xl"


def test_overrides_for_keeps_each_decoders_own_options() -> None:
    from longctx.config import overrides_for

    mixed = {"model.d_model": "64", "model.xl.mem_len": "16", "model.infinite.mem_len": "16"}
    assert overrides_for("xl-small", mixed) == {"model.d_model": "64", "model.xl.mem_len": "16"}
    assert overrides_for("xl-small", mixed | {"model.decoder": "infinite"}) == {
        "model.d_model": "64",
        "model.infinite.mem_len": "16",
        "model.decoder": "infinite",
    }
