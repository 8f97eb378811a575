"""One validation layer for every file longctx reads: size, structure, types, ranges and tensor shapes.

Checkpoints, saved states, tokenizers and presets may come from anywhere. Each reader goes through these helpers, so
that a hostile or damaged file (nested 10,000 levels deep, a 5,000-digit integer, a field of the wrong type, a tensor
of the wrong shape or holding NaN) ends as one :class:`~longctx.errors.LongctxError` line that names the file and the
problem, before anything large is allocated -- never as a traceback, a ``RecursionError`` or an exhausted machine.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.errors import CheckpointError, ConfigError, LongctxError

MAX_JSON_BYTES = 64 << 20  # config.json, trainer_state.json, tokenizer.json (a 4096-token BPE one is ~0.3 MB)
MAX_PRESET_BYTES = 1 << 20  # a preset TOML or JSON (the bundled ones are ~1 KB)
MAX_DEPTH = 32  # nesting of JSON/TOML values; longctx writes at most 4 levels (tokenizer.json)
MAX_INT_DIGITS = 20  # an int64 has at most 19 digits
INT64_MAX = 2**63 - 1
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on its JSON header
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}  # torch's names

if TYPE_CHECKING:  # torch is imported where tensors are checked: the CLI's --help and config code never load it
    import torch
    from torch import Tensor

ErrorType = type[LongctxError]
_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    bool: "true or false",
    type(None): "null",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _HugeInt(ValueError):
    pass


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _HugeInt(f"an integer of {digits:,} digits")
    return int(text)


def check_plain(data: Any, where: str, error: ErrorType = CheckpointError) -> Any:
    """``data`` (parsed JSON or TOML) nests at most :data:`MAX_DEPTH` levels and its integers fit in 64 bits.

    Iterative, so that the check itself cannot overflow the stack. Returns ``data``.
    """
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise error(f"{where} nests values more than {MAX_DEPTH} levels deep")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise error(f"{where} holds the integer {_short(value)}, beyond 64 bits")
    return data


def loads_json(text: str | bytes, where: str, error: ErrorType = CheckpointError, what: str = "valid JSON") -> Any:
    """``json.loads`` that refuses deep nesting and huge integers with one line naming ``where``; text that does not
    parse is "not ``what``"."""
    try:
        data = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise error(f"{where} nests values more than {MAX_DEPTH} levels deep") from None
    except _HugeInt as e:
        raise error(f"{where} holds {e}, beyond 64 bits") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{where} is not {what} ({str(e).splitlines()[0][:100]}); the file is damaged") from None
    return check_plain(data, where, error)


def read_bytes(path: Path, limit: int, what: str, error: ErrorType = CheckpointError) -> bytes:
    """The bytes of ``path`` after checking its size against ``limit`` (stat first: a sparse 2 GB file is never
    read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise error(
                    f"{path} is {size:,} bytes, more than the {limit:,} a {what} may have; "
                    "it was not written by longctx"
                )
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    if len(data) > limit:  # grew while being read
        raise error(f"{path} is more than the {limit:,} bytes a {what} may have")
    return data


def read_json(path: Path, what: str, error: ErrorType = CheckpointError, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, size-checked, then parsed with :func:`loads_json`."""
    return loads_json(read_bytes(path, limit, what, error), str(path), error)


def field(
    data: Any,
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    error: ErrorType = CheckpointError,
    minimum: float | None = None,
) -> Any:
    """``data[key]``, which must exist and be of ``kind`` (``bool`` is not an ``int``; ``int`` passes for ``float``)
    and at least ``minimum``; else one line naming ``where`` and the key."""
    if not isinstance(data, dict):
        raise error(f"{where} must hold a JSON object, not {type(data).__name__}; the file is damaged")
    if key not in data:
        raise error(f"{where} lacks {key!r}; the file is damaged")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    accepted = (*kinds, int) if float in kinds else kinds
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, accepted):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise error(f"{where}: {key} must be {names}, got {_short(value)}; the file is damaged")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where}: {key} must be a finite number, got {value}; the file is damaged")
    if minimum is not None and isinstance(value, int | float) and value < minimum:
        raise error(f"{where}: {key} must be >= {minimum:g}, got {_short(value)}; the file is damaged")
    return value


def check_tensor(
    tensor: Tensor,
    name: str,
    where: str,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    finite: bool = True,
    error: ErrorType = CheckpointError,
) -> Tensor:
    """``tensor`` has ``shape`` and ``dtype`` (where given) and, if floating point and ``finite``, no NaN or inf."""
    if (shape is not None and tuple(tensor.shape) != tuple(shape)) or (dtype is not None and tensor.dtype != dtype):
        want = " ".join(filter(None, [shape is not None and str(tuple(shape)), dtype is not None and str(dtype)]))
        raise error(
            f"{where}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, this model needs {want}; "
            "the file belongs to another model or is damaged"
        )
    import torch

    if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise error(f"{where}: tensor {name} holds NaN or inf values; the file is damaged")
    return tensor


def read_safetensors_header(
    path: Path, error: ErrorType = CheckpointError
) -> tuple[dict[str, tuple[torch.dtype | str, tuple[int, ...]]], dict[str, str]]:
    """({name: (dtype, shape)}, metadata) of a safetensors file from its header alone: no tensor is read, so a
    config can be checked against the weights before any memory is allocated for them."""
    import torch

    damaged = (
        f"{path} is not a readable safetensors file (%s); the checkpoint is truncated or damaged; "
        "use another checkpoint"
    )
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(damaged % "shorter than its header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise error(damaged % f"a header of {length:,} bytes in a file of {size:,}")
            raw = f.read(length)
    except OSError as e:
        raise error(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    header = loads_json(raw, f"the header of {path}", error)
    if not isinstance(header, dict):
        raise error(damaged % "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[torch.dtype | str, tuple[int, ...]]] = {}
    data_bytes = size - 8 - length
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) and 0 <= n <= data_bytes for n in offsets)
            and isinstance(entry.get("dtype"), str)
            and isinstance(metadata, dict)
        ):
            raise error(damaged % f"a bad header entry for {name[:60]!r}")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        tensors[name] = (getattr(torch, dtype) if dtype else entry["dtype"], tuple(shape))
    return tensors, metadata


# --------------------------------------------------------------------------------------------------------------------
# options of eval, generate and probe: one rule per option, checked by the options class and by the CLI before any
# work starts (the CLI passes None for a flag that was not given)

PRECISIONS = ("fp32", "bf16")
Rule = tuple[str, Callable[[Any], bool], str]  # (field, test, what the option needs); the field is the flag's name


def option_flag(name: str) -> str:
    """The command-line flag of an options field: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def show_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_at_least(name: str, minimum: int, note: str = "") -> Rule:
    return name, lambda v: is_int(v) and v >= minimum, f"must be an integer >= {minimum}{note}"


def number_in(name: str, test: Callable[[float], bool], rule: str) -> Rule:
    """A number passing ``test`` (comparisons with NaN are false, so NaN is refused)."""
    return name, lambda v: is_number(v) and bool(test(v)), f"must be a number {rule}"


def one_of(name: str, choices: tuple[str, ...]) -> Rule:
    return name, lambda v: v in choices, f"must be {' or '.join(choices)}"


def check_options(values: Mapping[str, Any], rules: Iterable[Rule], error: ErrorType = ConfigError) -> None:
    """Raise ``error`` for the first value that breaks its rule, as one line naming the flag and the value
    (``--top-p must be a number in (0, 1] (1 = off), got 2``). None means "not given" and passes."""
    for name, test, rule in rules:
        value = values.get(name)
        if value is not None and not test(value):
            raise error(f"{option_flag(name)} {rule}, got {show_value(value)}")
