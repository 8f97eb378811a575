"""Perplexity of documents of any length, read through the model's bounded memory (``longctx eval``).

Each document is one stream ``SEP t1 t2 ... tN``: the separator the model was trained on (``SEP doc1 SEP doc2 ...``)
followed by the document's tokens, read and tokenized incrementally (``iter_document_tokens``). Every document token
is scored once, predicted from what precedes it (``t1`` from ``SEP`` alone). Stream position 0 is ``SEP``; position
``p >= 1`` is document token ``p``.

Modes (the same for every decoder):

- ``carry``: segments of ``seq_len`` input tokens; the decoder state (its memory) is carried from one segment to the
  next and reset per document. This is what the tool is for: context longer than any segment.
- ``sliding``: the Hugging Face "perplexity of fixed-length models" recipe, for comparison with tools that have no
  memory. Windows of ``window`` tokens start every ``stride`` tokens, each read from a fresh state; the first window
  scores all its tokens, later ones only the tokens the previous window did not reach (the last ``stride``), so a
  scored token sees between ``window - stride`` and ``window - 1`` tokens of context. The model reads the first
  ``window - 1`` tokens of a window: the last one is only predicted (HF feeds it too and discards its logits).

Memory does not grow with the document: the stream is held in a buffer of at most one window (or segment) plus one
tokenizer chunk, and only running sums are kept. NLL is computed in fp32 from the logits (also under bf16 autocast)
and summed in float64.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from longctx.data import Document, iter_document_tokens
from longctx.decoders import State
from longctx.errors import CheckpointError, ConfigError, DataError, LongctxError
from longctx.model import READ_SEGMENT, LongContextLM, cache_dtype, inference
from longctx.tokenizer import Tokenizer
from longctx.validate import PRECISIONS, Rule, check_options, int_at_least, one_of

log = logging.getLogger("longctx")

LN2 = math.log(2.0)
N_BUCKETS = 64  # position buckets [2^b, 2^(b+1)) for b < 64 cover any int64 position


@dataclass
class EvalOptions:
    """How to read the documents; checked on construction (a bad value raises :class:`ConfigError`)."""

    mode: Literal["carry", "sliding"] = "carry"
    seq_len: int = READ_SEGMENT  # carry: input tokens per forward call (speed only: the memory is carried across)
    window: int = 256  # sliding: tokens per window (fresh state per window)
    stride: int = 128  # sliding: how far the window moves; only the tokens it adds are scored
    max_tokens: int = 0  # stop after this many scored tokens in total (0 = no limit)
    per_position_buckets: bool = False  # mean NLL per log-spaced position bucket
    progress: bool = False  # tqdm bar on stderr with the running ppl
    precision: Literal["fp32", "bf16"] = "fp32"
    partial_on_interrupt: bool = False  # Ctrl-C returns the result over the tokens scored so far, "partial": true
    log_interval_s: float = 0.0  # without a bar: a progress line (tokens, running ppl) this often; 0 = never

    RULES: ClassVar[tuple[Rule, ...]] = (
        one_of("mode", ("carry", "sliding")),
        one_of("precision", PRECISIONS),
        int_at_least("seq_len", 1),
        int_at_least("window", 2),
        int_at_least("stride", 1),
        int_at_least("max_tokens", 0, " (0 = no limit)"),
    )

    def __post_init__(self) -> None:
        check_options(vars(self), self.RULES)
        if self.mode == "sliding" and not self.stride < self.window:
            raise ConfigError(
                f"--stride must be below --window ({self.window}) so that every scored token has context, "
                f"got {self.stride}"
            )


# --------------------------------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class _Tally:
    """Running sums of one document (float64)."""

    name: str
    tokens: int = 0
    nll_sum: float = 0.0
    nll_sq: float = 0.0  # sum of squared per-token NLL, for the standard error
    bytes_read: int = 0  # bytes the tokenizer consumed
    bytes_scored: int = 0  # bytes of the scored tokens (token_lengths)
    truncated: bool = False  # stopped by max_tokens
    elapsed_s: float = 0.0

    def add(self, nll: np.ndarray, targets: np.ndarray, token_lengths: np.ndarray) -> None:
        """nll (n,) float64 of targets (n,) int64."""
        self.tokens += len(nll)
        self.nll_sum += float(nll.sum())
        self.nll_sq += float(np.square(nll).sum())
        self.bytes_scored += int(token_lengths[targets].sum())

    @property
    def bytes(self) -> int:
        """Bytes read from the file; for a file cut short by ``max_tokens``, the bytes of the scored tokens."""
        return self.bytes_scored if self.truncated else self.bytes_read


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def _metrics(tokens: int, n_bytes: int, nll_sum: float, nll_sq: float, elapsed_s: float) -> dict[str, Any]:
    """Loss, perplexity and their standard errors, bits per byte, throughput.

    ``loss_stderr`` is the standard error of the mean per-token NLL, ``sqrt(s^2 / n)`` with the sample variance
    ``s^2``; it treats tokens as independent (as llama.cpp does), so it understates the uncertainty of correlated
    text. ``ppl_stderr = ppl * loss_stderr`` (first-order error propagation). Both are 0 for a single token.
    """
    loss = nll_sum / tokens
    variance = max(nll_sq - nll_sum * loss, 0.0) / (tokens - 1) if tokens > 1 else 0.0
    loss_stderr = math.sqrt(variance / tokens)
    ppl = _exp(loss)
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "nll_sum": nll_sum,
        "loss": loss,
        "loss_stderr": loss_stderr,
        "ppl": ppl,
        "ppl_stderr": ppl * loss_stderr,
        "bits_per_byte": nll_sum / (n_bytes * LN2) if n_bytes else math.inf,
        "byte_perplexity": _exp(nll_sum / n_bytes) if n_bytes else math.inf,
        "elapsed_s": elapsed_s,
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
    }


def _file_result(tally: _Tally) -> dict[str, Any]:
    return {"name": tally.name, **_metrics(tally.tokens, tally.bytes, tally.nll_sum, tally.nll_sq, tally.elapsed_s)}


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux the high-water mark of its own memory (``VmHWM``):
    ``ru_maxrss`` also counts the parent's size at the fork of a child started with fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


# --------------------------------------------------------------------------------------------------------------------
# the stream


def _stream_chunks(doc: Document, tokenizer: Tokenizer, tally: _Tally) -> Iterator[np.ndarray]:
    """``[SEP]``, then the document's token chunks (int64), counting the bytes read into ``tally``."""
    yield np.array([tokenizer.sep_id], dtype=np.int64)  # (1,)
    for ids, n_bytes in iter_document_tokens(doc, tokenizer):
        tally.bytes_read += n_bytes
        yield np.asarray(ids, dtype=np.int64)  # (n,)


class _StreamBuffer:
    """A moving view of a token stream: holds positions ``[start, start + len)``, reads chunks on demand, and forgets
    what lies before the window last asked for. Holds at most one window plus one chunk."""

    def __init__(self, chunks: Iterator[np.ndarray]) -> None:
        self._chunks = chunks
        self._buf = np.zeros(0, dtype=np.int64)  # (n,) stream[start : start + n]
        self._start = 0
        self._eof = False

    def window(self, begin: int, end: int) -> np.ndarray:
        """``stream[begin:end]`` (shorter at the end of the stream); ``begin`` never decreases between calls."""
        self._buf = self._buf[max(begin - self._start, 0) :]
        self._start = begin
        while len(self._buf) < end - begin and not self._eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
            else:
                self._buf = np.concatenate([self._buf, chunk])  # (n + c,): frees the previous chunk
        return self._buf[: end - begin]


def _windows(opts: EvalOptions) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, score_from)`` in stream positions: the model reads ``stream[begin:end-1]``, predicts
    ``stream[begin+1:end]`` and positions ``[score_from, end)`` are scored (``end`` is cut at the stream's end)."""
    if opts.mode == "carry":
        t = opts.seq_len
        for k in itertools.count():
            yield k * t, (k + 1) * t + 1, k * t + 1
    else:
        w, s = opts.window, opts.stride
        yield 0, w, 1
        for k in itertools.count(1):
            yield k * s, k * s + w, (k - 1) * s + w  # HF: score what the previous window (ending there) did not


# --------------------------------------------------------------------------------------------------------------------
# evaluation


class _Evaluator:
    """Scores documents one after the other, keeping the max_tokens budget, position buckets and the progress bar."""

    def __init__(self, model: LongContextLM, tokenizer: Tokenizer, opts: EvalOptions, total_bytes: int | None) -> None:
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.remaining: int | None = opts.max_tokens or None  # None: no limit
        self.pos_sum = np.zeros(N_BUCKETS, dtype=np.float64)  # (N_BUCKETS,) NLL summed per position bucket
        self.pos_count = np.zeros(N_BUCKETS, dtype=np.int64)  # (N_BUCKETS,)
        self.run_nll, self.run_tokens = 0.0, 0  # for the running ppl of the bar
        self.current: _Tally | None = None  # the document being scored
        self.started = self.last_log = time.perf_counter()
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="eval",
            file=sys.stderr,
            disable=not opts.progress,
            dynamic_ncols=True,
        )

    def budget_spent(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def _nll(self, window: np.ndarray, n_score: int, state: State) -> tuple[np.ndarray, State]:
        """Per-token NLL (n_score,) float64 of the last ``n_score`` tokens of ``window`` (T + 1,), and the state."""
        tokens = torch.from_numpy(window).to(self.model.device)  # (T + 1,) int64
        out = self.model(tokens[None, :-1], state)  # logits (1, T, V), under bf16 autocast if asked
        logits = out.logits[0, -n_score:].float()  # (n, V) fp32
        nll = F.cross_entropy(logits, tokens[-n_score:], reduction="none")  # (n,) fp32
        return nll.double().cpu().numpy(), out.state  # (n,) float64

    def _record(self, tally: _Tally, nll: np.ndarray, targets: np.ndarray, first_pos: int) -> None:
        """Add the scores nll (n,) of targets (n,) at document positions first_pos... to the sums."""
        tally.add(nll, targets, self.tokenizer.token_lengths)
        if self.remaining is not None:
            self.remaining -= len(nll)
        if self.opts.per_position_buckets:
            positions = np.arange(first_pos, first_pos + len(nll), dtype=np.float64)  # (n,)
            buckets = np.frexp(positions)[1] - 1  # (n,) floor(log2(position)), exact
            self.pos_sum += np.bincount(buckets, weights=nll, minlength=N_BUCKETS)
            self.pos_count += np.bincount(buckets, minlength=N_BUCKETS)
        self.run_nll += float(nll.sum())
        self.run_tokens += len(nll)
        self.bar.set_postfix(ppl=f"{_exp(self.run_nll / self.run_tokens):.3f}", refresh=False)
        now = time.perf_counter()
        if self.opts.log_interval_s and not self.opts.progress and now - self.last_log >= self.opts.log_interval_s:
            self.last_log = now
            log.info(
                "eval: %s tokens, running ppl %.4f, %s tokens/s",
                f"{self.run_tokens:,}",
                _exp(self.run_nll / self.run_tokens),
                f"{self.run_tokens / max(now - self.started, 1e-9):,.0f}",
            )
        self.bar.update(int(self.tokenizer.token_lengths[targets].sum()))

    def document(self, doc: Document) -> _Tally:
        """Score every token of ``doc`` (or until the budget is spent); state reset at the start."""
        tally = self.current = _Tally(doc.name)
        start = time.perf_counter()
        chunks = _stream_chunks(doc, self.tokenizer, tally)
        with contextlib.closing(chunks):
            buffer = _StreamBuffer(chunks)
            empty = functools.partial(self.model.init_state, 1, cache_dtype=cache_dtype(self.opts.precision))
            state = empty()
            for begin, end, score_from in _windows(self.opts):
                if self.remaining is not None:
                    end = min(end, score_from + self.remaining)
                window = buffer.window(begin, end)  # (<= end - begin,)
                end = begin + len(window)
                if end <= score_from:
                    break
                fresh = self.opts.mode == "sliding"
                nll, state = self._nll(window, end - score_from, empty() if fresh else state)
                self._record(tally, nll, window[score_from - begin :], score_from)
                if self.budget_spent():
                    tally.truncated = True
                    break
        if tally.tokens == 0:
            raise DataError(f"{doc.name!r} is empty (0 bytes); nothing to evaluate")
        tally.elapsed_s = time.perf_counter() - start
        return tally

    def per_position(self) -> list[dict[str, Any]]:
        rows = []
        for b in np.flatnonzero(self.pos_count):
            count = int(self.pos_count[b])
            rows.append(
                {
                    "start": 2 ** int(b),
                    "end": 2 ** (int(b) + 1),
                    "mean_nll": float(self.pos_sum[b] / count),
                    "count": count,
                }
            )
        return rows


def _check_inputs(model: LongContextLM, tokenizer: Tokenizer, docs: list[Document]) -> None:
    if not docs:
        raise DataError("no documents to evaluate; give at least one file with text")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.cfg.vocab_size}; use the tokenizer.json saved with the checkpoint"
        )


def evaluate_documents(
    model: LongContextLM, tokenizer: Tokenizer, docs: list[Document], opts: EvalOptions
) -> dict[str, Any]:
    """Perplexity of ``docs`` (each one stream starting with SEP), in the order given; a JSON-serialisable dict.

    Totals are sums over the files (``tokens``, ``bytes``, ``nll_sum``), so results can be re-aggregated. ``bytes``
    are the bytes of the file that were read; a file cut short by ``max_tokens`` counts the bytes of its scored
    tokens instead (``tokenizer.token_lengths``), and files after the budget is spent are not listed. Raises
    :class:`DataError` for an empty document (found when it is read: a ``Document`` of size 0 may be a stream of
    unknown length, such as stdin). The model is put in eval mode and its training flag restored after.
    """
    _check_inputs(model, tokenizer, docs)
    sizes = [d.size for d in docs]  # size 0: a stream of unknown length (stdin, a pipe); emptiness shows when read
    evaluator = _Evaluator(model, tokenizer, opts, sum(sizes) if all(sizes) else None)
    start = time.perf_counter()
    tallies: list[_Tally] = []
    interrupted = False
    try:
        with inference(model, opts.precision), evaluator.bar:
            for doc in docs:
                if evaluator.budget_spent():
                    break
                tallies.append(evaluator.document(doc))
    except KeyboardInterrupt:
        if not opts.partial_on_interrupt:
            raise
        interrupted = True
        current = evaluator.current
        if current is not None and current.tokens and (not tallies or tallies[-1] is not current):
            current.truncated = True  # its bytes: those of the scored tokens
            current.elapsed_s = time.perf_counter() - start - sum(t.elapsed_s for t in tallies)
            tallies.append(current)
    elapsed_s = time.perf_counter() - start
    result = _result(opts, tallies, evaluator, elapsed_s, model.init_state(1).nbytes())
    if interrupted:
        result["partial"] = True
    return result


def _result(
    opts: EvalOptions, tallies: list[_Tally], evaluator: _Evaluator, elapsed_s: float, state_bytes: int
) -> dict[str, Any]:
    geometry: dict[str, Any] = (
        {"seq_len": opts.seq_len} if opts.mode == "carry" else {"window": opts.window, "stride": opts.stride}
    )
    tokens = sum(t.tokens for t in tallies)
    n_bytes = sum(t.bytes for t in tallies)
    nll_sum = sum(t.nll_sum for t in tallies)
    nll_sq = sum(t.nll_sq for t in tallies)
    result: dict[str, Any] = {
        "mode": opts.mode,
        **geometry,
        "precision": opts.precision,
        "max_tokens": opts.max_tokens,
        "files": [_file_result(t) for t in tallies],
        **_metrics(tokens, n_bytes, nll_sum, nll_sq, elapsed_s),
        "state_bytes": state_bytes,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if opts.per_position_buckets:
        result["per_position"] = evaluator.per_position()
    return result


# --------------------------------------------------------------------------------------------------------------------
# output


def _header(result: dict[str, Any]) -> str:
    files = result["files"]
    if result["mode"] == "carry":
        geometry = f"mode=carry seq_len={result['seq_len']}"
    else:
        geometry = f"mode=sliding window={result['window']} stride={result['stride']}"
    limit = f" | max_tokens={result['max_tokens']:,}" if result.get("max_tokens") else ""
    limit += " | PARTIAL (interrupted)" if result.get("partial") else ""
    return (
        f"longctx eval: {result['tokens']:,} tokens ({result['bytes']:,} bytes) in {len(files)} "
        f"file{'s' if len(files) != 1 else ''} | {geometry} | precision={result.get('precision', 'fp32')}{limit}"
    )


def _file_line(f: dict[str, Any], width: int) -> str:
    return (
        f"  {f['name']:<{width}}  PPL = {f['ppl']:.4f} +/- {f['ppl_stderr']:.4f} | loss = {f['loss']:.4f} | "
        f"bpb = {f['bits_per_byte']:.4f} | tokens = {f['tokens']:,} | bytes = {f['bytes']:,} | "
        f"{f['tokens_per_s']:,.0f} tokens/s"
    )


def _position_lines(rows: list[dict[str, Any]]) -> list[str]:
    w = len(f"{rows[-1]['end']:,}")
    return ["  mean NLL by position in the document (tokens [start, end)):"] + [
        f"    [{r['start']:>{w},}, {r['end']:>{w},})  {r['mean_nll']:.4f}  ({r['count']:,} tokens)" for r in rows
    ]


def format_report(result: dict[str, Any]) -> str:
    """Human-readable report: a header, one line per file, the per-position table if any, and the final line."""
    lines = [_header(result)]
    width = max((len(f["name"]) for f in result["files"]), default=0)
    lines += [_file_line(f, width) for f in result["files"]]
    if result.get("per_position"):
        lines += _position_lines(result["per_position"])
    lines.append(
        f"Final estimate: PPL = {result['ppl']:.4f} +/- {result['ppl_stderr']:.4f} | "
        f"loss = {result['loss']:.4f} nats/token | bpb = {result['bits_per_byte']:.4f} | "
        f"tokens = {result['tokens']:,} | bytes = {result['bytes']:,} | {result['tokens_per_s']:,.0f} tokens/s | "
        f"peak RSS = {result['peak_rss_bytes'] / 1e6:,.1f} MB | state = {result['state_bytes'] / 1e6:,.3f} MB"
    )
    return "\n".join(lines)


def write_per_position_csv(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``start,end,mean_nll,count`` rows (positions are 1-based token indices in the document, end exclusive)."""
    if "per_position" not in result:
        raise ValueError("the result has no per_position buckets; evaluate with per_position_buckets=True")
    try:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["start", "end", "mean_nll", "count"])
            for r in result["per_position"]:
                writer.writerow([r["start"], r["end"], f"{r['mean_nll']:.6f}", r["count"]])
    except OSError as e:
        raise LongctxError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from None
