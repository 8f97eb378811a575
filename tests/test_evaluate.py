"""Perplexity evaluation (longctx/scoring.py): exact agreement with direct computations, counts, bounded memory.

The model is a tiny random transformer (attention window 8) with ``init_std = 0.3``: at the default 0.02 its
predictions are so flat that forgetting the memory between segments moves ``nll_sum`` by only ~3e-4 relative, below
a 1e-3 tolerance; at 0.3 it moves it by ~2e-2 (checked by ``test_carry_negative_control``).

Tolerance. Carry mode computes the same per-token NLL as one forward over the whole stream (chunking invariance of
the decoder, tested in tests/decoders); only the order of fp32 accumulations differs, which moves a per-token NLL by
<= ~1e-5 (measured ~4e-6 on values ~8) and ``nll_sum`` by ~1e-9 relative (errors of both signs cancel). ``REL = 1e-5``
leaves four orders of magnitude of headroom on the sum and is still 2,000 times smaller than the effect of dropping
the memory. Per-token comparisons use ``ATOL = 1e-4``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig, TransformerConfig
from longctx.data import Document, discover
from longctx.decoders import State
from longctx.errors import ConfigError, DataError
from longctx.model import LMOutput, LongContextLM, build_model, inference
from longctx.scoring import EvalOptions, evaluate_documents, format_report, write_per_position_csv
from longctx.tokenizer import Tokenizer

REL = 1e-5  # relative tolerance on nll_sum (see module docstring)
ATOL = 1e-4  # absolute tolerance on a per-token (or per-bucket mean) NLL
TEXT = b"It was the best of times, it was the worst of times; it was the age of wisdom.\n" * 3  # 237 bytes


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a loaded 2-core machine 2 threads are 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LongContextLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=257, init_std=0.3, transformer=TransformerConfig(window=8)
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def _doc(tmp_path: Path, name: str, data: bytes) -> Document:
    path = tmp_path / name
    path.write_bytes(data)
    [doc] = discover([str(path)])
    return doc


def _stream(tok: Tokenizer, data: bytes) -> Tensor:
    return torch.tensor([tok.sep_id, *data], dtype=torch.int64)  # (L,) = SEP + bytes


def _direct_nll(model: LongContextLM, tok: Tokenizer, data: bytes) -> np.ndarray:
    """Per-token NLL (N,) of ``data`` from ONE forward over ``SEP + data`` from a fresh state."""
    stream = _stream(tok, data)
    with torch.inference_mode():
        logits = model(stream[None, :-1], model.init_state(1)).logits[0]  # (N, V)
        return F.cross_entropy(logits.float(), stream[1:], reduction="none").double().numpy()


def _nll_at(model: LongContextLM, context: Tensor, target: Tensor) -> float:
    """NLL of ``target`` after ``context`` (n,), read from a fresh state."""
    with torch.inference_mode():
        logits = model(context[None], model.init_state(1)).logits[0, -1]  # (V,)
        return float(F.cross_entropy(logits.float()[None], target[None]).double())


def _hf_sliding_nll(model: LongContextLM, tok: Tokenizer, data: bytes, window: int, stride: int) -> np.ndarray:
    """The HF "perplexity of fixed-length models" recipe, brute force: each scored token gets its own forward over
    its window's tokens before it, from a fresh state. Returns the NLL (N,) in stream order."""
    stream = _stream(tok, data)
    n = len(stream)
    scores: dict[int, float] = {}
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end  # labels[:-trg_len] = -100; the shift drops the window's first position
        for t in range(max(end - trg_len, begin + 1), end):
            assert t not in scores
            scores[t] = _nll_at(model, stream[begin:t], stream[t])
        prev_end = end
        if end == n:
            break
    assert sorted(scores) == list(range(1, n))
    return np.array([scores[t] for t in range(1, n)])


# --------------------------------------------------------------------------------------------------------------------
# carry mode


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_carry_equals_one_forward(model: LongContextLM, tok: Tokenizer, tmp_path: Path, seq_len: int) -> None:
    doc = _doc(tmp_path, "a.txt", TEXT)
    result = evaluate_documents(model, tok, [doc], EvalOptions(mode="carry", seq_len=seq_len))
    direct = _direct_nll(model, tok, TEXT)
    assert result["nll_sum"] == pytest.approx(direct.sum(), rel=REL)
    assert result["loss"] == pytest.approx(direct.mean(), rel=REL)
    assert result["tokens"] == result["bytes"] == len(TEXT) == doc.size
    assert result["seq_len"] == seq_len and result["mode"] == "carry"
    [f] = result["files"]
    assert f["name"] == doc.name and f["tokens"] == len(TEXT) and f["nll_sum"] == result["nll_sum"]


def test_carry_negative_control(model: LongContextLM, tok: Tokenizer) -> None:
    """Segments of 7 read from fresh states (memory dropped) differ from the direct NLL far beyond REL."""
    stream = _stream(tok, TEXT)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(stream) - 1, 7):
            seg = stream[i : i + 8]  # (<= 8,) inputs + next token
            logits = model(seg[None, :-1], model.init_state(1)).logits[0]  # (T, V)
            total += float(F.cross_entropy(logits.float(), seg[1:], reduction="sum"))
    assert abs(total / _direct_nll(model, tok, TEXT).sum() - 1) > 100 * REL


def test_counts_and_units(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    doc = _doc(tmp_path, "a.txt", TEXT)
    r = evaluate_documents(model, tok, [doc], EvalOptions(seq_len=16))
    assert r["tokens"] == r["bytes"] == doc.size
    assert r["loss"] == pytest.approx(r["nll_sum"] / r["tokens"], rel=1e-12)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)  # tokens == bytes
    assert r["byte_perplexity"] == pytest.approx(r["ppl"], rel=1e-12)
    assert r["state_bytes"] == model.init_state(1).nbytes() > 0
    assert r["peak_rss_bytes"] > 10 * 2**20 and r["elapsed_s"] > 0 and r["tokens_per_s"] > 0
    json.dumps(r, allow_nan=False)  # strict JSON


def test_stderr_formula(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    r = evaluate_documents(model, tok, [_doc(tmp_path, "a.txt", TEXT)], EvalOptions(seq_len=32))
    direct = _direct_nll(model, tok, TEXT)
    loss_stderr = direct.std(ddof=1) / math.sqrt(len(direct))
    assert r["loss_stderr"] == pytest.approx(loss_stderr, rel=1e-3)
    assert r["ppl_stderr"] > 0
    assert r["ppl_stderr"] == pytest.approx(r["ppl"] * r["loss_stderr"], rel=1e-12)
    assert r["files"][0]["ppl_stderr"] == pytest.approx(r["ppl_stderr"], rel=1e-12)


def test_bf16_close_to_fp32(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    doc = _doc(tmp_path, "a.txt", TEXT)
    fp32 = evaluate_documents(model, tok, [doc], EvalOptions(seq_len=32))
    bf16 = evaluate_documents(model, tok, [doc], EvalOptions(seq_len=32, precision="bf16"))
    assert bf16["tokens"] == fp32["tokens"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


@pytest.mark.parametrize("mode", ["carry", "sliding"])
def test_bf16_eval_reads_with_bf16_caches(
    model: LongContextLM, tok: Tokenizer, tmp_path: Path, monkeypatch, mode: str
) -> None:
    """Under bf16 the evaluator's states hold their attention caches in bf16 from the start (no float32 cache to cast
    in every call), fresh windows of sliding mode too; fp32 keeps float32 caches."""
    seen: list[torch.dtype] = []
    real = LongContextLM.forward

    def recording(self, tokens, state, *args, **kwargs):
        seen.append(state.keys.dtype)
        return real(self, tokens, state, *args, **kwargs)

    monkeypatch.setattr(LongContextLM, "forward", recording)
    doc = _doc(tmp_path, "a.txt", TEXT)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        opts = EvalOptions(mode=mode, seq_len=32, window=16, stride=8, precision=precision)
        evaluate_documents(model, tok, [doc], opts)
        assert len(seen) > 2 and set(seen) == {dtype}


# --------------------------------------------------------------------------------------------------------------------
# sliding mode


def test_sliding_with_big_window_equals_carry(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    doc = _doc(tmp_path, "a.txt", TEXT)
    carry = evaluate_documents(model, tok, [doc], EvalOptions(mode="carry", seq_len=10))
    sliding = evaluate_documents(model, tok, [doc], EvalOptions(mode="sliding", window=len(TEXT) + 1, stride=3))
    assert sliding["tokens"] == carry["tokens"] == len(TEXT)
    assert sliding["nll_sum"] == pytest.approx(carry["nll_sum"], rel=REL)
    assert sliding["window"] == len(TEXT) + 1 and sliding["stride"] == 3 and "seq_len" not in sliding


@pytest.mark.parametrize(("n_bytes", "window", "stride"), [(40, 6, 4), (41, 12, 5), (45, 5, 1), (30, 2, 1)])
def test_sliding_equals_hf_recipe(
    model: LongContextLM, tok: Tokenizer, tmp_path: Path, n_bytes: int, window: int, stride: int
) -> None:
    data = TEXT[:n_bytes]
    opts = EvalOptions(mode="sliding", window=window, stride=stride, per_position_buckets=True)
    r = evaluate_documents(model, tok, [_doc(tmp_path, "a.txt", data)], opts)
    ref = _hf_sliding_nll(model, tok, data, window, stride)
    assert r["tokens"] == len(ref) == n_bytes
    assert r["nll_sum"] == pytest.approx(ref.sum(), rel=REL)
    _check_buckets(r["per_position"], [ref])
    # the small windows really cut context (the model's attention window is 8): not the same as carry
    carry = _direct_nll(model, tok, data).sum()
    assert abs(r["nll_sum"] / carry - 1) > 100 * REL


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "sliding", "window": 8, "stride": 8}, "--stride must be below --window (8)"),
        ({"seq_len": 0}, "--seq-len must be an integer >= 1, got 0"),
        ({"seq_len": 2.5}, "--seq-len must be an integer >= 1, got 2.5"),
        ({"max_tokens": -1}, "--max-tokens must be an integer >= 0 (0 = no limit), got -1"),
        ({"mode": "sliding", "window": 1, "stride": 1}, "--window must be an integer >= 2, got 1"),
        ({"mode": "sliding", "window": 8, "stride": 0}, "--stride must be an integer >= 1, got 0"),
        ({"mode": "windowed"}, "--mode must be carry or sliding, got 'windowed'"),
        ({"precision": "fp16"}, "--precision must be fp32 or bf16, got 'fp16'"),
    ],
)
def test_bad_options(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        EvalOptions(**kw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_sliding_geometry_is_not_checked_in_carry_mode() -> None:
    EvalOptions(mode="carry", window=8, stride=8)


# --------------------------------------------------------------------------------------------------------------------
# budget, buckets, several files, errors


@pytest.mark.parametrize("mode", ["carry", "sliding"])
def test_max_tokens(model: LongContextLM, tok: Tokenizer, tmp_path: Path, mode: str) -> None:
    a, b, c = TEXT[:40], TEXT[40:140], TEXT[140:200]
    docs = [_doc(tmp_path, "a.txt", a), _doc(tmp_path, "b.txt", b), _doc(tmp_path, "c.txt", c)]
    opts = EvalOptions(mode=mode, seq_len=7, window=9, stride=4, max_tokens=57)  # type: ignore[arg-type]
    r = evaluate_documents(model, tok, docs, opts)
    assert r["tokens"] == 57 and r["max_tokens"] == 57
    assert [f["name"] for f in r["files"]] == [docs[0].name, docs[1].name]  # c.txt was never reached
    assert [f["tokens"] for f in r["files"]] == [40, 17]
    assert [f["bytes"] for f in r["files"]] == [40, 17]  # b.txt: bytes of the scored tokens, not of the file
    if mode == "carry":
        expected = _direct_nll(model, tok, a).sum() + _direct_nll(model, tok, b)[:17].sum()
        assert r["nll_sum"] == pytest.approx(expected, rel=REL)
    exact = evaluate_documents(model, tok, docs[:1], EvalOptions(mode=mode, max_tokens=40))  # type: ignore[arg-type]
    assert exact["tokens"] == 40 and exact["bytes"] == 40


def _check_buckets(rows: list[dict[str, Any]], nlls: list[np.ndarray]) -> None:
    """Buckets [1,2), [2,4), ... with counts and means equal to those of per-document NLLs (position = index + 1)."""
    assert sum(r["count"] for r in rows) == sum(len(n) for n in nlls)
    for b, row in enumerate(rows):
        assert (row["start"], row["end"]) == (2**b, 2 ** (b + 1))
        parts = [n[row["start"] - 1 : row["end"] - 1] for n in nlls]
        assert row["count"] == sum(len(p) for p in parts)
        assert row["mean_nll"] == pytest.approx(np.concatenate(parts).mean(), abs=ATOL)


def test_per_position_buckets(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    a, b = TEXT[:200], TEXT[200:]  # 200 and 37 tokens
    docs = [_doc(tmp_path, "a.txt", a), _doc(tmp_path, "b.txt", b)]
    r = evaluate_documents(model, tok, docs, EvalOptions(seq_len=13, per_position_buckets=True))
    rows = r["per_position"]
    assert len(rows) == 8  # 200 tokens: buckets up to [128, 256)
    assert rows[0]["count"] == 2 and rows[5]["count"] == 32 + len(b) - 31 and rows[7]["count"] == 200 - 127
    _check_buckets(rows, [_direct_nll(model, tok, a), _direct_nll(model, tok, b)])
    assert "per_position" not in evaluate_documents(model, tok, docs[1:], EvalOptions())

    path = tmp_path / "positions.csv"
    write_per_position_csv(r, path)
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["start", "end", "mean_nll", "count"]
    assert [int(row[3]) for row in table[1:]] == [row["count"] for row in rows]
    assert float(table[2][2]) == pytest.approx(rows[1]["mean_nll"], abs=1e-6)


def test_several_files_aggregate(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    parts = [TEXT[:50], TEXT[50:51], TEXT[51:]]  # one file has a single token
    docs = discover([str(_doc(tmp_path, f"{i}.txt", p).name) for i, p in enumerate(parts)])
    r = evaluate_documents(model, tok, docs, EvalOptions(seq_len=16))
    files = r["files"]
    assert [f["tokens"] for f in files] == [len(p) for p in parts]
    assert r["tokens"] == sum(f["tokens"] for f in files) and r["bytes"] == sum(f["bytes"] for f in files)
    assert r["nll_sum"] == pytest.approx(sum(f["nll_sum"] for f in files), rel=1e-12)
    for f, p in zip(files, parts, strict=True):  # every document starts again from SEP and a fresh state
        assert f["nll_sum"] == pytest.approx(_direct_nll(model, tok, p).sum(), rel=REL)
    assert files[1]["ppl_stderr"] == 0.0  # one token: no spread to estimate

    report = format_report(r)
    assert report.splitlines()[0].startswith(f"longctx eval: {len(TEXT):,} tokens ({len(TEXT):,} bytes) in 3 files")
    assert all(d.name in report for d in docs)
    final = report.splitlines()[-1]
    assert final.startswith(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f} | loss = ")
    assert f"tokens = {len(TEXT):,} | bytes = {len(TEXT):,}" in final and "tokens/s" in final and "MB" in final


def test_empty_document_is_a_data_error(model: LongContextLM, tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    good = _doc(tmp_path, "good.txt", TEXT[:10])
    empty = Document(str(tmp_path / "empty.txt"), 0, 0, lambda: open(tmp_path / "empty.txt", "rb"))
    with pytest.raises(DataError, match=r"empty\.txt' is empty \(0 bytes\); nothing to evaluate") as e:
        evaluate_documents(model, tok, [good, empty], EvalOptions())
    assert "\n" not in str(e.value)
    emptied = Document("gone.txt", 5, 0, lambda: io.BytesIO(b""))  # emptied after it was listed
    with pytest.raises(DataError, match="'gone.txt' is empty"):
        evaluate_documents(model, tok, [emptied], EvalOptions(mode="sliding", window=4, stride=2))


def test_stream_of_unknown_size(model: LongContextLM, tok: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI passes stdin and pipes as Documents of size 0: they are read, not rejected."""
    stdin = Document("<stdin>", 0, 0, lambda: io.BytesIO(TEXT))
    r = evaluate_documents(model, tok, [stdin], EvalOptions(seq_len=50, progress=True))
    assert r["tokens"] == r["bytes"] == len(TEXT) and r["files"][0]["name"] == "<stdin>"
    assert r["nll_sum"] == pytest.approx(_direct_nll(model, tok, TEXT).sum(), rel=REL)
    assert "ppl=" in capsys.readouterr().err


def test_restores_training_mode_and_progress(
    model: LongContextLM, tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model.train()
    try:
        r = evaluate_documents(model, tok, [_doc(tmp_path, "a.txt", TEXT)], EvalOptions(seq_len=64, progress=True))
        assert model.training
    finally:
        model.eval()
    captured = capsys.readouterr()
    assert captured.out == "" and "ppl=" in captured.err
    assert r["nll_sum"] == pytest.approx(_direct_nll(model, tok, TEXT).sum(), rel=REL)  # dropout is 0


# --------------------------------------------------------------------------------------------------------------------
# bounded memory


@dataclass(frozen=True)
class CountState(State):
    position: Tensor  # (B,) int64: tokens read so far


class BigramLM(nn.Module):
    """A stand-in LM as cheap as a model can be (logits depend on the current token only), so that megabytes can be
    evaluated in a test. It checks that its state is carried from segment to segment and keeps counters only (a list
    of its calls would itself grow with the file)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size)
        self.table = nn.Embedding(vocab_size, vocab_size)
        self.n_calls, self.max_batch, self.max_tokens, self.n_tokens = 0, 0, 0, 0

    @property
    def device(self) -> torch.device:
        return self.table.weight.device

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, cache_dtype: torch.dtype | None = None
    ) -> CountState:  # no caches: cache_dtype changes nothing
        return CountState(position=torch.zeros(batch_size, dtype=torch.int64, device=device or self.device))

    def forward(self, tokens: Tensor, state: CountState, targets: Tensor | None = None) -> LMOutput:
        B, T = tokens.shape
        assert int(state.position[0]) == self.n_tokens, "the state was not carried"
        self.n_calls, self.n_tokens = self.n_calls + 1, self.n_tokens + T
        self.max_batch, self.max_tokens = max(self.max_batch, B), max(self.max_tokens, T)
        next_state = CountState(position=state.position + T)
        return LMOutput(
            logits=self.table(tokens), state=next_state, loss=None, aux_loss=tokens.new_zeros(()), stats={}
        )  # logits (B, T, V)


def _traced_peak(tok: Tokenizer, doc: Document, seq_len: int) -> tuple[int, dict[str, Any], BigramLM]:
    """Peak numpy + Python memory (tracemalloc) while evaluating ``doc`` with a :class:`BigramLM`."""
    lm = BigramLM(tok.vocab_size)
    tracemalloc.start()
    try:
        result = evaluate_documents(lm, tok, [doc], EvalOptions(seq_len=seq_len))  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result, lm


def test_memory_does_not_grow(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.5 MB and 4 MB through a stream (tokenizer chunks of 64 KiB): the model never sees more than a segment, and
    the traced peak (token buffers, NLL arrays, Python objects) is the same for both, a small multiple of one chunk
    of int64 tokens (512 KiB), far below the 32 MB of int64 tokens of the big file."""
    chunk, seq_len = 64 << 10, 1024
    monkeypatch.setattr(Tokenizer, "iter_encode", functools.partialmethod(Tokenizer.iter_encode, chunk_bytes=chunk))
    rng = np.random.default_rng(0)
    peaks = []
    for size in (1 << 19, 4 << 20):
        doc = _doc(tmp_path, f"{size}.bin", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        peak, r, lm = _traced_peak(tok, doc, seq_len)
        assert r["tokens"] == r["bytes"] == size
        assert lm.max_tokens == seq_len and lm.max_batch == 1 and lm.n_calls == math.ceil(size / seq_len)
        peaks.append(peak)
    assert peaks[1] < 8 * chunk * 8, f"traced peak {peaks[1]:,} bytes for a 4 MB file"
    assert peaks[1] < peaks[0] + chunk, f"traced peak grew from {peaks[0]:,} to {peaks[1]:,} bytes"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_context_casts_each_weight_once(precision: str) -> None:
    """``inference``: eval mode and no autograd inside, the training flag back afterwards; under bf16 autocast each
    weight is cast once for the whole block (autocast's cache), not again in every call: 3 casts (input, weight,
    bias) in the first call of a Linear, 1 (the input) in each later one."""
    layer = nn.Linear(8, 8).train()
    x = torch.randn(4, 8)
    with inference(layer, precision):
        assert not layer.training and not torch.is_grad_enabled()
        with torch.profiler.profile() as prof:
            outs = [layer(x) for _ in range(3)]
    assert layer.training
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    assert casts == (3 + 1 + 1 if precision == "bf16" else 0)
    assert all(o.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32) for o in outs)
