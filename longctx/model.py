"""LongContextLM: token embedding -> decoder -> final norm -> tied output head, and the loss.

The model knows no decoder internals: it builds ``DECODERS[cfg.decoder]`` and speaks to it through the contract in
``longctx/decoders/base.py``. Loss is mean cross-entropy in nats per token, computed in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.config import ModelConfig
from longctx.decoders import DECODERS, DecoderOutput, State
from longctx.errors import LongctxError


@dataclass(frozen=True)
class LMOutput:
    logits: Tensor  # (B, T, V)
    state: State  # the decoder state after this segment
    loss: Tensor | None  # mean NLL (nats/token) over the targets, None without targets
    aux_loss: Tensor  # decoder's auxiliary loss (scalar, zero when unused)
    stats: dict[str, float]


class LongContextLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = DECODERS[cfg.decoder](cfg)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied (Press & Wolf 2017)
        nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.init_std)
        self.previous_embed = None  # row 0: no token before (a stream's or a document's first token)
        if cfg.previous_token_embedding:
            self.previous_embed = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
            nn.init.normal_(self.previous_embed.weight, mean=0.0, std=cfg.init_std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, cache_dtype: torch.dtype | None = None
    ) -> State:
        """Empty memory for ``batch_size`` streams, on ``device`` (default: the model's). ``cache_dtype``: the dtype of
        the attention caches (the decoder's ``PROJECTED`` fields), e.g. bf16 for reading under bf16 autocast
        (:func:`cache_dtype`); the other fields keep the model's dtype."""
        state = self.decoder.init_state(batch_size, device or self.device, self.dtype)
        if cache_dtype is not None:
            state = dataclasses.replace(state, **{f: getattr(state, f).to(cache_dtype) for f in self.decoder.PROJECTED})
        if self.previous_embed is None:
            return state
        none = torch.zeros(batch_size, dtype=torch.int64, device=device or self.device)
        return with_previous_token(type(state))(**state.tensors(), previous_token=none)

    def forward(self, tokens: Tensor, state: State, targets: Tensor | None = None) -> LMOutput:
        """tokens (B, T) int64 after the memory in ``state``; targets (B, T) int64, -100 = ignored."""
        x = self.embed(tokens)  # (B, T, D)
        if self.previous_embed is not None:
            x = x + self.previous_embed(self.previous_ids(tokens, state))
            inner = type(state).inner(**{k: v for k, v in state.tensors().items() if k != "previous_token"})
            out = self.decode(tokens, self.drop(x), inner)
            state_out = type(state)(**out.state.tensors(), previous_token=tokens[:, -1] + 1)
            out = DecoderOutput(hidden=out.hidden, state=state_out, aux_loss=out.aux_loss, stats=out.stats)
        else:
            out = self.decode(tokens, self.drop(x), state)
        logits = self.head(self.norm(out.hidden))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits=logits, state=out.state, loss=loss, aux_loss=out.aux_loss, stats=out.stats)

    def previous_ids(self, tokens: Tensor, state: State) -> Tensor:
        """(B, T) int64 rows of ``previous_embed``: 1 + the token before each token (the state's for the first
        column), 0 where none comes before: a stream's first token and every separator (a document starts there
        from an empty memory, as evaluation starts a file)."""
        prev = torch.cat([state.previous_token[:, None], tokens[:, :-1] + 1], dim=1)  # type: ignore[attr-defined]
        if self.cfg.reset_at_separator and self.cfg.separator_id >= 0:
            prev = prev.masked_fill(tokens == self.cfg.separator_id, 0)
        return prev

    def decode(self, tokens: Tensor, x: Tensor, state: State) -> DecoderOutput:
        """The decoder over ``x`` (B, T, D), with the memory of a row emptied at each document separator.

        Document boundaries: every row whose token at column ``c`` is the separator starts ``c`` from an empty
        memory, exactly as evaluation starts a file, so nothing crosses a separator and the model never meets in
        evaluation an empty memory it did not see in training. The segment is cut at every column where some row
        has a separator; by chunking invariance the pieces give the outputs one call would, and between two pieces
        the rows that start a document are reset. Separators are rare in text (one per document), so almost every
        segment is one call. ``aux_loss`` is the pieces' losses weighted by their share of the segment.
        """
        sep = self.cfg.separator_id
        if not self.cfg.reset_at_separator or sep < 0:
            return self.decoder(x, state)
        starts = tokens == sep  # (B, T)
        columns = torch.nonzero(starts.any(dim=0)).flatten().tolist()  # one sync per segment
        if not columns:
            return self.decoder(x, state)
        T = tokens.shape[1]
        cuts = sorted({0, *columns, T})
        hidden, aux, stats = [], x.new_zeros(()), {}
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a in columns:
                state = state.reset(starts[:, a])
            out = self.decoder(x[:, a:b], state)
            hidden.append(out.hidden)
            aux = aux + out.aux_loss * ((b - a) / T)
            state, stats = out.state, out.stats
        return DecoderOutput(hidden=torch.cat(hidden, dim=1), state=state, aux_loss=aux, stats=stats)


@functools.cache
def with_previous_token(inner: type[State]) -> type[State]:
    """The state class of a model with ``previous_token_embedding``: the decoder's ``inner`` state plus
    ``previous_token`` (B,) int64, 1 + the last token read (0 = none). ``inner`` stays reachable as ``.inner``, so
    the decoder always receives and returns its own state; an emptied row has no previous token."""

    def reset(self: State, mask: Tensor) -> State:
        out = inner.reset(self, mask)  # a decoder's own reset may keep fields it does not know
        keep = ~mask.to(device=self.previous_token.device, dtype=torch.bool)  # type: ignore[attr-defined]
        none = torch.zeros_like(self.previous_token)  # type: ignore[attr-defined]
        return dataclasses.replace(out, previous_token=torch.where(keep, self.previous_token, none))  # type: ignore[attr-defined]

    cls = dataclasses.make_dataclass(
        f"{inner.__name__}WithPreviousToken",
        [("previous_token", Tensor)],
        bases=(inner,),
        frozen=True,
        namespace={"reset": reset, "inner": inner, "__module__": __name__},
    )
    return cls


READ_SEGMENT = 1024  # default tokens per forward call when one stream is read without autograd (eval, prompts)


def read_segment(train_seq_len: int) -> int:
    """The default segment length for reading one stream (``eval`` in carry mode, ``generate``'s prompt): the
    training ``seq_len``, but at least :data:`READ_SEGMENT` tokens.

    The results do not depend on it (the decoders are chunking-invariant, within float rounding), only the speed: each
    forward call has a fixed cost (Python, the caches' bookkeeping, the products' setup) and larger calls run the
    matrix products at a better rate. Measured on 2 cores with the presets: 1024-token calls read 1.17x to 1.8x as
    many tokens per second as 256-token calls in bf16 (1.0x to 1.3x in fp32), depending on the decoder; 2048 gains
    little more. A batch of streams (``longctx probe`` reads 16 side by side) has wide calls already and keeps the
    training ``seq_len``.
    """
    return max(train_seq_len, READ_SEGMENT)


def cache_dtype(precision: str) -> torch.dtype | None:
    """The attention caches' dtype for reading at ``precision`` (:meth:`LongContextLM.init_state`): bf16 under bf16
    autocast, where the keys and values are bf16 already (the same results; measured with the presets at 1,024-token
    segments, one thread: 1.02x to 1.13x the tokens/s of float32 caches, which every call casts whole); None (the
    model's dtype) otherwise. For states that are never saved: a state file holds the model's dtype."""
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def inference(model: nn.Module, precision: str = "fp32") -> Iterator[None]:
    """Eval mode, no autograd and, for ``precision="bf16"``, bf16 autocast on the model's device; the model's training
    flag is restored afterwards, also when the block raises (Ctrl-C in a long evaluation).

    fp32 runs in ``torch.inference_mode``; bf16 in ``torch.no_grad`` instead. In inference mode autocast keeps no bf16
    copies of the weights and casts every weight again in every call; under ``no_grad`` it casts each weight once per
    block (measured, one thread: single-token steps inside one block 1.2x to 1.5x faster). Sampling enters one block
    per token (:func:`longctx.sampling.iter_sample`), so its steps still cast the weights each time."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = getattr(model, "device", None) or next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if precision == "bf16" else torch.inference_mode(), autocast:
            yield
    finally:
        model.train(was_training)


def build_model(cfg: ModelConfig) -> LongContextLM:
    """A freshly initialised model for ``cfg`` (on the CPU, fp32)."""
    return LongContextLM(cfg)


MAX_IMPLIED_BYTES = 16 << 30  # buffers + one stream's state a config may imply: a sanity limit, far above any preset


def check_model_size(cfg: ModelConfig, where: str, error: type[LongctxError]) -> LongContextLM:
    """The model of ``cfg`` built on the meta device (shapes only, no memory), after checking that its buffers and
    one stream's state stay under :data:`MAX_IMPLIED_BYTES`: a hostile or mistyped size (``window = 10**15``) is one
    line naming ``where``, not an allocator traceback or an exhausted machine."""
    try:
        with torch.device("meta"):
            model = build_model(cfg)
            implied = model.init_state(1, device="meta").nbytes()
        implied += sum(b.numel() * b.element_size() for b in model.buffers())
    except (RuntimeError, ValueError, OverflowError) as e:
        raise error(f"{where} describes no buildable model ({str(e).splitlines()[0][:100]})") from None
    if implied > MAX_IMPLIED_BYTES:
        raise error(
            f"{where} implies {implied:,} bytes of buffers and state per stream, more than the "
            f"{MAX_IMPLIED_BYTES:,} longctx allows"
        )
    return model
