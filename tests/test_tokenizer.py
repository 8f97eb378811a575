"""Tokenizers: byte-level exactness, BPE round trips, incremental encoding equals one-shot encoding."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.errors import CheckpointError
from longctx.tokenizer import SEPARATOR, Tokenizer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak. — «ünïcödé» ✓ 日本\n"
) * 40


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT], vocab_size=400)


def test_byte_tokenizer_ids_are_bytes_and_match_hf():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 257 and tok.sep_id == 256
    ids = tok.encode_text(TEXT)
    assert ids.tolist() == list(TEXT.encode("utf-8"))
    assert tok.hf.encode(TEXT).ids == ids.tolist()  # the fast path agrees with the HF tokenizer it saves
    assert tok.decode(ids.tolist()) == TEXT


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_byte_tokenizer_round_trips_any_bytes(data):
    tok = Tokenizer.byte_level()
    ids = tok.encode_bytes(data)
    assert b"".join(tok.token_bytes[i] for i in ids) == data


def test_bpe_round_trip_and_compresses(bpe):
    ids = bpe.encode_text(TEXT)
    assert bpe.decode(ids.tolist()) == TEXT
    assert len(ids) < len(TEXT.encode()) / 2  # merges were learned
    assert int(bpe.token_lengths[ids].sum()) == len(TEXT.encode())  # token bytes are exact


def test_saved_tokenizer_loads_identically(bpe, tmp_path):
    for tok in (bpe, Tokenizer.byte_level()):
        tok.save(str(tmp_path / "tokenizer.json"))
        again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        assert again.kind == tok.kind and again.sha256 == tok.sha256
        assert again.encode_text(TEXT).tolist() == tok.encode_text(TEXT).tolist()


@pytest.mark.parametrize("chunk", [7, 100, 4096])
def test_incremental_encoding_equals_one_shot(bpe, chunk):
    data = TEXT.encode()
    pieces = list(bpe.iter_encode(io.BytesIO(data), chunk_bytes=chunk))
    assert np.concatenate([ids for ids, _ in pieces]).tolist() == bpe.encode_bytes(data).tolist()
    assert sum(n for _, n in pieces) == len(data)


def test_bpe_invalid_utf8_is_replaced_with_one_warning(bpe, caplog):
    data = b"good text\n" + b"bad \xff\xfe bytes\n" * 3
    with caplog.at_level(logging.WARNING, logger="longctx"):
        ids = np.concatenate([i for i, _ in bpe.iter_encode(io.BytesIO(data), where="x.txt", chunk_bytes=12)])
    assert "\ufffd" in bpe.decode(ids.tolist())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "x.txt" in warnings[0] and "byte 14" in warnings[0]


def test_stream_decoder_never_splits_characters():
    tok = Tokenizer.byte_level()
    dec = tok.stream_decoder()
    pieces = [dec.push(b) for b in "日本✓".encode()] + [dec.flush()]
    assert "".join(pieces) == "日本✓"
    assert all("\ufffd" not in p for p in pieces)


def test_separator_is_special_and_has_no_bytes(bpe):
    assert bpe.token_bytes[bpe.sep_id] == b""
    assert bpe.hf.token_to_id(SEPARATOR) == bpe.sep_id
    ids = bpe.encode_text(f"a{SEPARATOR}b").tolist()  # the separator's text in a document stays text
    assert bpe.sep_id not in ids and bpe.decode(ids) == f"a{SEPARATOR}b"


def test_garbage_tokenizer_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        Tokenizer.from_file(str(path))
