# ruff: noqa: F811  (the fixtures of test_cli are imported by name and used as arguments)
"""``longctx probe`` and ``longctx probe make-data`` through the command line (the tiny checkpoint of test_cli)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli import Result, Workspace, assert_user_error, bpe_ckpt, cli, ws  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def recall_dir(ws: Workspace) -> Path:  # noqa: F811
    from test_cli import run_inprocess

    out = ws.root / "recall"
    res = run_inprocess(
        ws.root, "probe", "make-data", "--out", out, "--docs", "3", "--queries", "4", "--distances", "16,64"
    )
    assert res.code == 0, res.err
    return out


def test_make_data_writes_train_test_and_spec(recall_dir: Path, cli: Callable[..., Result]) -> None:  # noqa: F811
    assert len(list((recall_dir / "train").glob("*.txt"))) == 3
    assert list((recall_dir / "test").glob("*.txt"))
    spec = json.loads((recall_dir / "recall.json").read_text(encoding="utf-8"))
    assert spec["distances"] == [16, 64] and spec["queries_per_distance"] == 4
    assert_user_error(cli("probe", "make-data", "--out", recall_dir), "not an empty folder")
    assert_user_error(cli("probe", "make-data", "--out", recall_dir / "x", "--task", "copy"), "recall only")


def test_make_data_density_flags(ws: Workspace, cli: Callable[..., Result], tmp_path: Path) -> None:  # noqa: F811
    """--list-share 1: every training document is a list of facts and questions; the spec records the flags."""
    out = tmp_path / "lists"
    args = ("--docs", "4", "--queries", "2", "--distances", "16", "--list-share", "1", "--event-every", "24")
    res = cli("probe", "make-data", "--out", out, *args)
    assert res.code == 0, res.err
    for doc in (out / "train").glob("*.txt"):
        events = doc.read_text(encoding="utf-8").split()
        assert events and all(len(e) == 2 and e[1].isdigit() for e in events), doc
    spec = json.loads((out / "recall.json").read_text(encoding="utf-8"))
    assert spec["list_share"] == 1.0 and spec["event_every"] == 24
    assert_user_error(cli("probe", "make-data", "--out", tmp_path / "bad", "--list-share", "2"), "list_share")
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_probe_recall_prints_accuracy_by_distance(
    recall_dir: Path,
    ws: Workspace,  # noqa: F811
    cli: Callable[..., Result],
    tmp_path: Path,
) -> None:  # noqa: F811
    res = cli(
        "probe",
        "--task",
        "recall",
        "--data",
        recall_dir / "test",
        "-m",
        ws.ckpt,
        "--json",
        "-o",
        tmp_path / "out" / "recall.json",
    )
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["task"] == "recall" and report["checkpoint"] == str(ws.ckpt) and report["chance"] == 0.1
    assert [(r["distance"], r["queries"]) for r in report["distances"]] == [(16, 4), (64, 4)]
    assert json.loads((tmp_path / "out" / "recall.json").read_text()) == report


def test_probe_copy_and_context_on_the_default_filler(ws: Workspace, cli: Callable[..., Result]) -> None:  # noqa
    res = cli("probe", "-m", ws.ckpt, "--distances", "8,32", "--trials", "2", "--span", "16")
    assert res.code == 0, res.err
    assert "longctx probe --task copy" in res.out and "gain_bits_per_byte" in res.out and "reach" in res.out
    res = cli("probe", "--task", "context", "-m", ws.ckpt, "--distances", "4,16", "--tokens", "256", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert [r["distance"] for r in report["distances"]] == [4, 16]
    assert all(r["tokens"] == 256 for r in report["distances"])


def test_probe_mistakes_are_one_line(
    ws: Workspace,
    cli: Callable[..., Result],
    recall_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert_user_error(cli("probe", "-m", ws.ckpt, "--task", "sorting"), "--task must be")
    assert_user_error(cli("probe", "-m", ws.ckpt, "--task", "recall"), "--data")
    assert_user_error(cli("probe", "-m", ws.ckpt, "--task", "recall", "--data", tmp_path), "recall.json")
    assert_user_error(cli("probe", "-m", ws.ckpt, "--distances", "8,x"), "--distances")
    short = tmp_path / "short.txt"
    short.write_text("only a few words of filler\n")
    assert_user_error(cli("probe", "-m", ws.ckpt, "--filler", short, "--distances", "1024"), "filler")
    assert_user_error(cli("probe", "--task", "context", "-m", ws.ckpt, "--filler", short), "need a document")
    assert_user_error(cli("probe", "-m", ws.ckpt, "--data", recall_dir / "test"), "--data")


def test_probe_plot(ws: Workspace, cli: Callable[..., Result], tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert_user_error(cli("probe", "-m", ws.ckpt, "--plot", tmp_path / "p.png"), "matplotlib")
        return
    res = cli("probe", "-m", ws.ckpt, "--distances", "8,32", "--trials", "2", "--plot", tmp_path / "p.png")
    assert res.code == 0, res.err
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert_user_error(cli("probe", "-m", ws.ckpt, "--plot", tmp_path / "q.png"), "pip install")


def test_probe_a_bpe_checkpoint_says_how_it_tokenized(
    bpe_ckpt: Path,
    cli: Callable[..., Result],  # noqa: F811
    recall_dir: Path,
) -> None:
    res = cli("probe", "-m", bpe_ckpt, "--distances", "16,64", "--trials", "2", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert any("tokenized separately" in note for note in report["notes"])
    res = cli("probe", "-m", bpe_ckpt, "--task", "recall", "--data", recall_dir / "test", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    asked = sum(r["queries"] for r in report["distances"])
    skipped = sum(int(n.split()[0]) for n in report["notes"] if "skipped" in n)
    assert asked + skipped == 2 * 4  # every question is scored or counted as skipped, never silently lost
