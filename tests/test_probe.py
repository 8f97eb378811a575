"""``longctx probe``: the recall data, the three scorers, and their controls.

Positive controls use oracle models whose reach is known exactly (they copy what they can see within a window of
``W`` tokens and know nothing else): each probe must find that reach. Negative controls use real decoders: a window
model's copy and context scores must be zero, to float rounding, at distances beyond everything its layers can see.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from longctx.config import ModelConfig, TransformerConfig
from longctx.data import bundled_documents
from longctx.decoders import State
from longctx.model import LMOutput, build_model
from longctx.probe import (
    RECALL_KEYS,
    Filler,
    ProbeOptions,
    RecallSpec,
    find_questions,
    load_filler,
    reach,
    read_rows,
    read_streams,
    recall_document,
    recall_test_documents,
    score_context,
    score_copy,
    score_recall,
    training_document,
    write_recall_data,
)
from longctx.tokenizer import Tokenizer

ROUNDING = 1e-5  # bits per byte: fp32 rounding of the same logits computed in different segments or batches


@pytest.fixture(scope="module")
def filler() -> Filler:
    return load_filler(bundled_documents()[:2], strip=RECALL_KEYS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


# --------------------------------------------------------------------------------------------------------------------
# oracle models: exact reach W


@dataclass(frozen=True)
class HistoryState(State):
    tokens: Tensor  # (B, W) the last W tokens read (-1 = nothing yet)


class WindowCopier(nn.Module):
    """Predicts, at each position, the token that followed the latest earlier match of the last ``k`` tokens within
    the last ``W`` tokens (logit 10 on it, 0 elsewhere; all 0 without a match). Its reach is exactly ``W``."""

    def __init__(self, vocab_size: int, window: int, k: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size)
        self.window, self.k = window, k
        self.dummy = nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.dummy.device

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, cache_dtype: torch.dtype | None = None
    ) -> HistoryState:  # no caches: cache_dtype changes nothing
        return HistoryState(tokens=torch.full((batch_size, self.window), -1, dtype=torch.int64))

    def forward(self, tokens: Tensor, state: HistoryState, targets: Tensor | None = None) -> LMOutput:
        B, T = tokens.shape
        seen = torch.cat([state.tokens, tokens], dim=1).numpy()  # (B, W + T)
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        W, k = self.window, self.k
        for b in range(B):
            row = seen[b]
            for t in range(T):
                now = W + t  # the current token's index in row
                pattern = row[now - k + 1 : now + 1]
                for j in range(now - 1, now - W, -1):  # j + 1 must be within the last W tokens: j + 1 > now - W
                    if j - k + 1 >= 0 and (row[j - k + 1 : j + 1] == pattern).all() and row[j + 1] >= 0:
                        logits[b, t, row[j + 1]] = 10.0
                        break
        next_state = HistoryState(tokens=torch.from_numpy(seen[:, -W:].copy()))
        return LMOutput(logits=logits, state=next_state, loss=None, aux_loss=torch.zeros(()), stats={})


def _window_model(n_layer: int, window: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=n_layer,
        d_model=32,
        n_head=2,
        d_ff=64,
        vocab_size=257,
        init_std=0.3,
        transformer=TransformerConfig(window=window),
    )
    return build_model(cfg).eval()


# --------------------------------------------------------------------------------------------------------------------
# reading


def test_read_rows_equals_one_forward_and_batches_are_independent() -> None:
    model = _window_model(2, 8)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (3, 41)).astype(np.int64)
    nll, argmax = read_rows(model, rows, ProbeOptions(seq_len=7))
    with torch.inference_mode():
        logits = model(torch.from_numpy(rows[:, :-1]), model.init_state(3)).logits  # (3, 40, V)
    direct = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(rows[:, 1:]), reduction="none")
    np.testing.assert_allclose(nll, direct.double().numpy(), atol=1e-4)
    assert (argmax == logits.argmax(-1).numpy()).all()
    alone = read_streams(model, [rows[1], rows[0][:20]], ProbeOptions(seq_len=7, batch_rows=1))
    np.testing.assert_allclose(alone[0][0], nll[1], atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# recall data


def test_recall_documents_plant_each_key_with_one_value(filler: Filler) -> None:
    spec = RecallSpec()
    rng = random.Random(0)
    text = training_document(rng, filler, spec)
    questions = find_questions(text.encode(), spec)
    assert len(questions) >= 20
    seen: dict[str, str] = {}
    for ch, value in zip(text, text[1:]):
        if ch in spec.keys:
            assert value in spec.values
            assert seen.setdefault(ch, value) == value  # a key never changes its value within a document
    assert all(q.distance >= 6 for q in questions)


def test_list_documents_hold_only_events_and_the_share_is_kept(filler: Filler) -> None:
    """``list_share`` of the training documents are events only (``list_keys`` keys, one value each)."""
    rng = random.Random(0)
    text = training_document(rng, filler, RecallSpec(list_share=1.0, list_keys=5))
    events = text.split()
    assert events and all(len(e) == 2 and e[0] in RECALL_KEYS and e[1] in "0123456789" for e in events)
    assert len({e[0] for e in events}) == 5 and len(set(events)) == 5  # five keys, each with one value
    assert len(find_questions(text.encode(), RecallSpec())) == len(events) - 5  # every event but a key's first
    docs = [training_document(rng, filler, RecallSpec(list_share=0.25)) for _ in range(400)]
    lists = sum(all(len(e) == 2 and e[0] in RECALL_KEYS for e in d.split()) for d in docs)
    assert 70 <= lists <= 130  # 100 expected; binomial sd 8.7


def test_a_spec_written_before_list_documents_reads_as_having_none() -> None:
    old = {k: v for k, v in asdict(RecallSpec()).items() if k not in ("list_share", "list_keys")}
    spec = RecallSpec.from_json(json.dumps(old), "recall.json")
    assert spec.list_share == 0.0 and spec.list_keys == RecallSpec().list_keys


def test_test_documents_ask_each_distance_as_often(filler: Filler) -> None:
    spec = RecallSpec(distances=(16, 64, 256))
    docs = recall_test_documents(random.Random(1), filler, spec, queries=30)
    found = [q.distance for d in docs for q in find_questions(d.encode(), spec)]
    for d in spec.distances:
        near = [x for x in found if d <= x <= d * 1.5]  # planted at d characters; keys are 2 bytes, so a little more
        assert len(near) == 30, (d, sorted(found))


def test_write_recall_data_and_its_spec(filler: Filler, tmp_path: Path) -> None:
    summary = write_recall_data(tmp_path / "r", filler, RecallSpec(distances=(16, 64)), n_docs=5, queries=4, seed=3)
    assert len(list((tmp_path / "r" / "train").glob("*.txt"))) == 5
    assert summary["test_docs"] == 1
    spec = RecallSpec.from_json((tmp_path / "r" / "recall.json").read_text(), "recall.json")
    assert spec.distances == (16, 64) and spec.keys == RECALL_KEYS
    again = write_recall_data(tmp_path / "s", filler, RecallSpec(distances=(16, 64)), n_docs=5, queries=4, seed=3)
    assert (tmp_path / "r" / "train" / "recall-000004.txt").read_bytes() == (
        tmp_path / "s" / "train" / "recall-000004.txt"
    ).read_bytes()  # the seed makes it reproducible
    assert summary["train_bytes"] == again["train_bytes"]


def test_recall_document_drops_groups_that_do_not_fit(filler: Filler) -> None:
    spec = RecallSpec()
    text, left = recall_document(random.Random(0), filler, spec, 200, [[0, 500], [0, 50]])
    assert left == [[0, 500]]
    assert len(find_questions(text.encode(), spec)) == 1


# --------------------------------------------------------------------------------------------------------------------
# controls


def test_recall_finds_the_exact_reach_of_an_oracle(filler: Filler, tok: Tokenizer) -> None:
    """The oracle copies a key's value from up to 100 bytes back: perfect at 16 and 64, never right at 256."""
    spec = RecallSpec(distances=(16, 64, 256))
    texts = [d.encode() for d in recall_test_documents(random.Random(2), filler, spec, queries=20)]
    result = score_recall(WindowCopier(tok.vocab_size, 100, 1), tok, texts, spec, ProbeOptions(seq_len=64))
    acc = {r["distance"]: r["accuracy"] for r in result.distances}
    assert acc == {16: 1.0, 64: 1.0, 256: 0.0}
    assert [r["queries"] for r in result.distances] == [20, 20, 20]
    assert reach(result.distances, "accuracy", 0.1) == 64


def test_copy_finds_the_reach_of_an_oracle(filler: Filler, tok: Tokenizer) -> None:
    """An 8-gram copier that sees 200 tokens back saves bits on a 32-byte repeat at distance 32 and 96 (the whole
    passage in view), and nothing at 512."""
    model = WindowCopier(tok.vocab_size, 200, 8)
    result = score_copy(
        model, tok, filler, (32, 96, 512), span=32, trials=4, content="text", seed=0, opts=ProbeOptions(seq_len=128)
    )
    gain = {r["distance"]: r["gain_bits_per_byte"] for r in result.distances}
    assert gain[32] > 1.0 and gain[96] > 1.0, gain
    assert abs(gain[512]) < 0.5, gain  # only chance 8-gram matches of the filler itself differ
    assert reach(result.distances, "gain_bits_per_byte") == 96


@pytest.mark.parametrize("content", ["text", "random"])
def test_copy_gain_is_zero_beyond_a_window_models_reach(filler: Filler, tok: Tokenizer, content: str) -> None:
    """2 layers with windows of 8 see 15 tokens back: from 16 bytes on, repeat and control are read identically."""
    model = _window_model(2, 8)
    with torch.inference_mode():
        result = score_copy(
            model, tok, filler, (4, 16, 300), span=16, trials=3, content=content, seed=0, opts=ProbeOptions(seq_len=32)
        )
    rows = {r["distance"]: r for r in result.distances}
    assert abs(rows[4]["gain_bits_per_byte"]) > 1e-3  # within reach the first occurrence changes the prediction
    for d in (16, 300):
        assert abs(rows[d]["gain_bits_per_byte"]) < ROUNDING, rows[d]
        assert rows[d]["stderr"] < ROUNDING


def test_context_gain_is_zero_from_a_window_models_reach_on(filler: Filler, tok: Tokenizer) -> None:
    """1 layer with a window of 8: a cut to 8 or more tokens loses nothing; a cut to 2 does."""
    model = _window_model(1, 8)
    stream = np.concatenate([[tok.sep_id], tok.encode_bytes(filler.texts[0][:2000])]).astype(np.int64)
    with torch.inference_mode():
        result = score_context(model, tok, [stream], (2, 8, 16), tokens=512, opts=ProbeOptions(seq_len=64))
    rows = {r["distance"]: r for r in result.distances}
    assert abs(rows[2]["gain_bits_per_byte"]) > 0.01  # a random model: the cut changes its predictions either way
    for d in (8, 16):
        assert abs(rows[d]["gain_bits_per_byte"]) < ROUNDING, rows[d]
    assert all(r["tokens"] == 512 for r in result.distances)


def test_context_says_when_the_filler_is_too_short(tok: Tokenizer) -> None:
    from longctx.errors import DataError

    stream = np.arange(300, dtype=np.int64) % 256
    with pytest.raises(DataError, match="need a document of at least"):
        score_context(_window_model(1, 8), tok, [stream], (64, 128), tokens=256, opts=ProbeOptions())


def test_reach_is_the_largest_distance_two_standard_errors_above_the_baseline() -> None:
    rows = [
        {"distance": 1, "g": 0.5, "stderr": 0.1},
        {"distance": 2, "g": 0.15, "stderr": 0.1},
        {"distance": 4, "g": 0.3, "stderr": 0.1},
        {"distance": 8, "g": 0.05, "stderr": 0.0},
    ]
    assert reach(rows, "g") == 8
    assert reach(rows, "g", 0.06) == 4
    assert reach(rows, "g", 1.0) is None


def test_report_is_json(filler: Filler, tok: Tokenizer) -> None:
    result = score_copy(
        _window_model(1, 4), tok, filler, (8,), span=8, trials=2, content="text", seed=1, opts=ProbeOptions(seq_len=16)
    )
    report = json.loads(json.dumps(result.to_dict()))
    assert report["task"] == "copy" and report["distances"][0]["trials"] == 2
    assert set(report["distances"][0]) == {
        "distance",
        "gain_bits_per_byte",
        "stderr",
        "nll_repeat",
        "nll_control",
        "trials",
    }
