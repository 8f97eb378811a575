"""Generation: read a prompt of any length through the carried state, then sample one token at a time.

Data flow::

    prompt chunks ─ segments of seq_len ─ model(segment, state) ─ ... ─ SavedState(state, tokens, last_token)
                                                                          │  (the last prompt token is kept un-fed:
                                                                          │   the first sample needs its logits)
    sample: feed last_token ─ logits ─ repetition penalty ─ temperature ─ top-k ─ top-p ─ min-p ─ multinomial
            ─ next token ─ feed it ─ ...   (the decoder's state is the cache: the prompt is never recomputed)

Memory stays bounded whatever the prompt length: :func:`read_prompt` holds at most one segment of pending tokens plus
the most recent ``keep_recent`` tokens (the history of the repetition penalty). States are immutable values, so one
:class:`PromptResult` can start any number of samples. Text is produced through the tokenizer's stream decoder, so a
multi-byte character is never split; stop strings are held back until they can no longer match.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from longctx.checkpoint import SavedState
from longctx.decoders import State
from longctx.errors import ConfigError, DataError
from longctx.model import LongContextLM, inference
from longctx.tokenizer import Tokenizer
from longctx.validate import PRECISIONS, Rule, check_options, int_at_least, number_in, one_of

RECENT_TOKENS = 1024  # prompt tokens kept for the repetition penalty by default (>= any sensible --repeat-last-n)
StopReason = Literal["length", "eos", "stop"]


# --------------------------------------------------------------------------------------------------------------------
# options


@dataclass
class SamplingOptions:
    """Sampling settings; the field names are the ``longctx generate`` flags (``top_k`` = ``--top-k``)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; relative to the most probable token
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style over the last repeat_last_n tokens (prompt included)
    repeat_last_n: int = 64  # 0 = off
    seed: int = 0  # sample i uses seed + i
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # the separator token ends a sample unless this is set

    RULES: ClassVar[tuple[Rule, ...]] = (
        int_at_least("max_new_tokens", 0),
        number_in("temperature", lambda v: 0 <= v < math.inf, ">= 0 (0 = greedy)"),
        int_at_least("top_k", 0, " (0 = off)"),
        number_in("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
        number_in("min_p", lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
        number_in("repetition_penalty", lambda v: 0 < v < math.inf, "> 0 (1 = off)"),
        int_at_least("repeat_last_n", 0, " (0 = off)"),
        int_at_least("seed", 0),
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        check_options(vars(self), self.RULES)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"--stop must be a non-empty string, got {s!r}")


READ_RULES: tuple[Rule, ...] = (
    one_of("precision", PRECISIONS),
    int_at_least("seq_len", 1),
    int_at_least("keep_recent", 0),
)


def _check_precision(precision: str) -> None:
    check_options({"precision": precision}, READ_RULES)


# --------------------------------------------------------------------------------------------------------------------
# logits processing (pure functions on fp32 logits (..., V))


def apply_repetition_penalty(logits: Tensor, recent: Iterable[int], penalty: float) -> Tensor:
    """CTRL-style penalty (Keskar et al. 2019): the logit of every token in ``recent`` is divided by ``penalty`` when
    positive and multiplied by it when negative (``penalty`` > 1 makes repeats less likely). Returns a new tensor."""
    ids = sorted(set(int(t) for t in recent))
    if penalty == 1.0 or not ids:
        return logits
    index = torch.tensor(ids, dtype=torch.int64, device=logits.device)
    picked = logits[..., index]
    out = logits.clone()
    out[..., index] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Top-k, then top-p (nucleus), then min-p; removed tokens get -inf. The most probable token is always kept."""
    neg_inf = torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more probable tokens
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = torch.where(drop, neg_inf, logits)
    if min_p > 0.0:
        probs = F.softmax(logits, dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        logits = torch.where(probs < threshold, neg_inf, logits)
    return logits


def next_token(logits: Tensor, opts: SamplingOptions, recent: Sequence[int], generator: torch.Generator) -> int:
    """Choose the next token from one position's logits (V,): repetition penalty -> temperature (0 = argmax) ->
    top-k -> top-p -> min-p -> a draw from ``generator``. ``recent`` is the penalty's history (already cut to
    ``repeat_last_n``)."""
    logits = logits.float()
    if opts.repeat_last_n > 0:
        logits = apply_repetition_penalty(logits, recent, opts.repetition_penalty)
    if opts.temperature == 0:
        return int(torch.argmax(logits, dim=-1))
    logits = filter_logits(logits / opts.temperature, opts.top_k, opts.top_p, opts.min_p)
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------------------------------------------
# running the model


@contextmanager
def _inference(model: LongContextLM, precision: str) -> Iterator[None]:
    """:func:`longctx.model.inference` after the precision is checked with a one-line error."""
    _check_precision(precision)
    with inference(model, precision):
        yield


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize(device)


def _as_ids(chunk: Any) -> np.ndarray:
    """A chunk as a 1-D int64 array; ``(ids, n_bytes)`` pairs from ``Tokenizer.iter_encode`` are accepted too."""
    if isinstance(chunk, tuple):
        chunk = chunk[0]
    return np.asarray(chunk, dtype=np.int64).reshape(-1)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise DataError(
            f"prompt token id {bad} is outside the model's vocabulary ({vocab_size} tokens); "
            "the tokenizer does not belong to this checkpoint"
        )


def _feed(model: LongContextLM, ids: np.ndarray, state: State) -> State:
    tokens = torch.from_numpy(np.ascontiguousarray(ids)).to(model.device).view(1, -1)
    return model(tokens, state).state


@dataclass
class PromptResult:
    saved: SavedState  # the state after the prompt; saved.last_token is not fed yet
    prompt_tokens: int  # tokens read from the chunks (the separator that starts a fresh stream is not counted)
    elapsed_s: float
    recent: list[int] = field(default_factory=list)  # the most recent prompt tokens (repetition-penalty history)


def read_prompt(
    model: LongContextLM,
    tokenizer: Tokenizer,
    chunks: Iterable[np.ndarray],
    seq_len: int,
    start: SavedState | None = None,
    precision: str = "fp32",
    keep_recent: int = RECENT_TOKENS,
    progress: bool = False,
) -> PromptResult:
    """Read the prompt ``chunks`` (int64 token ids) in segments of ``seq_len``, carrying the state.

    A fresh stream starts with the separator, as in training (``SEP doc ...``); with ``start`` (a loaded state) its
    pending ``last_token`` is read first, then the chunks. The last token of the stream is kept un-fed as
    ``saved.last_token``: the first sampled token needs its logits. Memory: about one segment of pending tokens plus
    the last ``keep_recent`` tokens, whatever the prompt length. ``progress``: a bar on stderr (tokens read, tokens/s)
    once reading has taken more than a second.
    """
    check_options({"precision": precision, "seq_len": seq_len, "keep_recent": keep_recent}, READ_RULES)
    t0 = time.perf_counter()
    device = model.device
    vocab_size = model.cfg.vocab_size
    recent: deque[int] = deque(maxlen=keep_recent)
    if start is None:
        state, before = model.init_state(1, device=device), 0
        pending = np.array([tokenizer.sep_id], dtype=np.int64)
    else:
        state, before = start.state.to(device), start.tokens
        pending = np.array([start.last_token], dtype=np.int64)
        _check_ids(pending, vocab_size)
        recent.append(start.last_token)
    prompt_tokens = fed = 0
    bar = tqdm(
        unit="tok", unit_scale=True, desc="prompt", file=sys.stderr, disable=not progress, delay=1.0, dynamic_ncols=True
    )
    with _inference(model, precision), bar:
        for chunk in chunks:
            ids = _as_ids(chunk)
            if ids.size == 0:
                continue
            _check_ids(ids, vocab_size)
            prompt_tokens += ids.size
            if keep_recent:
                recent.extend(ids[-keep_recent:].tolist())
            buffer = np.concatenate([pending, ids])
            full = (buffer.size - 1) // seq_len  # whole segments that leave at least one token pending
            for i in range(full):
                state = _feed(model, buffer[i * seq_len : (i + 1) * seq_len], state)
                bar.update(seq_len)
            fed += full * seq_len
            pending = buffer[full * seq_len :].copy()  # < seq_len + 1 tokens; the chunk itself is released
        if pending.size > 1:
            state = _feed(model, pending[:-1], state)
            fed += pending.size - 1
        _synchronize(device)
    saved = SavedState(state=state, tokens=before + fed, last_token=int(pending[-1]))
    return PromptResult(
        saved=saved, prompt_tokens=prompt_tokens, elapsed_s=time.perf_counter() - t0, recent=list(recent)
    )


# --------------------------------------------------------------------------------------------------------------------
# sampling


class _TextOut:
    """Collects decoded text, holding back any tail that could be the start of a stop string."""

    def __init__(self, stops: list[str], on_text: Callable[[str], None] | None) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.on_text = on_text
        self.held = ""
        self.parts: list[str] = []

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            if self.on_text is not None:
                self.on_text(text)

    def push(self, piece: str) -> bool:
        """Add decoded text; True when a stop string appeared (the text before it is emitted, the rest dropped)."""
        if not piece:
            return False
        self.held += piece
        if not self.stops:
            self._emit(self.held)
            self.held = ""
            return False
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._emit(self.held[: min(hits)])
            self.held = ""
            return True
        cut = len(self.held)  # the earliest position whose tail could still grow into a stop string
        for j in range(max(0, len(self.held) - self.longest + 1), len(self.held)):
            tail = self.held[j:]
            if any(s.startswith(tail) for s in self.stops):
                cut = j
                break
        self._emit(self.held[:cut])
        self.held = self.held[cut:]
        return False

    def finish(self) -> None:
        self._emit(self.held)
        self.held = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class SampleResult:
    text: str  # the sample's text, without a stop string that ended it
    tokens: list[int]  # the sampled tokens (those of a stop string included; an ending separator not)
    stop_reason: StopReason  # "length" (max_new_tokens), "eos" (the separator) or "stop" (a stop string)
    elapsed_s: float
    saved: SavedState | None = None  # the state after the sample (its last sampled token pending), to continue it


def iter_sample(
    model: LongContextLM,
    tokenizer: Tokenizer,
    prompt: PromptResult,
    opts: SamplingOptions,
    sample_index: int = 0,
    precision: str = "fp32",
) -> Generator[str, None, SampleResult]:
    """Sample one continuation of ``prompt`` (which is not changed) with the carried state, yielding its text.

    Yields each piece of text once it is final (never a split UTF-8 character, never (a possible start of) a stop
    string); returns the :class:`SampleResult`. Reproducible: the draws come from a generator seeded with ``opts.seed
    + sample_index`` on the model's device. Eval mode and no autograd (:func:`longctx.model.inference`) hold during
    each step only, never between two pieces, so that the caller's code in between runs as it would without this
    iterator.
    """
    _check_precision(precision)
    t0 = time.perf_counter()
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed((opts.seed + sample_index) % (1 << 64))
    state = prompt.saved.state.to(device)
    token = prompt.saved.last_token
    recent: deque[int] = deque(prompt.recent, maxlen=opts.repeat_last_n)
    decoder = tokenizer.stream_decoder()
    pieces: list[str] = []
    out = _TextOut(opts.stop, pieces.append)
    tokens: list[int] = []
    reason: StopReason = "length"
    fed = 0
    for _ in range(opts.max_new_tokens):
        with _inference(model, precision):
            step = model(torch.tensor([[token]], dtype=torch.int64, device=device), state)
            state, fed = step.state, fed + 1
            token = next_token(step.logits[0, -1], opts, recent, generator)
        if token == tokenizer.sep_id and not opts.ignore_eos:
            reason = "eos"
            break
        tokens.append(token)
        recent.append(token)
        stopped = out.push(decoder.push(token))
        yield from pieces
        pieces.clear()
        if stopped:
            reason = "stop"
            break
    if reason != "stop":
        if out.push(decoder.flush()):  # an incomplete character at the end becomes U+FFFD
            reason = "stop"
        else:
            out.finish()
    yield from pieces
    saved = SavedState(state=state, tokens=prompt.saved.tokens + fed, last_token=token)
    return SampleResult(
        text=out.text, tokens=tokens, stop_reason=reason, elapsed_s=time.perf_counter() - t0, saved=saved
    )


def sample(
    model: LongContextLM,
    tokenizer: Tokenizer,
    prompt: PromptResult,
    opts: SamplingOptions,
    sample_index: int = 0,
    on_text: Callable[[str], None] | None = None,
    precision: str = "fp32",
) -> SampleResult:
    """:func:`iter_sample` run to its end; ``on_text`` receives each piece of text once it is final."""
    pieces = iter_sample(model, tokenizer, prompt, opts, sample_index, precision)
    while True:
        try:
            piece = next(pieces)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(piece)
