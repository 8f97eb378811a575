"""The README's commands agree with the presets: no `longctx train --max-steps N` example stops before
its preset's warm-up ends, unless it sets --warmup-steps itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from longctx.config import DEFAULT_PRESET, list_presets, load_config

README = Path(__file__).resolve().parent.parent / "README.md"


def train_commands() -> list[list[str]]:
    """The arguments after `longctx train` of every README line that runs it."""
    commands = []
    for line in README.read_text().splitlines():
        match = re.search(r"longctx train (.*)", line.split("#", 1)[0])
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_readme_training_examples_end_after_their_warm_up() -> None:
    commands = [args for args in train_commands() if "--max-steps" in args]
    assert commands
    for args in commands:
        if flag(args, "--warmup-steps") is not None or flag(args, "--resume") is not None:
            continue  # a warm-up of its own; a resumed run is past its warm-up
        preset = flag(args, "--preset") or DEFAULT_PRESET
        assert preset in list_presets(), args
        warmup = load_config(preset).train.warmup_steps
        assert int(flag(args, "--max-steps") or 0) > warmup, (args, f"{preset} warms up for {warmup} steps")


def test_the_quick_start_uses_the_tiny_preset() -> None:
    assert any(flag(args, "--preset") == "infinite-tiny" for args in train_commands())
