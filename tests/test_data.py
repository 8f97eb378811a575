"""Corpus discovery, split, token cache and lanes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from longctx.config import DataConfig
from longctx.data import Lanes, build_token_cache, bundled_documents, discover, split_documents
from longctx.errors import DataError
from longctx.tokenizer import Tokenizer


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bundled_corpus_is_installed_and_split_fixed():
    docs = bundled_documents()
    assert len(docs) == 42 and sum(d.size for d in docs) > 5_000_000
    train, val = split_documents(docs, 3)
    assert [d.name.split("/")[-1] for d in val] == [
        "twelfth_night_gut.txt",
        "two_gentlemen_of_verona_gut.txt",
        "winters_tale_gut.txt",
    ]
    assert len(train) == 39
    with val[0].open() as f:
        assert f.read(100).strip()


def test_discover_files_folders_globs(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "sub" / "b.txt", "beta")
    write(tmp_path / "sub" / ".hidden" / "c.txt", "hidden")
    write(tmp_path / "empty.txt", "")
    names = [os.path.basename(d.name) for d in discover([str(tmp_path)])]
    assert names == ["a.txt", "b.txt"]  # sorted, hidden and empty files skipped
    assert [d.name for d in discover([str(tmp_path / "*.txt")])] == [str(a)]
    assert len(discover([str(a), str(a)])) == 1  # no duplicates


def test_discover_skips_binary_files_and_run_folders(tmp_path, caplog):
    """`--data .` in a working folder: checkpoints, caches and binaries are not training data (one warning)."""
    import logging

    text = write(tmp_path / "play.txt", "To be, or not to be")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 and a long line of plain text".encode("latin-1"))
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "noise.dat").write_bytes(bytes(range(128, 256)) * 20)  # no NUL, but not UTF-8
    write(tmp_path / "runs" / "r" / "metrics.jsonl", '{"step": 1}\n')
    write(tmp_path / "runs" / "r" / "config.json", "{}")
    write(tmp_path / "runs" / "r" / "step-00000001" / "model.safetensors", "x")
    write(tmp_path / "runs" / "r" / "step-00000001" / "tokenizer.json", "{}")
    build_token_cache(discover([str(text)]), Tokenizer.byte_level(), tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="longctx"):
        names = sorted(os.path.basename(d.name) for d in discover([str(tmp_path)]))
    assert names == ["latin1.txt", "play.txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "2 files not text" in warnings[0], warnings
    assert "in a run folder or token cache" in warnings[0]


@pytest.mark.parametrize("bad, message", [("missing.txt", "does not exist"), ("empty.txt", "is empty")])
def test_discover_errors(tmp_path, bad, message):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match=message):
        discover([str(tmp_path / bad)])


def test_token_cache_is_built_once_and_rebuilt_when_stale(tmp_path):
    doc = write(tmp_path / "d.txt", "hello world")
    tok = Tokenizer.byte_level()
    root = tmp_path / "cache"
    tokens = build_token_cache(discover([str(doc)]), tok, root)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [tok.sep_id, *b"hello world"]
    assert len(list(root.glob("*.bin"))) == 1
    build_token_cache(discover([str(doc)]), tok, root)
    assert len(list(root.glob("*.bin"))) == 1  # reused
    doc.write_text("hello again, world")
    os.utime(doc, ns=(1, 1))
    tokens = build_token_cache(discover([str(doc)]), tok, root)
    assert tokens.tolist() == [tok.sep_id, *b"hello again, world"]


def test_lanes_are_contiguous_and_targets_shifted():
    stream = np.arange(1000, dtype=np.uint16)
    lanes = Lanes(stream, n_lanes=4, seq_len=10)
    assert lanes.lane_len == 250 and lanes.segments_per_epoch == 24
    x0, y0 = lanes.batch(0, range(4))
    x1, _ = lanes.batch(1, range(4))
    assert x0[:, 0].tolist() == [0, 250, 500, 750]
    assert (y0 == x0 + 1).all()
    assert (x1[:, 0] == x0[:, -1] + 1).all()  # the next segment continues each lane
    assert lanes.is_epoch_start(24) and not lanes.is_epoch_start(23)
    xa, _ = lanes.batch(24, range(4))
    assert (xa == x0).all()  # a new epoch starts the lanes again


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one segment"):
        Lanes(np.arange(50, dtype=np.uint16), n_lanes=4, seq_len=16)


def test_cache_root_honours_config(tmp_path):
    from longctx.data import cache_root

    assert cache_root(DataConfig(cache_dir=str(tmp_path))) == tmp_path
