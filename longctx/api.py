"""The high-level Python API: ``longctx.generate``, ``longctx.stream`` and ``longctx.evaluate``.

Each takes a checkpoint (a folder written by ``longctx train``, or a run folder: its newest checkpoint) or a model
already in memory, and gives what the command line gives: the same sampling, the same numbers as ``longctx eval
--json``. The functions are thin: the work is :mod:`longctx.sampling` and :mod:`longctx.scoring`.

::

    text = longctx.generate("runs/infinite-small", "ROMEO:\\n", max_new_tokens=100, seed=1)
    for piece in longctx.stream("runs/infinite-small", open("book.txt").read()):
        print(piece, end="", flush=True)
    result = longctx.evaluate("runs/infinite-small", ["book.txt"])     # result["bits_per_byte"], ...
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from longctx.checkpoint import load_checkpoint
from longctx.data import Document, discover
from longctx.errors import ConfigError
from longctx.model import LongContextLM, read_segment
from longctx.sampling import RECENT_TOKENS, SamplingOptions, iter_sample, read_prompt
from longctx.scoring import EvalOptions, evaluate_documents
from longctx.tokenizer import Tokenizer

ModelLike = str | Path | LongContextLM
DEFAULT_SEQ_LEN = 256  # tokens per forward call for a model given without its training config


def _load(model: ModelLike, tokenizer: Tokenizer | None, device: str) -> tuple[LongContextLM, Tokenizer, int]:
    """(model on ``device``, tokenizer, training seq_len) from a checkpoint path or a model in memory."""
    from longctx.train import resolve_device

    if isinstance(model, LongContextLM):  # stays where it is unless a device is named
        net = model if device == "auto" else model.to(resolve_device(device))
        return net, tokenizer or Tokenizer.byte_level(), DEFAULT_SEQ_LEN
    if isinstance(model, (str, Path)):
        net, loaded, config = load_checkpoint(model)
        return net.to(resolve_device(device)), tokenizer or loaded, config.train.seq_len
    raise ConfigError(f"model must be a checkpoint path or a LongContextLM, got {type(model).__name__}")


def stream(
    model: ModelLike,
    prompt: str,
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repeat_last_n: int = 64,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    seq_len: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Iterator[str]:
    """Read ``prompt`` (any length) into the memory, then yield the sampled text piece by piece, as
    ``longctx generate`` streams it. The keywords are the command's flags; ``seed=None`` draws one."""
    opts = SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repeat_last_n=repeat_last_n,
        seed=random.randrange(2**31) if seed is None else seed,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    net, tok, trained_len = _load(model, tokenizer, device)
    chunks = (ids for ids, _ in tok.iter_encode(io.BytesIO(prompt.encode("utf-8")), where="prompt"))
    read = read_prompt(
        net,
        tok,
        chunks,
        seq_len or read_segment(trained_len),
        precision=precision,
        keep_recent=max(RECENT_TOKENS, repeat_last_n),
    )
    yield from iter_sample(net, tok, read, opts, precision=precision)


def generate(model: ModelLike, prompt: str, **sampling: Any) -> str:
    """The text :func:`stream` yields, as one string."""
    return "".join(stream(model, prompt, **sampling))


def evaluate(
    model: ModelLike,
    inputs: str | Path | Sequence[str | Path],
    *,
    text: bool = False,
    tokenizer: Tokenizer | None = None,
    mode: str = "carry",
    seq_len: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int = 0,
    per_position: bool = False,
    device: str = "auto",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of ``inputs`` (files, folders or globs; with ``text=True`` strings to score
    as documents), the memory carried through each: the dict ``longctx eval --json`` prints."""
    net, tok, trained_len = _load(model, tokenizer, device)
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if text:
        docs = [
            Document(f"<text {i}>", len(s.encode("utf-8")), 0, lambda s=s: io.BytesIO(s.encode("utf-8")))
            for i, s in enumerate(items)
        ]
    else:
        docs = discover([str(p) for p in items])
    win = window or seq_len or trained_len
    opts = EvalOptions(
        mode=mode,
        seq_len=seq_len or read_segment(trained_len),
        window=win,
        stride=stride or max(1, win // 2),
        max_tokens=max_tokens,
        per_position_buckets=per_position,
        precision=precision,
    )
    return evaluate_documents(net, tok, docs, opts)
