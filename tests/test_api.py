"""The high-level API (``longctx.generate``, ``longctx.stream``, ``longctx.evaluate``) gives what the CLI gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import Workspace, run_inprocess, ws  # noqa: F401 - the CLI tests' trained workspace

import longctx
from longctx.errors import ConfigError


def test_generate_equals_the_cli_and_stream_yields_the_same_text(ws: Workspace) -> None:  # noqa: F811
    cli = run_inprocess(
        ws.root,
        "generate",
        "--model",
        ws.ckpt,
        "--prompt",
        "Hello there",
        "-n",
        "40",
        "--seed",
        "3",
        "--top-k",
        "0",
        "-q",
    )
    assert cli.code == 0, cli.err
    text = longctx.generate(ws.ckpt, "Hello there", max_new_tokens=40, seed=3, top_k=0)
    assert text + "\n" == cli.out
    pieces = list(longctx.stream(ws.ckpt, "Hello there", max_new_tokens=40, seed=3, top_k=0))
    assert "".join(pieces) == text and len(pieces) > 1
    assert not torch.is_inference_mode_enabled()  # the iterator leaves no global mode behind


def test_evaluate_equals_eval_json(ws: Workspace) -> None:  # noqa: F811
    cli = run_inprocess(ws.root, "eval", ws.eval_file, "--model", ws.ckpt, "--max-tokens", "100", "--json", "-q")
    assert cli.code == 0, cli.err
    expected = json.loads(cli.out)
    result = longctx.evaluate(ws.ckpt, [ws.eval_file], max_tokens=100)
    for key in ("tokens", "bytes", "loss", "bits_per_byte", "ppl"):
        assert result[key] == expected[key], key
    text = Path(ws.eval_file).read_text(encoding="utf-8", errors="replace")
    from_text = longctx.evaluate(ws.ckpt, text[:300], text=True)
    from_file = longctx.evaluate(ws.ckpt, [ws.eval_file], max_tokens=len(text[:300].encode()))
    assert from_text["tokens"] == len(text[:300].encode()) and from_text["loss"] == pytest.approx(from_file["loss"])


def test_a_model_in_memory_and_a_wrong_argument() -> None:
    model = longctx.build_model(longctx.ModelConfig(n_layer=1, d_model=32, n_head=2, d_ff=64))
    assert isinstance(longctx.generate(model, "abc", max_new_tokens=5, seed=0), str)
    assert longctx.evaluate(model, "some text", text=True)["tokens"] == 9
    with pytest.raises(ConfigError, match="checkpoint path or a LongContextLM"):
        longctx.generate(42, "abc")  # type: ignore[arg-type]
