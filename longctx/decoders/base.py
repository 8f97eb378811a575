"""The decoder contract.

A decoder maps hidden states ``x`` (B, T, D) and a :class:`State` to new hidden states and the next state. The state
is a value: a frozen dataclass of tensors, passed in and returned, never stored on the module. Three properties hold
for every decoder and are tested for each entry of ``DECODERS``:

1. bounded memory: ``state.nbytes()`` depends on the configuration only;
2. chunking invariance: one call, any chunking, or token by token give the same outputs;
3. causality: token t never changes the outputs before t.

Shape legend: B batch (lanes), T tokens in the segment, D model width, H heads, Dh head width, L layers,
M memory length.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from longctx.config import ModelConfig

S = TypeVar("S", bound="State")


@dataclass(frozen=True)
class State:
    """Base class of decoder states: a frozen dataclass whose fields are tensors with the batch on dim 0.

    Subclasses only declare their fields. The generic methods below treat every tensor field alike; a subclass whose
    "empty memory" is not all zeros overrides :meth:`reset`.
    """

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def detach(self: S) -> S:
        """The same values without autograd history (truncated backprop through time)."""
        return dataclasses.replace(self, **{k: v.detach() for k, v in self.tensors().items()})

    def reset(self: S, mask: Tensor) -> S:
        """Rows where ``mask`` (B,) is true become empty memory (all zeros); the other rows are unchanged."""
        out = {}
        for name, t in self.tensors().items():
            keep = (~mask.to(device=t.device, dtype=torch.bool)).view(-1, *([1] * (t.dim() - 1)))
            out[name] = torch.where(keep, t, torch.zeros_like(t))  # not t * keep: NaN * 0 is NaN
        return dataclasses.replace(self, **out)

    def select(self: S, index: Tensor) -> S:
        """The rows ``index`` of the batch (e.g. the lanes of one micro-batch)."""
        return dataclasses.replace(self, **{k: v[index] for k, v in self.tensors().items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self: S, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> S:
        """Move to ``device``; floating-point fields also take ``dtype`` when given."""
        out = {}
        for name, t in self.tensors().items():
            out[name] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return dataclasses.replace(self, **out)

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """A flat ``{name: tensor}`` dict (contiguous, on the CPU) for safetensors."""
        return {prefix + k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}

    @classmethod
    def from_tensors(cls: type[S], tensors: dict[str, Tensor], prefix: str = "") -> S:
        """Rebuild a state from :meth:`to_tensors` output; raises KeyError if a field is missing."""
        return cls(**{f.name: tensors[prefix + f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def concat(cls: type[S], states: list[S]) -> S:
        """Stack the rows of several states of the same kind along the batch."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: torch.cat([getattr(s, n) for s in states], dim=0) for n in names})


StateT = TypeVar("StateT", bound=State)  # a decoder's own state type


@dataclass(frozen=True)
class DecoderOutput(Generic[StateT]):
    hidden: Tensor  # (B, T, D)
    state: StateT  # the next state
    aux_loss: Tensor  # scalar; zeros(()) when unused
    stats: dict[str, float]  # e.g. mean span per layer


class Decoder(nn.Module, abc.ABC, Generic[StateT]):
    """Interface every decoder implements. Constructors take the :class:`~longctx.config.ModelConfig` only."""

    @abc.abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> StateT:
        """The empty memory for ``batch_size`` independent streams."""

    @abc.abstractmethod
    def forward(self, x: Tensor, state: StateT) -> DecoderOutput[StateT]:  # x (B, T, D); never mutates `state`
        """Read ``x`` after the memory in ``state``; return the hidden states and the next state."""

    def after_optimizer_step(self) -> None:
        """Called by the trainer after each optimizer step (adaptive span clamps its parameters here)."""

    def position_parameters(self) -> list[nn.Parameter]:
        """Learned scalars that set where the decoder looks (spans, position biases, decay rates, their gains).

        The trainer gives them no weight decay and a learning rate ``train.position_lr_scale`` times the base rate:
        at the base rate Adam moves a parameter by about the learning rate per step, too slowly for a span measured
        in hundreds of tokens or a bias measured in nats. Empty by default.
        """
        return []

    def describe(self) -> dict[str, Any]:
        """Learned quantities worth reporting (e.g. spans); empty by default."""
        return {}

    # ----------------------------------------------------------------------------------------------------------------
    # facts about the decoder, from its configuration alone: benchmarks and tests read them here, nowhere else

    PROJECTED: ClassVar[tuple[str, ...]] = ()
    """State fields that hold the attention's keys and values as its linear maps (and rotations) give them. Under bf16
    autocast those are bf16 values already, so a reader in bf16 may hold these fields in bf16
    (``LongContextLM.init_state(cache_dtype=...)``): the same results, without casting every cache in every call.
    Sums, pools, summaries and the LTM's inputs and coefficients are not listed: they need float32."""

    TINY: ClassVar[dict[str, Any]] = {}
    """The decoder's part of the tiny test configuration: model-level overrides, nested as in a preset's ``[model]``
    table, on top of 2 layers of width 32 (the contract tests' models)."""

    @classmethod
    @abc.abstractmethod
    def exact_window(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, str]:
        """(W, why): how many tokens a query reads exactly, token by token, itself included (whatever else it knows
        of the past comes through a compressed or summed memory, or through stacked layers). ``seq_len`` is the
        training segment, the answer of a decoder without any window."""

    @classmethod
    @abc.abstractmethod
    def reach(cls, cfg: ModelConfig) -> tuple[int | None, str]:
        """(R, why): the farthest, in tokens, that a token's information can travel forward through the decoder;
        None when a recurrent memory (running sums, a continuous long-term memory) carries some of it arbitrarily
        far. A layer that reads the W - 1 tokens before a query moves information W - 1 tokens forward."""

    @classmethod
    @abc.abstractmethod
    def memory_length(cls, cfg: ModelConfig) -> int:
        """The stream length at which the memory is full (every slot of every cache in use): the contract tests
        read streams of a few times this length."""

    @classmethod
    def attended_keys(cls, cfg: ModelConfig) -> int:
        """Keys a query attends to in steady state, for the model-FLOP count (12 n_layer d_model K per token in
        training); 0 for a decoder without attention scores."""
        return 0
