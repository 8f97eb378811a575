"""How far back does a model read? Three probes by distance (``longctx probe``).

Every probe reads its streams as ``longctx eval`` reads a file in carry mode: the document separator first, then
segments of ``seq_len`` tokens with the decoder's memory carried from one segment to the next. Streams of equal
length are read side by side as the rows of one batch; rows never interact (the contract's batch independence).

- ``copy`` (zero-shot): a passage of ``span`` bytes is planted in filler text and repeated ``distance`` bytes later;
  the score is how many bits per byte the first occurrence saves on the repeat, against a control stream whose
  first occurrence is another passage (Khandelwal et al. 2018 measure the same thing by shuffling and replacing
  context). Passages are natural text from elsewhere in the filler by default (``content="text"``): random strings
  of letters and digits are copied only by models that match several bytes of context, which small models learn
  late, so they measure nothing at small budgets.
- ``context`` (zero-shot, after Khandelwal et al. 2018, "Sharp Nearby, Fuzzy Far Away"): the loss of the same tokens
  predicted with the memory carried through the whole document, and with the memory cut to the last ``d`` tokens
  (read from an empty state, in strided windows as ``eval --mode sliding`` reads them); the difference is what the
  context beyond ``d`` is worth.
- ``recall`` (needs training on the data :func:`write_recall_data` makes): documents of filler text in which keys
  (single characters that never occur in the filler) are followed by a digit; the first occurrence of a key states
  its value and every later one asks for it. The score is the greedy accuracy of the value by distance to the
  key's previous occurrence (chance: one in ten). Half the training documents are lists of events without filler,
  which teach the lookup; a small model learns it only with ``model.previous_token_embedding`` (see the README).

Positions, distances and spans are in bytes of text, as users count them; with the byte tokenizer a byte is a token.
Pieces of a stream are tokenized separately and concatenated, so that a BPE tokenizer cannot merge a planted passage
with the filler around it: a repeated passage is the same tokens as its first occurrence.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from longctx.errors import ConfigError, DataError
from longctx.model import LongContextLM, cache_dtype, inference
from longctx.tokenizer import Tokenizer
from longctx.validate import PRECISIONS, Rule, check_options, int_at_least, one_of

log = logging.getLogger("longctx")

LN2 = math.log(2.0)
TASKS = ("copy", "context", "recall")
DEFAULT_COPY_DISTANCES = (64, 256, 1024, 4096, 16384)
DEFAULT_CONTEXT_DISTANCES = tuple(2**k for k in range(5, 15))  # 32 ... 16384 tokens
DEFAULT_RECALL_DISTANCES = (16, 64, 256, 1024, 4096)
PASSAGE_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Recall keys: Greek letters. Each is two bytes in UTF-8 and their last bytes differ, so with the byte tokenizer the
# byte before a value names its key; none occurs in the bundled plays (checked against the filler when data is made).
RECALL_KEYS = "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"
RECALL_VALUES = "0123456789"
RECALL_SPEC = "recall.json"  # written beside the train/ and test/ folders; says which characters are keys
BATCH_ROWS = 16  # streams read side by side in one forward call


# --------------------------------------------------------------------------------------------------------------------
# reading streams as eval does


@dataclass
class ProbeOptions:
    """How the probe reads (the same meaning as ``eval``'s options)."""

    seq_len: int = 256  # tokens per forward call; the memory is carried across calls
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_rows: int = BATCH_ROWS
    progress: bool = False

    RULES: ClassVar[tuple[Rule, ...]] = (
        int_at_least("seq_len", 1),
        one_of("precision", PRECISIONS),
        int_at_least("batch_rows", 1),
    )

    def __post_init__(self) -> None:
        check_options(vars(self), self.RULES)


def read_rows(model: LongContextLM, rows: np.ndarray, opts: ProbeOptions) -> tuple[np.ndarray, np.ndarray]:
    """Read streams rows (B, N) int64 from an empty memory in carry mode; (nll, argmax), each (B, N - 1).

    ``nll[:, i]`` (float64, nats) and ``argmax[:, i]`` are the prediction of token ``i + 1`` from tokens ``0..i``.
    Runs under :func:`longctx.model.inference` (eval mode, no autograd, bf16 autocast if asked).
    """
    with inference(model, opts.precision):
        return _read_rows(model, rows, opts)


def _read_rows(model: LongContextLM, rows: np.ndarray, opts: ProbeOptions) -> tuple[np.ndarray, np.ndarray]:
    tokens = torch.from_numpy(np.ascontiguousarray(rows)).to(model.device)  # (B, N)
    B, N = tokens.shape
    state = model.init_state(B, cache_dtype=cache_dtype(opts.precision))
    nll = np.empty((B, N - 1), dtype=np.float64)
    argmax = np.empty((B, N - 1), dtype=np.int64)
    for a in range(0, N - 1, opts.seq_len):
        b = min(a + opts.seq_len, N - 1)
        out = model(tokens[:, a:b], state)  # logits (B, T, V)
        state = out.state
        logits = out.logits.float()  # (B, T, V)
        targets = tokens[:, a + 1 : b + 1]  # (B, T)
        nll[:, a:b] = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().cpu().numpy()
        argmax[:, a:b] = logits.argmax(dim=-1).cpu().numpy()
    return nll, argmax


def read_streams(
    model: LongContextLM, streams: Sequence[np.ndarray], opts: ProbeOptions, bar: tqdm | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(nll, argmax) of each stream (N_i,), as :func:`read_rows`; streams of equal length share forward calls."""
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(streams):
        by_length.setdefault(len(s), []).append(i)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(streams)
    for indices in by_length.values():
        for k in range(0, len(indices), opts.batch_rows):
            group = indices[k : k + opts.batch_rows]
            nll, argmax = read_rows(model, np.stack([streams[i] for i in group]), opts)
            for row, i in enumerate(group):
                results[i] = (nll[row], argmax[row])
            if bar is not None:
                bar.update(sum(len(streams[i]) for i in group))
    return [r for r in results if r is not None]


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``s / sqrt(n)`` (0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), 0.0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


# --------------------------------------------------------------------------------------------------------------------
# filler


def _utf8_start(data: bytes, i: int) -> int:
    """The first character boundary at or after byte ``i``."""
    while i < len(data) and (data[i] & 0xC0) == 0x80:
        i += 1
    return i


@dataclass
class Filler:
    """Natural text to plant probes in: the documents' bytes, one per document (each at least ``min_bytes``)."""

    texts: list[bytes]
    names: list[str]

    @property
    def longest(self) -> int:
        return max((len(t) for t in self.texts), default=0)

    def slice(self, rng: random.Random, n_bytes: int) -> bytes:
        """``n_bytes`` (or up to 3 fewer, to end on a character boundary) of one document, from a random start."""
        candidates = [t for t in self.texts if len(t) >= n_bytes]
        if not candidates:
            raise DataError(
                f"the filler has no document of {n_bytes:,} bytes (the longest has {self.longest:,}); "
                "give longer --filler files or smaller --distances"
            )
        text = rng.choice(candidates)
        start = _utf8_start(text, rng.randrange(len(text) - n_bytes + 1))
        end = start + n_bytes
        while end > start and end < len(text) and (text[end] & 0xC0) == 0x80:
            end -= 1
        return text[start:end]


def document_stream(tokenizer: Tokenizer, data: bytes) -> np.ndarray:
    """A document as eval reads it: the separator, then its tokens (N + 1,) int64."""
    return np.concatenate([[tokenizer.sep_id], tokenizer.encode_bytes(data)]).astype(np.int64)


def load_filler(docs: Sequence[Any], strip: str = "") -> Filler:
    """The filler texts of ``docs`` (:class:`longctx.data.Document`), with the characters of ``strip`` removed."""
    texts, names = [], []
    for doc in docs:
        with doc.open() as f:
            data = f.read()
        if strip:
            text = data.decode("utf-8", errors="replace")
            data = text.translate({ord(c): None for c in strip}).encode("utf-8")
        if data.strip():
            texts.append(data)
            names.append(doc.name)
    if not texts:
        raise DataError("the filler is empty; give --filler files with text")
    return Filler(texts, names)


# --------------------------------------------------------------------------------------------------------------------
# recall: the data


@dataclass
class RecallSpec:
    """The recall task's format: which characters are keys, which are values, how dense the training data is.

    An event is ``" " + key + value + " "`` planted in the filler. In a document, a key's first event states its
    value and its later events repeat it; the model is scored on the value of each later event.
    """

    keys: str = RECALL_KEYS
    values: str = RECALL_VALUES
    event_every: int = 16  # training documents with filler: one event per this many bytes of document, on average
    # training: the share of documents that are only events (a few keys, each stated then asked again and again, no
    # filler): they teach the lookup itself, the others teach it across filler and distance
    list_share: float = 0.5
    list_keys: int = 8  # keys per list document
    queries_per_key: int = 3  # training: events after a key's first
    min_length: int = 1024  # training documents: bytes, drawn log-uniformly between these two
    max_length: int = 8192
    min_gap: int = 8  # training: distance from a key's first event to each later one, log-uniform in between
    max_gap: int = 4096
    distances: tuple[int, ...] = DEFAULT_RECALL_DISTANCES  # test: the distances asked, each as often

    def __post_init__(self) -> None:
        if len(set(self.keys)) != len(self.keys) or not self.keys:
            raise ConfigError("recall keys must be distinct characters")
        if set(self.keys) & set(self.values) or not self.values:
            raise ConfigError("recall values must be characters that are not keys")
        if not 1 <= self.min_gap <= self.max_gap:
            raise ConfigError(f"recall gaps must satisfy 1 <= min_gap <= max_gap, got {self.min_gap}, {self.max_gap}")
        if not 64 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"recall document lengths must satisfy 64 <= min <= max, got {self.min_length}, {self.max_length}"
            )
        if self.event_every < 8 or self.queries_per_key < 1:
            raise ConfigError("recall event_every must be >= 8 and queries_per_key >= 1")
        if not 0.0 <= self.list_share <= 1.0 or not 1 <= self.list_keys <= len(self.keys):
            raise ConfigError(
                f"recall list_share must be in [0, 1] and list_keys in [1, {len(self.keys)}], "
                f"got {self.list_share}, {self.list_keys}"
            )
        if not self.distances or min(self.distances) < 6:
            raise ConfigError("recall distances must be at least 6 bytes (an event is 5)")

    @classmethod
    def from_json(cls, text: str, where: str) -> RecallSpec:
        try:
            raw = json.loads(text)
            raw["distances"] = tuple(int(d) for d in raw["distances"])
            raw.setdefault("list_share", 0.0)  # data written before list documents existed has none
            raw.setdefault("list_keys", cls.list_keys)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where} is not a recall spec written by `longctx probe make-data` ({e})") from None


def _event(key: str, value: str) -> str:
    return f" {key}{value} "


EVENT_CHARS = 5  # " " + key + value + " "
VALUE_AT = 2  # characters from an event's start to its value


def _assemble(filler: str, events: list[tuple[int, str]]) -> str:
    """Filler with ``events`` (start in the result, text) planted at exactly those positions (in characters)."""
    out, used, end = [], 0, 0
    for start, text in sorted(events):
        take = start - end
        out.append(filler[used : used + take])
        used += take
        out.append(text)
        end = start + len(text)
    out.append(filler[used:])
    return "".join(out)


def _place(rng: random.Random, length: int, wanted: list[list[int]], taken: list[tuple[int, int]]) -> list[int] | None:
    """Shift a group of event starts (offsets from the group's first) to a random place in ``[0, length)`` where
    none overlaps ``taken`` (start, end) intervals; None if 20 tries fail. ``wanted`` holds one group's offsets."""
    offsets = wanted[0]
    span = offsets[-1] + EVENT_CHARS
    if span > length:
        return None
    for _ in range(20):
        base = rng.randrange(length - span + 1)
        starts = [base + o for o in offsets]
        if all(s + EVENT_CHARS + 1 <= a or b + 1 <= s for s in starts for a, b in taken):
            return starts
    return None


def recall_document(
    rng: random.Random, filler: Filler, spec: RecallSpec, length: int, groups: list[list[int]]
) -> tuple[str, list[list[int]]]:
    """A document of about ``length`` characters: filler with one key per group of event offsets (the first event
    states the value, the others ask for it); and the groups that did not fit."""
    body = filler.slice(rng, length).decode("utf-8", errors="replace")
    keys = rng.sample(spec.keys, min(len(spec.keys), len(groups)))
    events: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    left = groups[len(keys) :]
    for key, offsets in zip(keys, groups):
        starts = _place(rng, len(body), [offsets], taken)
        if starts is None:
            left.append(offsets)
            continue
        value = rng.choice(spec.values)
        for s in starts:
            events.append((s, _event(key, value)))
            taken.append((s, s + EVENT_CHARS))
    n_filler = len(body) - sum(len(t) for _, t in events)
    return _assemble(body[: max(n_filler, 0)], events), left


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def list_document(rng: random.Random, spec: RecallSpec, length: int) -> str:
    """Events only, about ``length`` characters: ``spec.list_keys`` keys in random order, each stated by its first
    event and asked by every later one."""
    keys = rng.sample(spec.keys, spec.list_keys)
    values: dict[str, str] = {}
    events = []
    for _ in range(max(1, length // EVENT_CHARS)):
        key = rng.choice(keys)
        events.append(_event(key, values.setdefault(key, rng.choice(spec.values))))
    return "".join(events)


def training_document(rng: random.Random, filler: Filler, spec: RecallSpec) -> str:
    """Dense training data: a list of events (``spec.list_share`` of the documents), else keys planted in filler
    whose later events come at log-uniform gaps, so most distances are short."""
    length = min(_log_uniform(rng, spec.min_length, spec.max_length), filler.longest)
    if rng.random() < spec.list_share:
        return list_document(rng, spec, length)
    n_keys = max(1, min(len(spec.keys), length // (spec.event_every * (1 + spec.queries_per_key))))
    groups = []
    for _ in range(n_keys):
        gaps = sorted(
            _log_uniform(rng, spec.min_gap, min(spec.max_gap, length // 2)) for _ in range(spec.queries_per_key)
        )
        offsets = [0]
        for g in gaps:  # later events at least one event apart
            offsets.append(max(g, offsets[-1] + EVENT_CHARS + 1))
        groups.append(offsets)
    return recall_document(rng, filler, spec, length, groups)[0]


def recall_test_documents(rng: random.Random, filler: Filler, spec: RecallSpec, queries: int) -> list[str]:
    """Documents with one question per key, at each of ``spec.distances`` (in characters from the key's first
    event), ``queries`` times each; a question that does not fit in one document goes to the next."""
    pending = [[0, d] for d in spec.distances for _ in range(queries)]
    rng.shuffle(pending)
    length = max(spec.distances) + 1024
    per_doc = max(1, min(len(spec.keys), length // (8 * EVENT_CHARS)))
    docs = []
    while pending:
        groups = sorted(pending[:per_doc], key=lambda g: -g[1])  # the long ones first: they need the most room
        text, left = recall_document(rng, filler, spec, length, groups)
        if len(left) == len(groups):
            raise DataError(
                f"cannot plant recall questions at {groups[0][1]:,} characters in a {length:,}-character document"
            )
        docs.append(text)
        pending = left + pending[per_doc:]
    return docs


def write_recall_data(
    out: Path, filler: Filler, spec: RecallSpec, n_docs: int, queries: int, seed: int
) -> dict[str, Any]:
    """``out/train/`` (``n_docs`` training documents), ``out/test/`` and ``out/recall.json``; a summary dict."""
    rng = random.Random(seed)
    for name in ("train", "test"):
        (out / name).mkdir(parents=True, exist_ok=True)
    n_bytes = 0
    for i in range(n_docs):
        text = training_document(rng, filler, spec)
        n_bytes += len(text.encode("utf-8"))
        (out / "train" / f"recall-{i:06d}.txt").write_text(text, encoding="utf-8")
    tests = recall_test_documents(rng, filler, spec, queries)
    for i, text in enumerate(tests):
        (out / "test" / f"recall-{i:06d}.txt").write_text(text, encoding="utf-8")
    summary = {
        **asdict(spec),
        "seed": seed,
        "train_docs": n_docs,
        "train_bytes": n_bytes,
        "test_docs": len(tests),
        "queries_per_distance": queries,
    }
    (out / RECALL_SPEC).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


@dataclass(frozen=True)
class Question:
    """A later event of a key: its value (byte offset in the document, the digit) and its distance in bytes to the
    key's previous event's value."""

    offset: int
    value: str
    distance: int


def find_questions(data: bytes, spec: RecallSpec) -> list[Question]:
    """Every later event of every key in a document's bytes, in order."""
    text = data.decode("utf-8", errors="replace")
    keys, values = set(spec.keys), set(spec.values)
    last: dict[str, int] = {}
    questions = []
    byte_at = 0
    for i, ch in enumerate(text):
        if ch in keys and i + 1 < len(text) and text[i + 1] in values:
            offset = byte_at + len(ch.encode("utf-8"))  # the value's byte
            if ch in last:
                questions.append(Question(offset, text[i + 1], offset - last[ch]))
            last[ch] = offset
        byte_at += len(ch.encode("utf-8"))
    return questions


# --------------------------------------------------------------------------------------------------------------------
# results


def _nearest(distance: float, ladder: Sequence[int]) -> int:
    """The ladder value nearest to ``distance`` on a log scale."""
    return min(ladder, key=lambda d: abs(math.log(distance / d)))


@dataclass
class ProbeResult:
    """One probe's report: JSON-serialisable through :meth:`to_dict`."""

    task: str
    settings: dict[str, Any]
    distances: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **self.settings, "notes": self.notes, "distances": self.distances}


MIN_GAIN = 1e-4  # bits per byte: smaller gains are float rounding (the same context read in other segments)


def reach(rows: list[dict[str, Any]], key: str, baseline: float = 0.0, floor: float = 0.0) -> int | None:
    """The largest distance whose ``key`` is more than 2 standard errors above ``baseline`` and more than ``floor``
    above it (None if none is)."""
    above = [r["distance"] for r in rows if r[key] - 2 * r["stderr"] > baseline and r[key] > baseline + floor]
    return max(above) if above else None


# --------------------------------------------------------------------------------------------------------------------
# recall: scoring


def _token_offsets(ids: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Byte offset (N + 1,) of each token of ``ids`` (N,) in the text they encode, and the total."""
    lengths = tokenizer.token_lengths[ids]  # (N,)
    return np.concatenate([[0], np.cumsum(lengths)])


def score_recall(
    model: LongContextLM, tokenizer: Tokenizer, texts: Sequence[bytes], spec: RecallSpec, opts: ProbeOptions
) -> ProbeResult:
    """Greedy accuracy of every question's value, by distance (bucketed to the nearest of ``spec.distances``)."""
    streams, questions = [], []
    unclean = 0
    values = {tokenizer.encode_text(v).tolist()[0]: v for v in spec.values if len(tokenizer.encode_text(v)) == 1}
    for data in texts:
        ids = tokenizer.encode_bytes(data)
        offsets = _token_offsets(ids, tokenizer)  # (N + 1,)
        found = []
        for q in find_questions(data, spec):
            t = int(np.searchsorted(offsets, q.offset))  # the token that starts at the value's byte, if any
            if t >= len(ids) or offsets[t] != q.offset or values.get(int(ids[t])) != q.value:
                unclean += 1  # the tokenizer merged the value with its neighbours: no single token to predict
                continue
            found.append((t + 1, q))  # stream position: after the separator
        streams.append(np.concatenate([[tokenizer.sep_id], ids]).astype(np.int64))
        questions.append(found)
    bar = tqdm(
        total=sum(len(s) for s in streams),
        unit="tok",
        desc="probe recall",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    with bar:
        read = read_streams(model, streams, opts, bar)
    hits: dict[int, list[float]] = {d: [] for d in spec.distances}
    for (_, argmax), found in zip(read, questions):
        for pos, q in found:
            predicted = values.get(int(argmax[pos - 1]))
            hits[_nearest(q.distance, spec.distances)].append(float(predicted == q.value))
    rows = []
    for d in spec.distances:
        acc, se = _mean_stderr(hits[d]) if hits[d] else (math.nan, 0.0)
        rows.append({"distance": d, "accuracy": acc, "stderr": se, "queries": len(hits[d])})
    notes = [f"chance accuracy: {1 / len(spec.values):.3f}"]
    if unclean:
        notes.append(f"{unclean} questions skipped: the tokenizer merged their value with the text around it")
    return ProbeResult("recall", {"chance": 1 / len(spec.values)}, rows, notes)


# --------------------------------------------------------------------------------------------------------------------
# copy


PREFIX_BYTES = 128  # filler before the first occurrence, so that it is not read right after the separator


def _passage(rng: random.Random, filler: Filler, span: int, content: str) -> bytes:
    """``span`` bytes to plant: natural text from a random place in the filler, starting at a word, or a random
    string of letters and digits."""
    if content == "random":
        return "".join(rng.choice(PASSAGE_ALPHABET) for _ in range(span)).encode()
    text = filler.slice(rng, span + 64)
    start = text.find(b" ") + 1
    if start == 0 or start + span > len(text):
        start = 0
    piece = text[start : start + span]
    return piece[: len(piece.decode("utf-8", errors="ignore").encode("utf-8"))]  # no character cut at the end


def copy_trial(
    rng: random.Random, filler: Filler, tokenizer: Tokenizer, span: int, distance: int, content: str
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(repeat stream, control stream, tokens of the repeat, its bytes). Both streams are
    ``SEP prefix first filler repeat``; the first occurrence is the repeat's passage or another one."""
    context = filler.slice(rng, PREFIX_BYTES + distance)
    cut = _utf8_start(context, PREFIX_BYTES)
    passage, other = _passage(rng, filler, span, content), _passage(rng, filler, span, content)
    while other == passage:
        other = _passage(rng, filler, span, content)
    enc = tokenizer.encode_bytes
    sep = np.array([tokenizer.sep_id], dtype=np.int64)
    prefix, gap, repeat = enc(context[:cut]), enc(context[cut:]), enc(passage)
    first, control = enc(passage), enc(other)
    return (
        np.concatenate([sep, prefix, first, gap, repeat]),
        np.concatenate([sep, prefix, control, gap, repeat]),
        len(repeat),
        len(passage),
    )


def score_copy(
    model: LongContextLM,
    tokenizer: Tokenizer,
    filler: Filler,
    distances: Sequence[int],
    span: int,
    trials: int,
    content: Literal["text", "random"],
    seed: int,
    opts: ProbeOptions,
) -> ProbeResult:
    """Bits per byte the first occurrence of a passage saves on its repeat, per distance (mean over trials)."""
    need = PREFIX_BYTES + max(distances)
    if filler.longest < need:
        raise DataError(
            f"--distances up to {max(distances):,} bytes need a filler document of {need:,} bytes; the "
            f"longest has {filler.longest:,}: give longer --filler files or smaller --distances"
        )
    rng = random.Random(seed)
    plan = [(d, copy_trial(rng, filler, tokenizer, span, d, content)) for d in distances for _ in range(trials)]
    streams = [s for _, (rep, ctl, _, _) in plan for s in (rep, ctl)]
    bar = tqdm(
        total=sum(len(s) for s in streams),
        unit="tok",
        desc="probe copy",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    with bar:
        read = read_streams(model, streams, opts, bar)
    per_distance: dict[int, list[tuple[float, float]]] = {d: [] for d in distances}
    for k, (d, (_, _, n_tok, n_bytes)) in enumerate(plan):
        nll_rep = read[2 * k][0][-n_tok:].sum() / (n_bytes * LN2)  # bits per byte on the repeat
        nll_ctl = read[2 * k + 1][0][-n_tok:].sum() / (n_bytes * LN2)
        per_distance[d].append((float(nll_rep), float(nll_ctl)))
    rows = []
    for d in distances:
        pairs = per_distance[d]
        gain, se = _mean_stderr([c - r for r, c in pairs])
        rows.append(
            {
                "distance": d,
                "gain_bits_per_byte": gain,
                "stderr": se,
                "nll_repeat": float(np.mean([r for r, _ in pairs])),
                "nll_control": float(np.mean([c for _, c in pairs])),
                "trials": len(pairs),
            }
        )
    notes = ["nll_* are bits per byte of the repeated passage; gain = control - repeat"]
    if tokenizer.kind != "byte":
        notes.append(
            "passages and filler were tokenized separately, so that the repeat is the same tokens as the "
            "first occurrence (the BPE tokens at their borders differ from those of the joined text)"
        )
    return ProbeResult("copy", {"span": span, "trials": trials, "content": content, "seed": seed}, rows, notes)


# --------------------------------------------------------------------------------------------------------------------
# context


SE_BLOCK = 256  # tokens per block for the standard error of the context task (neighbouring tokens are correlated)


def _cut_windows(stream: np.ndarray, first: int, n: int, d: int) -> tuple[np.ndarray, int]:
    """Windows (W, d + s) that score positions ``[first, first + n)`` of ``stream`` with ``d`` to ``d + s - 1``
    tokens of context each (``s = max(1, d // 2)``), and ``s``. Window k reads ``stream[a - d : a + s]`` for
    ``a = first + k * s`` and scores its last ``s`` predictions."""
    s = max(1, d // 2)
    starts = range(first, first + n, s)
    return np.stack([stream[a - d : a + s] for a in starts]), s


def score_context(
    model: LongContextLM,
    tokenizer: Tokenizer,
    streams: Sequence[np.ndarray],
    distances: Sequence[int],
    tokens: int,
    opts: ProbeOptions,
) -> ProbeResult:
    """What the context beyond ``d`` tokens is worth: mean NLL with the memory cut to ``d`` (to ``1.5 d``) tokens
    minus with the memory carried from the start of the document, on the same tokens, in bits per byte.

    ``streams`` are documents as eval reads them (``SEP`` first). The scored tokens are those at positions
    ``[first, first + n)`` of each, where ``first`` exceeds the longest cut context, so every scored token's carried
    memory reaches further back than any cut; ``tokens`` are spread over the documents that are long enough.
    """
    ladder = sorted(distances)
    step_max = max(1, ladder[-1] // 2)
    first = ladder[-1] + step_max + 1
    need = first + SE_BLOCK + step_max
    long_enough = [s for s in streams if len(s) >= need]
    if not long_enough:
        longest = max((len(s) for s in streams), default=0)
        raise DataError(
            f"--distances up to {ladder[-1]:,} tokens need a document of at least {need:,} tokens; the "
            f"longest filler document has {longest:,}: give longer files or smaller --distances"
        )
    plan, left = [], tokens
    for i, s in enumerate(long_enough):
        n = min(len(s) - first - step_max, -(-left // (len(long_enough) - i)))
        n -= n % SE_BLOCK if n > SE_BLOCK else 0
        if n > 0:
            plan.append((s[: first + n + step_max], n))  # the last window may read past the scored tokens
            left -= n
        if left <= 0:
            break
    total = sum(first + n for _, n in plan) + sum(_cut_cost(n, d) for _, n in plan for d in ladder)
    bar = tqdm(
        total=total, unit="tok", desc="probe context", file=sys.stderr, disable=not opts.progress, dynamic_ncols=True
    )
    rows = []
    with bar:
        carried = [nll[first - 1 :] for nll, _ in read_streams(model, [s[: first + n] for s, n in plan], opts, bar)]
        lengths = [tokenizer.token_lengths[s[first : first + n]] for s, n in plan]  # (n,) bytes of each scored token
        for d in ladder:
            diffs = []
            for (s, n), base in zip(plan, carried):
                windows, step = _cut_windows(s, first, n, d)
                cut = np.concatenate([r[0][-step:] for r in read_streams(model, list(windows), opts, bar)])[:n]
                diffs.append(cut - base)  # (n,) nats
            rows.append(_context_row(d, diffs, lengths))
    notes = [
        "cut to d: each scored token read with d to 1.5 d tokens of context, from an empty state",
        f"standard errors over blocks of {SE_BLOCK} tokens",
    ]
    return ProbeResult("context", {"tokens": sum(n for _, n in plan), "first_position": first}, rows, notes)


def _cut_cost(n: int, d: int) -> int:
    s = max(1, d // 2)
    return -(-n // s) * (d + s)


def _context_row(d: int, diffs: list[np.ndarray], lengths: list[np.ndarray]) -> dict[str, Any]:
    """Gain in bits per byte (sum of NLL differences over the bytes of the scored tokens) and its standard error
    over blocks of SE_BLOCK tokens."""
    diff, n_bytes = np.concatenate(diffs), np.concatenate(lengths).astype(np.float64)
    blocks = [(diff[k : k + SE_BLOCK].sum(), n_bytes[k : k + SE_BLOCK].sum()) for k in range(0, len(diff), SE_BLOCK)]
    per_block = [nll / (b * LN2) for nll, b in blocks if b > 0]
    _, se = _mean_stderr(per_block)
    return {
        "distance": d,
        "gain_bits_per_byte": float(diff.sum() / (n_bytes.sum() * LN2)),
        "stderr": se,
        "tokens": int(len(diff)),
    }


# --------------------------------------------------------------------------------------------------------------------
# output


SCORE_KEYS = {"copy": "gain_bits_per_byte", "context": "gain_bits_per_byte", "recall": "accuracy"}
UNITS = {
    "copy": "bytes between the occurrences",
    "context": "tokens of context kept",
    "recall": "bytes to the previous occurrence",
}


def format_probe(report: dict[str, Any]) -> str:
    """The human-readable table of a probe's report."""
    task = report["task"]
    key = SCORE_KEYS[task]
    lines = [
        f"longctx probe --task {task}: {report.get('preset') or report.get('decoder')} "
        f"({report.get('checkpoint', '?')}) | distance = {UNITS[task]}"
    ]
    for row in report["distances"]:
        line = f"  {row['distance']:>7,}  {key} = {row[key]:+.4f} +/- {row['stderr']:.4f}"
        if task == "copy":
            line += f" | nll repeat {row['nll_repeat']:.4f}, control {row['nll_control']:.4f} | {row['trials']} trials"
        elif task == "context":
            line += f" | {row['tokens']:,} tokens"
        else:
            line += f" | {row['queries']} questions"
        lines.append(line)
    baseline = report.get("chance", 0.0)
    found = reach(report["distances"], key, baseline, 0.0 if task == "recall" else MIN_GAIN)
    lines.append(
        f"  reach: {found:,}"
        if found is not None
        else "  reach: none (no distance is 2 standard errors above " + ("chance)" if task == "recall" else "zero)")
    )
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def plot_probe(reports: Sequence[dict[str, Any]], path: Path, marks: dict[str, int] | None = None) -> None:
    """One line per report (score against distance, log scale, error bars of 2 standard errors); ``marks`` draws a
    dotted vertical line per label (e.g. each decoder's theoretical reach)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    task = reports[0]["task"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab10" if len(reports) <= 10 else "tab20").colors
    for i, report in enumerate(reports):
        rows = report["distances"]
        label = report.get("label") or report.get("preset") or report.get("decoder") or f"run {i}"
        colour = colours[i % len(colours)]
        ax.errorbar(
            [r["distance"] for r in rows],
            [r[SCORE_KEYS[task]] for r in rows],
            yerr=[2 * r["stderr"] for r in rows],
            marker="o",
            capsize=3,
            color=colour,
            label=label,
        )
        if marks and label in marks:
            ax.axvline(marks[label], color=colour, linestyle=":", alpha=0.7)
    if task == "recall":
        ax.axhline(reports[0].get("chance", 0.1), color="grey", linewidth=1, label="chance")
    else:
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_yscale("symlog", linthresh=1e-3)  # gains span 1e-4 to 1 bit per byte: linear below 0.001
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel(UNITS[task])
    ax.set_ylabel(
        {
            "copy": "bits per byte saved on the repeat",
            "context": "bits per byte the context beyond d is worth",
            "recall": "accuracy of the value",
        }[task]
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
