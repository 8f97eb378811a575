"""Typed, validated configuration.

A :class:`Config` has three parts: ``model`` (the architecture, with one sub-config per decoder), ``data`` (corpus,
tokenizer, split) and ``train`` (optimisation and budgets). Presets are TOML files in ``models/`` that set any subset
of the keys; ``--set a.b=c`` overrides one key. Every value is type-checked, every unknown key is an error that
suggests the closest valid key, and each dataclass validates its ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from longctx.errors import ConfigError
from longctx.validate import INT64_MAX, MAX_DEPTH, MAX_PRESET_BYTES, check_plain, loads_json, read_bytes

DEFAULT_PRESET = "infinite-small"  # the ∞-former: the project's headline decoder
# sanity limits that refuse a typo or a hostile config.json before a model is built: far beyond any model that fits
# a machine, far below what exhausts one while building it
MAX_LAYERS = 10_000
MAX_PARAMETERS = 10**12


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"invalid config: {key} {message}")


# --------------------------------------------------------------------------------------------------------------------
# model


@dataclass
class TransformerConfig:
    """Baseline decoder: causal attention over a sliding window with rotary positions (RoPE, Su et al. 2021)."""

    window: int = 256  # each query sees itself and the previous window - 1 tokens
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        _check(self.window >= 1, "model.transformer.window", f"must be >= 1, got {self.window}")
        _check(self.rope_base > 1.0, "model.transformer.rope_base", f"must be > 1, got {self.rope_base}")


@dataclass
class XLConfig:
    """Transformer-XL relative attention with a cache (Dai et al. 2019, arXiv 1901.02860), optionally with an adaptive
    or dynamic attention span (Sukhbaatar et al. 2019, arXiv 1905.07799)."""

    mem_len: int = 256  # each query sees itself and the previous mem_len - 1 tokens (S = mem_len for the spans)
    share_bias: bool = True  # one pair of position biases u, v for all layers (as in the paper), else one per layer
    span_mode: Literal["fixed", "adaptive", "dynamic"] = "fixed"  # fixed = the whole window, no span mask
    span_ramp: float = 32.0  # R: width of the soft mask's linear ramp, in tokens
    span_init: float = 0.0  # initial span ratio c = z / mem_len (dynamic: sigma(b) at initialisation)
    span_loss: float = 2e-6  # lambda: span penalty per layer, lambda * mean span (tokens), added in training only
    span_cache_multiple: int = 64  # adaptive: the carried cache is trimmed to span + ramp rounded up to this

    def __post_init__(self) -> None:
        _check(self.mem_len >= 1, "model.xl.mem_len", f"must be >= 1, got {self.mem_len}")
        _check(0.0 < self.span_ramp < math.inf, "model.xl.span_ramp", f"must be a number > 0, got {self.span_ramp}")
        _check(0.0 <= self.span_init <= 1.0, "model.xl.span_init", f"must be in [0, 1], got {self.span_init}")
        _check(0.0 <= self.span_loss < math.inf, "model.xl.span_loss", f"must be >= 0, got {self.span_loss}")
        _check(
            self.span_cache_multiple >= 1,
            "model.xl.span_cache_multiple",
            f"must be >= 1, got {self.span_cache_multiple}",
        )


@dataclass
class AFTConfig:
    """Attention Free Transformer (Zhai et al. 2021, arXiv 2105.14103), causal, with relative position biases.

    simple: no bias; local: learned bias for distances < window; conv: one key and one bias filter per head with the
    paper's reparameterisation (starts flat); full: learned bias for distances < max_distance.
    far: the bias of the distances s and beyond (s = window, max_distance, 1 for simple): "uniform" 0 (the paper: an
    undecayed average of the whole past), "decay" -λ (δ - s + 1) with a learned λ = exp(θ) per key channel (conv:
    per head).
    """

    variant: Literal["simple", "local", "conv", "full"] = "local"
    window: int = 32  # local/conv: learned bias for the current token and the previous window - 1 (enwik8 best: 32)
    heads: int = 1  # channel groups sharing one bias row (conv: also one key per head; simple: unused); divides d_model
    max_distance: int = 512  # full: learned bias for distances < max_distance (>= train.seq_len recommended)
    far: Literal["uniform", "decay"] = "decay"  # bias beyond the window: 0 (the paper) or -λ (δ - s + 1), λ learned

    def __post_init__(self) -> None:
        _check(self.far in ("uniform", "decay"), "model.aft.far", f"must be 'uniform' or 'decay', got {self.far!r}")
        _check(self.window >= 1, "model.aft.window", f"must be >= 1, got {self.window}")
        _check(self.heads >= 1, "model.aft.heads", f"must be >= 1, got {self.heads}")
        _check(self.max_distance >= 1, "model.aft.max_distance", f"must be >= 1, got {self.max_distance}")


@dataclass
class InfiniteConfig:
    """∞-former (Martins et al. 2022, arXiv 2109.00301): relative-attention short-term memory plus an unbounded
    continuous long-term memory (LTM). Defaults of the LTM: the official sorting code, whose
    short-term memory, LTM block and segment have the same length (mem_len = ltm_block = train.seq_len here too: then
    a training segment reads one LTM version and refits once, the cheapest layout).

    A query at position p sees itself and the tokens from b(p) = ltm_block * floor((p - mem_len) / ltm_block) on
    (between mem_len and mem_len + ltm_block - 1 previous tokens) exactly, and the LTM fitted on the tokens before
    b(p) continuously.
    """

    mem_len: int = 256  # short-term memory: every query sees at least its mem_len previous tokens exactly
    ltm_block: int = 256  # tokens per LTM update; also the extra short-term reach (mem_len + ltm_block - 1 at most)
    n_basis: int = 512  # N Gaussian basis functions; a multiple of len(sigmas)
    sigmas: list[float] = field(default_factory=lambda: [0.01, 0.05])  # basis widths S (every centre once per width)
    ridge: float = 1.0  # lambda of the ridge regression
    zero_pad: bool = True  # the official code's zero padding on both sides of [0, 1] in the regression
    tau: float = 0.75  # the old signal is contracted into [0, tau], a new block fills (tau, 1]
    n_samples: int = 512  # M: samples of the old signal per update
    min_var: float = 1e-6  # lower clamp of sigma^2 of the attention density
    sticky: bool = False  # sticky memories: sample the old signal where the queries attended
    sticky_bins: int = 128  # D: histogram bins of the attention mass over [0, 1]
    kl_weight: float = 1e-6  # weight of KL(N(mu, sigma^2) || N(mu_0, sigma_0^2)) in aux_loss (training only)
    kl_sigma0: float = 0.05  # sigma_0 of the KL prior
    kl_mu_term: bool = False  # include the (mu - mu_0)^2 term (the official GPT-2 code does, with mu_0 = -1)
    kl_mu0: float = 0.5  # mu_0 of the KL prior (used with kl_mu_term only)
    gate: bool = False  # the official input gate: X <- X * sigmoid(Conv1d_k3(X)) over each block before its regression
    ltm_out: str = "shared"  # "shared": LTM context added per head before the attention's output projection;
    # "separate": its own Linear(d_model, d_model) output projection, added after the attention's (the official code)
    share_bias: bool = True  # one pair of relative-position biases u, v for all layers (Transformer-XL)

    def __post_init__(self) -> None:
        for key in ("mem_len", "ltm_block", "n_basis", "n_samples", "sticky_bins"):
            _check(getattr(self, key) >= 1, f"model.infinite.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(
            len(self.sigmas) >= 1 and all(0.0 < s < math.inf for s in self.sigmas),
            "model.infinite.sigmas",
            f"must be a non-empty list of numbers > 0, got {self.sigmas}",
        )
        _check(
            self.n_basis % max(1, len(self.sigmas)) == 0,
            "model.infinite.n_basis",
            f"({self.n_basis}) must be a multiple of the number of model.infinite.sigmas ({len(self.sigmas)})",
        )
        _check(0.0 < self.ridge < math.inf, "model.infinite.ridge", f"must be a number > 0, got {self.ridge}")
        _check(0.0 < self.tau < 1.0, "model.infinite.tau", f"must be in (0, 1), got {self.tau}")
        _check(0.0 < self.min_var < math.inf, "model.infinite.min_var", f"must be a number > 0, got {self.min_var}")
        _check(0.0 <= self.kl_weight < math.inf, "model.infinite.kl_weight", f"must be >= 0, got {self.kl_weight}")
        _check(0.0 < self.kl_sigma0 < math.inf, "model.infinite.kl_sigma0", f"must be > 0, got {self.kl_sigma0}")
        _check(math.isfinite(self.kl_mu0), "model.infinite.kl_mu0", f"must be a finite number, got {self.kl_mu0}")
        _check(
            self.ltm_out in ("shared", "separate"),
            "model.infinite.ltm_out",
            f"must be 'shared' or 'separate', got {self.ltm_out!r}",
        )


@dataclass
class CombinerConfig:
    """Combiner (Ren et al. 2021, arXiv 2107.05768), causal Combiner-Fixed: a query sees its own segment of `segment`
    tokens directly and each of the last max_summaries earlier segments through one max-pooled summary, in one
    softmax. Reach: segment * (max_summaries + 1) tokens per layer. Rotary positions (RoPE) as the baseline."""

    segment: int = 64  # s: tokens per segment, fixed by absolute position (token p is in segment p // s)
    max_summaries: int = 63  # S: summaries kept (the S segments before the query's); older ones are dropped
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        _check(self.segment >= 1, "model.combiner.segment", f"must be >= 1, got {self.segment}")
        _check(self.max_summaries >= 1, "model.combiner.max_summaries", f"must be >= 1, got {self.max_summaries}")
        _check(1.0 < self.rope_base < math.inf, "model.combiner.rope_base", f"must be > 1, got {self.rope_base}")


@dataclass
class PerceiverARConfig:
    """Perceiver AR (Hawthorne et al. 2022, arXiv 2202.07765) in per-position streaming form: one causal
    cross-attention from the latent of position p to the inputs (p - context, p], then n_layer - 1 causal
    self-attention layers among the latents of positions (p - latents, p] (the cross-attention layer counts as one of
    model.n_layer). Rotary positions on the first rotary_fraction of each head's channel pairs (official configs 0.5).
    """

    context: int = 1024  # the cross-attention of position p reads the inputs (p - context, p]
    latents: int = 256  # each latent self-attention layer reads the latents of positions (p - latents, p]
    rotary_fraction: float = 0.5  # share of each head's channels rotated by RoPE; the rest carry no position
    rope_base: float = 10000.0  # keep the longest rotary wavelength well above context (the official code asserts it)

    def __post_init__(self) -> None:
        _check(self.latents >= 1, "model.perceiver_ar.latents", f"must be >= 1, got {self.latents}")
        _check(
            self.context >= self.latents,
            "model.perceiver_ar.context",
            f"({self.context}) must be >= model.perceiver_ar.latents ({self.latents})",
        )
        _check(
            0.0 <= self.rotary_fraction <= 1.0,
            "model.perceiver_ar.rotary_fraction",
            f"must be in [0, 1], got {self.rotary_fraction}",
        )
        _check(1.0 < self.rope_base < math.inf, "model.perceiver_ar.rope_base", f"must be > 1, got {self.rope_base}")


DecoderName = Literal["transformer", "xl", "aft", "infinite", "perceiver_ar", "combiner"]
AttentionKernel = Literal["auto", "banded", "sdpa"]
ROTARY_DECODERS = ("transformer", "perceiver_ar", "combiner")  # rotate channel pairs of each head: even head width
SINUSOID_DECODERS = ("xl", "infinite")  # sine and cosine halves of a d_model-wide position table: even d_model
WINDOW_ATTENTION_DECODERS = ("transformer", "perceiver_ar")  # the decoders whose attention model.attention_kernel picks


@dataclass
class ModelConfig:
    """Architecture shared by all decoders, plus one sub-config per decoder (only the selected one is used)."""

    decoder: DecoderName = "transformer"
    vocab_size: int = 257  # set from the tokenizer when training
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    separator_id: int = -1  # the document separator's token id; set from the tokenizer when training; -1 = none
    reset_at_separator: bool = True  # no information crosses a separator: the memory starts empty at each one
    # sliding-window attention of transformer and perceiver_ar: "banded" (blocks of queries, float32 softmax),
    # "sdpa" (F.scaled_dot_product_attention, one boolean mask), "auto" = banded on the CPU for windows under 2,048,
    # sdpa for longer ones and elsewhere
    attention_kernel: AttentionKernel = "auto"
    # a learned embedding of the previous token added to each token's input (Olsson et al. 2022's "smeared" keys at
    # the input; RWKV's token shift): every layer sees the token before without first learning a previous-token head;
    # a (vocab_size + 1) x d_model table and 8 bytes of state per stream
    previous_token_embedding: bool = False
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    xl: XLConfig = field(default_factory=XLConfig)
    aft: AFTConfig = field(default_factory=AFTConfig)
    infinite: InfiniteConfig = field(default_factory=InfiniteConfig)
    perceiver_ar: PerceiverARConfig = field(default_factory=PerceiverARConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff"):
            _check(getattr(self, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.n_layer <= MAX_LAYERS, "model.n_layer", f"must be <= {MAX_LAYERS:,}, got {self.n_layer:,}")
        lower_bound = self.d_model * (self.vocab_size + 2 * self.d_ff * self.n_layer)  # embedding + MLPs
        _check(
            lower_bound <= MAX_PARAMETERS,
            "model",
            f"implies at least {lower_bound:,} parameters (n_layer "
            f"{self.n_layer}, d_model {self.d_model}, d_ff {self.d_ff}, vocab_size {self.vocab_size}); the limit "
            f"is {MAX_PARAMETERS:,}",
        )
        _check(
            self.d_model % self.n_head == 0,
            "model.d_model",
            f"({self.d_model}) must be divisible by model.n_head ({self.n_head})",
        )
        _check(
            self.decoder not in ROTARY_DECODERS or (self.d_model // self.n_head) % 2 == 0,
            "model.d_model",
            f"/ model.n_head must be even for the rotary positions of {self.decoder!r}, "
            f"got {self.d_model // self.n_head}",
        )
        _check(
            self.decoder not in SINUSOID_DECODERS or self.d_model % 2 == 0,
            "model.d_model",
            f"must be even for the sinusoidal relative positions of {self.decoder!r}, got {self.d_model}",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.norm_eps > 0, "model.norm_eps", f"must be > 0, got {self.norm_eps}")
        _check(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")
        _check(
            -1 <= self.separator_id < self.vocab_size,
            "model.separator_id",
            f"must be -1 (none) or a token id below model.vocab_size ({self.vocab_size}), got {self.separator_id}",
        )
        _check(
            self.decoder != "aft" or self.d_model % self.aft.heads == 0,
            "model.d_model",
            f"({self.d_model}) must be divisible by model.aft.heads ({self.aft.heads})",
        )
        _check(
            self.attention_kernel == "auto" or self.decoder in WINDOW_ATTENTION_DECODERS,
            "model.attention_kernel",
            f"applies to the {' and '.join(WINDOW_ATTENTION_DECODERS)} decoders only, not to {self.decoder!r}; "
            f"got {self.attention_kernel!r}",
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def decoder_config(self) -> Any:
        """The sub-config of the selected decoder."""
        return getattr(self, self.decoder)


# --------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    paths: list[str] = field(default_factory=list)  # files, folders or globs; empty = the bundled corpus
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int = 4096  # BPE only: size of the trained vocabulary, specials included
    val_docs: int = 3  # the last val_docs documents (sorted by name) are held out for validation
    cache_dir: str = ""  # token cache; empty = $LONGCTX_CACHE or ~/.cache/longctx

    def __post_init__(self) -> None:
        _check(all(isinstance(p, str) and p for p in self.paths), "data.paths", "must be a list of non-empty strings")
        _check(self.vocab_size >= 300, "data.vocab_size", f"must be >= 300 for BPE, got {self.vocab_size}")
        _check(self.vocab_size <= 2**31, "data.vocab_size", f"must be <= 2**31, got {self.vocab_size}")
        _check(self.val_docs >= 0, "data.val_docs", f"must be >= 0, got {self.val_docs}")


# --------------------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    """Optimisation, budgets and cadence. A step is one optimizer update over ``batch_size`` lanes x ``seq_len``."""

    seq_len: int = 256  # tokens per training segment and lane
    batch_size: int = 8  # lanes per optimizer step (global batch)
    micro_batch_size: int = 0  # lanes per forward/backward (gradient accumulation); 0 = batch_size / processes
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on weight matrices and the embedding only
    position_lr_scale: float = 10.0  # learning rate of spans, AFT position biases and decays, relative to lr
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    max_steps: int = 5000
    max_tokens: int = 0  # 0 = no token budget
    max_time: float = 0.0  # seconds; 0 = no time budget
    lr_decay_steps: int = 0  # cosine decay length; 0 = max_steps
    log_interval: int = 10
    eval_interval: int = 250
    eval_tokens: int = 65536  # validation tokens per evaluation (0 = all held-out tokens)
    save_interval: int = 500
    keep_last: int = 3
    seed: int = 1337
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"
    compile: bool = False  # torch.compile the model for training (opt-in; the first steps pay for compilation)
    max_bad_steps: int = 5  # consecutive non-finite losses before training stops

    def __post_init__(self) -> None:
        for key in (
            "seq_len",
            "batch_size",
            "max_steps",
            "log_interval",
            "eval_interval",
            "save_interval",
            "keep_last",
            "max_bad_steps",
        ):
            _check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in (
            "micro_batch_size",
            "max_tokens",
            "max_time",
            "warmup_steps",
            "lr_decay_steps",
            "eval_tokens",
            "threads",
            "weight_decay",
            "grad_clip",
            "min_lr",
        ):
            _check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(0 < self.lr < math.inf, "train.lr", f"must be a finite number > 0, got {self.lr}")
        _check(
            0 < self.position_lr_scale < math.inf,
            "train.position_lr_scale",
            f"must be a finite number > 0, got {self.position_lr_scale}",
        )
        _check(self.min_lr <= self.lr, "train.min_lr", f"({self.min_lr}) must be <= train.lr ({self.lr})")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        divisible = self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0
        _check(
            divisible,
            "train.batch_size",
            f"({self.batch_size}) must be a multiple of train.micro_batch_size ({self.micro_batch_size})",
        )
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "train.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )


@dataclass
class Config:
    """Everything a run needs; written as ``config.json`` into the run folder and every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""  # name or path of the preset this config came from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> Config:
        return _build(cls, data, prefix="", where=where)


# --------------------------------------------------------------------------------------------------------------------
# building dataclasses from dicts, with type checks


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats); raise ConfigError otherwise."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"invalid config: {key} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid config: {key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"invalid config: {key} has the wrong type: {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid config: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid config: {key} must be an integer, got {value!r}")
        if abs(value) > INT64_MAX:
            raise ConfigError(f"invalid config: {key} must fit in 64 bits, got {str(value)[:30]}...")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid config: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid config: {key} must be a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"invalid config: {key} must be null, got {value!r}")
        return None
    return value


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(prefix + v for v in valid)}"
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config in {where}: {prefix.rstrip('.') or 'the top level'} must be a table")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints or key not in names:
            raise _unknown_key(key, names, prefix)
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", where)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# presets and overrides


def preset_dir() -> Path:
    """The folder of the bundled presets (``models/`` in the source tree, ``longctx/presets`` when installed)."""
    source_tree = Path(__file__).resolve().parent.parent / "models"
    if source_tree.is_dir():
        return source_tree
    return Path(str(importlib.resources.files("longctx") / "presets"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def resolve_preset(preset: str) -> Path:
    """A preset name (``transformer-small``) or a path to a TOML file (or a JSON one: ``--print-config`` output, a
    run's ``config.json``)."""
    path = Path(preset).expanduser()
    if path.suffix in (".toml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"preset file {preset!r} does not exist; give a TOML file or one of: {', '.join(list_presets())}"
            )
        return path
    candidate = preset_dir() / f"{preset}.toml"
    if candidate.is_file():
        return candidate
    names = list_presets()
    close = difflib.get_close_matches(preset, names, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"unknown preset {preset!r}; {hint}available presets: {', '.join(names)}")


def _read_toml(path: Path) -> dict[str, Any]:
    """A preset file (TOML, or JSON by its suffix) as a dict, through the checks of :mod:`longctx.validate`."""
    raw = read_bytes(path, MAX_PRESET_BYTES, "preset", ConfigError)
    where = f"preset {str(path)!r}"
    if path.suffix == ".json":
        data = loads_json(raw, where, ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(f"{where} is not a JSON object of config sections")
        return data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return check_plain(_toml(text, where), where, ConfigError)


def _toml(text: str, where: str) -> dict[str, Any]:
    """``tomllib.loads`` with its other failures (recursion, integers of thousands of digits) as one line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests values more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # int() of more than 4300 digits
        raise ConfigError(f"{where} holds an integer beyond 64 bits ({str(e)[:60]})") from None


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value: TOML syntax (numbers, true/false, ["lists"]), else the plain string."""
    where = f"--set value {text if len(text) <= 40 else text[:37] + '...'!r}"
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"{where} nests values more than {MAX_DEPTH} levels deep") from None
    except ValueError:  # int() of more than 4300 digits
        raise ConfigError(f"{where} holds an integer beyond 64 bits") from None
    return check_plain(value, where, ConfigError)


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key, or a ConfigError that suggests the closest key."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if not _is_dataclass_type(tp):
            raise ConfigError(f"unknown config key {dotted}: {prefix.rstrip('.')} has no sub-keys")
        hints = get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            raise _unknown_key(part, names, prefix)
        tp = hints[part]
    return tp


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, after checking the key and the value's type."""
    tp = _field_type(Config, dotted)
    if _is_dataclass_type(tp):
        raise ConfigError(f"config key {dotted} is a table; set one of its keys, e.g. {dotted}.<key>=...")
    origin = get_origin(tp)
    if isinstance(value, str) and origin in (list, tuple) and not value.lstrip().startswith("["):
        item_tp = (get_args(tp) or (str,))[0]
        value = [v if item_tp is str else parse_value(v) for v in value.split(",") if v]  # a,b,c
    elif isinstance(value, str) and tp is not str and origin is not Literal:
        value = parse_value(value)
    value = _coerce(value, tp, dotted)
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def load_config(preset_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a preset (name or TOML path; default :data:`DEFAULT_PRESET`) and apply dotted overrides.

    ``overrides`` maps dotted keys (``"train.lr"``) to values; strings are parsed with TOML syntax when the key is not
    a string key. Raises :class:`ConfigError` for unknown keys, wrong types and out-of-range values.
    """
    name = preset_or_path or DEFAULT_PRESET
    path = resolve_preset(name)
    data = _read_toml(path)
    data.pop("preset", None)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    data["preset"] = name
    _check_decoder_sections(data, overrides or {}, str(path))
    return Config.from_dict(data, where=str(path))


DECODER_SECTIONS: tuple[str, ...] = get_args(DecoderName)  # model.<decoder>.* holds that decoder's options


def _other_decoder(key: str, decoder: str) -> str | None:
    """The decoder whose section ``key`` (dotted) sets, if that is not ``decoder``."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] == "model" and parts[1] in DECODER_SECTIONS and parts[1] != decoder:
        return parts[1]
    return None


def _check_decoder_sections(data: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """An option of a decoder that the config does not use would be ignored without a word: refuse it, whether it
    comes from ``--set`` or from the preset file. A preset file may hold other decoders' tables at their defaults
    (``--print-config`` writes every table), and keeps its own table when ``--set model.decoder`` switches to
    another decoder."""
    model = data.get("model")
    decoder = model.get("decoder", ModelConfig.decoder) if isinstance(model, dict) else ModelConfig.decoder
    for key in overrides:
        other = _other_decoder(key, decoder)
        if other is not None:
            raise ConfigError(
                f"{key} is an option of the {other} decoder, but this config's decoder is {decoder!r}; "
                f"drop it, or also set model.decoder={other}"
            )
    if "model.decoder" in overrides or not isinstance(model, dict):
        return
    defaults = ModelConfig()
    for section in DECODER_SECTIONS:
        table = model.get(section)
        if section == decoder or table is None:
            continue
        unused = dataclasses.asdict(getattr(defaults, section))
        if not isinstance(table, dict) or any(unused.get(k, object()) != v for k, v in table.items()):
            raise ConfigError(f"{where} sets [model.{section}] but its decoder is {decoder!r}; remove that table")


def overrides_for(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` without the options of decoders that ``preset`` (with ``overrides``' ``model.decoder``) does not
    use: how a benchmark applies one set of ``--set`` keys to presets of different decoders."""
    decoder = overrides.get("model.decoder") or load_config(preset).model.decoder
    return {k: v for k, v in overrides.items() if _other_decoder(k, str(decoder)) is None}


def parse_set_args(items: list[str]) -> dict[str, str]:
    """``["train.lr=3e-4", ...]`` -> ``{"train.lr": "3e-4"}``."""
    out: dict[str, str] = {}
    for item in items:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
            raise ConfigError(f"--set {item.encode('utf-8', 'replace').decode()[:60]!r} is not UTF-8 text") from None
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. --set train.lr=3e-4), got {item!r}")
        out[key.strip()] = value.strip()
    return out
