"""The only code that reads or writes checkpoints and saved states. Safetensors and JSON only; nothing is pickled.

A checkpoint is a self-contained folder::

    step-00000500/
      model.safetensors        weights (the tied output head is stored once); metadata: config JSON, version
      config.json              the full effective config (model, data, train)
      tokenizer.json           the tokenizer, loadable by Hugging Face ``tokenizers``
      trainer_state.safetensors  optimizer moments, lane states, RNG state      (for resuming; optional)
      trainer_state.json         step, tokens seen, data cursor, param groups   (for resuming; optional)

Folders are written under a temporary name in the same parent and renamed into place, so a crash never leaves a
half-written checkpoint where a resume would find it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from longctx import __version__
from longctx.config import Config, ModelConfig
from longctx.decoders import State
from longctx.errors import CheckpointError, ConfigError, LongctxError
from longctx.model import LongContextLM, build_model, check_model_size
from longctx.tempfiles import locked_temp, remove_stale
from longctx.tokenizer import Tokenizer
from longctx.validate import check_tensor, field, read_json, read_safetensors_header

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_META = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TIED = "head.weight"  # same tensor as embed.weight; stored once


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file. A failed write (disk full, read-only, name too long) raises ``OSError`` with the
    system's errno: safetensors reports it as its own ``SafetensorError``, which callers would not recognise."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code) if found else str(e).splitlines()[0][:200], str(path)) from None
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; the same permissions as the checkpoint's other files
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


MAX_LANES = 1 << 16  # lanes a trainer state may hold (a hostile header cannot make the loader allocate more)
MAX_RNG_BYTES = 1 << 20  # a CUDA generator state is a few kB


@dataclass
class TrainerMeta:
    """The JSON part of a trainer state (``trainer_state.json``): where the run stands."""

    step: int  # optimizer steps taken
    tokens_seen: int  # training tokens read, all ranks together
    data_cursor: int  # the lanes' position in the token stream
    elapsed_s: float  # seconds of the training loop so far
    param_groups: list[dict[str, Any]]  # the optimizer's groups: parameter numbers and hyperparameters
    longctx_version: str = ""
    lanes: int | None = None  # train.batch_size of the run (older checkpoints: absent)
    world_size: int = 1  # ranks that wrote it (their RNG states are restored only for the same world size)
    val: dict[str, Any] | None = None  # the last validation result
    extra: dict[str, Any] | None = None  # a caller's own progress (a benchmark's settings and losses); not read here

    @classmethod
    def from_json(cls, meta: Any, where: str) -> TrainerMeta:
        """Checked field by field: a damaged or foreign file gets one line naming the field (CheckpointError)."""
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: expected a JSON object; the file is damaged")
        for key in ("step", "tokens_seen", "data_cursor", "elapsed_s", "lanes", "world_size"):
            if key in meta or key not in ("lanes", "world_size"):  # these two are optional
                field(meta, key, float if key == "elapsed_s" else int, where, minimum=1 if key == "world_size" else 0)
        for key in ("val", "extra"):
            if key in meta:
                field(meta, key, (dict, type(None)), where)
        for i, group in enumerate(field(meta, "param_groups", list, where)):
            group_where = f"{where}: param_groups[{i}]"
            ids = field(group, "params", list, group_where)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ids):
                raise CheckpointError(f"{group_where}: params must be a list of parameter numbers; the file is damaged")
            for key in ("lr", "eps", "weight_decay"):
                field(group, key, float, group_where, minimum=0)
            betas = field(group, "betas", list, group_where)
            if len(betas) != 2 or not all(isinstance(b, float | int) and 0 <= b < 1 for b in betas):
                raise CheckpointError(
                    f"{group_where}: betas must be two numbers in [0, 1), got {betas!r:.40}; the file is damaged"
                )
        version = meta.get("longctx_version", "")
        return cls(
            step=int(meta["step"]),
            tokens_seen=int(meta["tokens_seen"]),
            data_cursor=int(meta["data_cursor"]),
            elapsed_s=float(meta["elapsed_s"]),
            param_groups=meta["param_groups"],
            longctx_version=version if isinstance(version, str) else "",
            lanes=int(meta["lanes"]) if "lanes" in meta else None,
            world_size=int(meta.get("world_size", 1)),
            val=meta.get("val"),
            extra=meta.get("extra"),
        )


@dataclass
class TrainerState:
    """What resuming needs beyond the weights. ``tensors`` are flat (safetensors); ``meta`` is the JSON part;
    ``folder`` is the checkpoint it was read from (named in errors)."""

    meta: TrainerMeta
    tensors: dict[str, Tensor] = dataclass_field(default_factory=dict)
    folder: Path | None = None


def save_checkpoint(
    path: Path,
    model: LongContextLM,
    config: Config,
    tokenizer: Tokenizer | None,
    trainer_state: TrainerState | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temporary folder + rename). Returns ``path``. ``tokenizer`` is None only
    for a model that reads token ids directly (a synthetic benchmark task); such a folder has no tokenizer file, so
    ``eval`` and ``generate`` refuse it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, model, config, tokenizer, trainer_state)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves no partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # re-saving the same step: move the old one aside first, delete it after
        old = path.parent / f".tmp-old-{path.name}-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def is_complete_checkpoint(folder: Path) -> bool:
    """Every file of a resumable checkpoint is there and readable (JSON parses, safetensors headers open)."""
    try:
        for name in (CONFIG_FILE, TRAINER_META):
            read_json(folder / name, "checkpoint file")
        for name in (MODEL_FILE, TRAINER_TENSORS):
            with safe_open(str(folder / name), framework="pt") as f:
                f.keys()
        return (folder / TOKENIZER_FILE).is_file()
    except Exception:  # noqa: BLE001 - anything unreadable means incomplete
        return False


def recover_temporary(run_dir: Path) -> list[Path]:
    """Tidy a run folder after a kill: a temporary folder that holds a complete checkpoint whose step folder is
    missing is renamed into place (a kill between the write and the rename, or between the two renames of a re-save);
    every other temporary folder is deleted. Returns the checkpoints recovered."""
    recovered = []
    for tmp in sorted(Path(run_dir).glob(".tmp-*")):
        match = re.fullmatch(r"\.tmp-(?:old-)?(step-\d+)-\d+", tmp.name)
        target = run_dir / match.group(1) if match else None
        if target is not None and not target.exists() and tmp.is_dir() and is_complete_checkpoint(tmp):
            os.replace(tmp, target)
            recovered.append(target)
        else:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if recovered:
        _fsync_dir(Path(run_dir))
    return recovered


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a partial one under its name: rename it to a ``.tmp-``
    name first (atomic; a run cleans such leftovers when it starts), then delete the files."""
    path = Path(path)
    doomed = path.parent / f".tmp-delete-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_checkpoint_files(
    folder: Path, model: LongContextLM, config: Config, tokenizer: Tokenizer | None, trainer_state: TrainerState | None
) -> None:
    weights = {k: v for k, v in model.state_dict().items() if k != TIED}
    metadata = {
        "format": "pt",
        "longctx_version": __version__,
        "decoder": config.model.decoder,
        "config": json.dumps(config.to_dict()),
        "decoder_info": json.dumps(model.decoder.describe()),
    }
    _save_tensors(folder / MODEL_FILE, weights, metadata)
    _write_json(folder / CONFIG_FILE, config.to_dict())
    if tokenizer is not None:
        (folder / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
    if trainer_state is not None:
        _save_tensors(folder / TRAINER_TENSORS, trainer_state.tensors, {"longctx_version": __version__})
        _write_json(folder / TRAINER_META, asdict(trainer_state.meta))
    _fsync_dir(folder)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer's state dict: tensors ``optimizer.<param>.<name>`` plus JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], param_groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in param_groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"the optimizer state does not fit this model ({e}); resume with the same config "
            "or start from the weights only with --init-from"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# reading


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def find_latest_checkpoint(root: Path = Path("runs")) -> Path | None:
    """The most recently written checkpoint under ``root`` (any run), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in root.glob("*/step-*") if STEP_DIR.match(p.name) and (p / MODEL_FILE).is_file()]
    candidates += [p for p in root.glob("step-*") if STEP_DIR.match(p.name) and (p / MODEL_FILE).is_file()]
    written = []
    for p in candidates:
        with contextlib.suppress(FileNotFoundError):  # pruned by a training run since it was listed
            written.append(((p / MODEL_FILE).stat().st_mtime_ns, p))
    return max(written, key=lambda t: t[0], default=(0, None))[1]


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint). Raises CheckpointError with the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a folder written by longctx train")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a folder; give the checkpoint folder (the one holding {MODEL_FILE})"
        )
    if not (path / MODEL_FILE).exists() and (ckpts := find_checkpoints(path)):
        return ckpts[-1]
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is missing {', '.join(missing)}; give a complete folder written by longctx train"
        )
    return path


def read_config(path: Path) -> Config:
    data = read_json(path / CONFIG_FILE, "config file")
    try:
        return Config.from_dict(data, where=str(path / CONFIG_FILE))
    except ConfigError as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: {e}; the checkpoint was not written by this version of longctx or was edited"
        ) from None


def _read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(file)), metadata
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({str(e).splitlines()[0][:100]}); "
            "the checkpoint is truncated or damaged; use another checkpoint"
        ) from None


def _check_names(file: Path, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:4])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:4])}"] if unexpected else []
        raise CheckpointError(
            f"{file} does not match its config.json ({'; '.join(parts)}); the files come from different models"
        )


def load_weights(model: LongContextLM, file: Path) -> dict[str, str]:
    """Load ``file`` into ``model`` after checking names, shapes and dtypes; returns the file's metadata."""
    tensors, metadata = _read_weights(file)
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    _check_names(file, missing, unexpected)
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"{file}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the config needs "
                f"{tuple(want.shape)} {want.dtype}; the files come from different models"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {name} holds NaN or inf values; use an earlier checkpoint")
    model.load_state_dict(tensors, strict=False)
    return metadata


def check_weights_header(cfg: ModelConfig, file: Path) -> None:
    """Check ``cfg`` against the header of the weights ``file`` (names, shapes, dtypes) before anything is allocated:
    a hostile ``config.json`` (``n_layer = 10**9``, a huge ``d_model``) is refused by arithmetic and a model built on
    the meta device (:func:`~longctx.model.check_model_size`), never by running the machine out of memory."""
    header, _ = read_safetensors_header(file)
    elements = sum(math.prod(shape) for _, shape in header.values())
    # every layer holds several tensors and an MLP (d_model x d_ff twice); the embedding is vocab_size x d_model
    if cfg.n_layer > len(header) or max(cfg.vocab_size, 2 * cfg.d_ff) * cfg.d_model > elements:
        raise CheckpointError(
            f"{file} holds {len(header)} tensors of {elements:,} values in all, far fewer than its "
            f"config.json implies (model.n_layer {cfg.n_layer}, d_model {cfg.d_model}, d_ff "
            f"{cfg.d_ff}, vocab_size {cfg.vocab_size}); the files come from different models"
        )
    model = check_model_size(cfg, str(file.parent / CONFIG_FILE), CheckpointError)
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items() if k != TIED}
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    _check_names(file, missing, unexpected)
    for name, (dtype, shape) in header.items():
        if (dtype, shape) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {name} is {shape} {dtype}, the config needs {expected[name][1]} "
                f"{expected[name][0]}; the files come from different models"
            )


def load_checkpoint(path: str | Path) -> tuple[LongContextLM, Tokenizer, Config]:
    """(model in eval mode on the CPU, tokenizer, config) from a checkpoint folder (or a run folder's newest, looked
    up again if a training run prunes it while it is read)."""
    model, tokenizer, config, _ = load_newest(lambda: resolve_checkpoint(Path(path)))
    return model, tokenizer, config


def load_newest(pick: Callable[[], Path]) -> tuple[LongContextLM, Tokenizer, Config, Path]:
    """Load the checkpoint that ``pick`` names, and return it with its path.

    A training run with ``--keep-last`` deletes its older checkpoints while readers may be loading them (it renames
    the folder away first, so the folder vanishes at once). A checkpoint that vanishes while it is read is therefore
    picked again once (the newest then); if the pick names no other checkpoint, or that one vanishes too, one
    CheckpointError says so -- never "damaged", which would send the user after a problem the files do not have.
    """
    path = pick()
    for attempt in range(2):
        try:
            return (*_load_folder(path), path)
        except (LongctxError, OSError):
            if path.exists():
                raise  # a real problem of the files
        gone = path
        with contextlib.suppress(LongctxError):
            path = pick() if attempt == 0 else gone
        if path == gone or not path.exists():
            break
    raise CheckpointError(f"checkpoint {gone} was removed while it was read (a training run pruned it); run again")


def _load_folder(path: Path) -> tuple[LongContextLM, Tokenizer, Config]:
    config = read_config(path)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    if tokenizer.vocab_size != config.model.vocab_size:
        raise CheckpointError(
            f"{path / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model has "
            f"{config.model.vocab_size}; the tokenizer belongs to another model"
        )
    check_weights_header(config.model, path / MODEL_FILE)
    model = build_model(config.model)
    load_weights(model, path / MODEL_FILE)
    return model.eval(), tokenizer, config


def load_trainer_state(path: Path) -> TrainerState:
    tensors_file, meta_file = path / TRAINER_TENSORS, path / TRAINER_META
    if not tensors_file.is_file() or not meta_file.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no trainer state (it holds weights only); "
            "continue from its weights with --init-from instead of --resume"
        )
    meta = TrainerMeta.from_json(read_json(meta_file, "trainer state"), str(meta_file))
    return TrainerState(meta=meta, folder=path)  # tensors: read by check_trainer_state, after their header


def check_trainer_state(saved: TrainerState, optimizer: torch.optim.Optimizer, template: State, prefix: str) -> None:
    """The tensors of a trainer state fit the model being resumed, before any is used: optimizer moments of each
    parameter's shape, lane states (prefixed ``prefix``) of ``template``'s shapes but the batch, RNG states of
    torch's size, nothing non-finite. The JSON part was checked by :func:`load_trainer_state`. A state read from a
    folder is checked by its safetensors header first and only then read into ``saved.tensors``, so a file that
    claims huge tensors is refused before any memory is allocated for them."""
    folder = saved.folder or Path(".")
    where = str(folder / TRAINER_TENSORS)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = saved.meta.param_groups
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups] or [
        i for g in saved_groups for i in g["params"]
    ] != list(range(len(params))):
        raise CheckpointError(
            f"{folder / TRAINER_META}: param_groups do not fit this model; "
            "resume with the same config or start from the weights only with --init-from"
        )
    if not saved.tensors and saved.folder is not None:
        header, _ = read_safetensors_header(folder / TRAINER_TENSORS)
        _check_trainer_shapes(
            {k: (shape, dtype) for k, (dtype, shape) in header.items()}, where, params, template, prefix
        )
        saved.tensors, _ = _read_weights(folder / TRAINER_TENSORS)
    _check_trainer_shapes(
        {k: (tuple(t.shape), t.dtype) for k, t in saved.tensors.items()}, where, params, template, prefix
    )
    for key, tensor in saved.tensors.items():
        check_tensor(tensor, key, where)  # nothing non-finite


def _check_trainer_shapes(
    shapes: dict[str, tuple[tuple[int, ...], Any]], where: str, params: list[Tensor], template: State, prefix: str
) -> None:
    """Names, shapes and dtypes of a trainer state's tensors (from its header or the tensors themselves)."""
    lane_rows = set()

    def expect(
        key: str, shape: tuple[int, ...], dtype: Any, want_shape: tuple[int, ...] | None, want_dtype: torch.dtype
    ) -> None:
        if (want_shape is not None and tuple(shape) != tuple(want_shape)) or dtype != want_dtype:
            want = " ".join(filter(None, [want_shape is not None and str(tuple(want_shape)), str(want_dtype)]))
            raise CheckpointError(
                f"{where}: tensor {key} is {tuple(shape)} {dtype}, this model needs {want}; "
                "the file belongs to another model or is damaged"
            )

    for key, (shape, dtype) in shapes.items():
        if key.startswith("optimizer."):
            _, idx, name = (key.split(".", 2) + ["", ""])[:3]
            if (
                not idx.isdigit()
                or int(idx) >= len(params)
                or name not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
            ):
                raise CheckpointError(f"{where}: tensor {key} is no AdamW state of this model; the file is damaged")
            param = params[int(idx)]
            expect(key, shape, dtype, *(((), torch.float32) if name == "step" else (tuple(param.shape), param.dtype)))
        elif key.startswith(prefix):
            want = template.tensors().get(key[len(prefix) :])
            if want is None:
                raise CheckpointError(f"{where}: {key} is no lane state of this decoder; the file is damaged")
            if len(shape) != want.dim() or tuple(shape[1:]) != tuple(want.shape[1:]) or dtype != want.dtype:
                raise CheckpointError(
                    f"{where}: lane state {key} is {tuple(shape)} {dtype}, this model needs "
                    f"(lanes, {', '.join(map(str, want.shape[1:]))}) {want.dtype}; the file "
                    "belongs to another model or is damaged"
                )
            if not 1 <= shape[0] <= MAX_LANES:
                raise CheckpointError(
                    f"{where}: lane state {key} holds {shape[0]:,} lanes (at most {MAX_LANES:,}); the file is damaged"
                )
            lane_rows.add(shape[0])
        elif key.startswith("rng.torch."):
            expect(key, shape, dtype, tuple(torch.get_rng_state().shape), torch.uint8)
        elif key == "rng.cuda":
            expect(key, shape, dtype, None, torch.uint8)
            if len(shape) != 1 or shape[0] > MAX_RNG_BYTES:
                raise CheckpointError(f"{where}: tensor {key} must be one-dimensional and small; the file is damaged")
        else:
            raise CheckpointError(f"{where}: unexpected tensor {key}; the file was not written by longctx")
    if len(lane_rows) > 1:
        raise CheckpointError(
            f"{where}: the lane states disagree on the number of lanes ({sorted(lane_rows)}); the file is damaged"
        )


# --------------------------------------------------------------------------------------------------------------------
# saved decoder states (generate --save-state / --load-state)


@dataclass(frozen=True)
class SavedState:
    state: State
    tokens: int  # tokens read into the state
    last_token: int  # the last token read, whose logits the next sample needs (not yet fed to the model)


def save_state(path: Path, saved: SavedState, config: Config, tokenizer: Tokenizer) -> None:
    """Write a decoder state with the model config and tokenizer it belongs to (safetensors + JSON metadata)."""
    path = Path(path)
    metadata = {
        "format": "longctx-state",
        "longctx_version": __version__,
        "state_class": type(saved.state).__name__,
        "model_config": json.dumps(config.to_dict()["model"], sort_keys=True),
        "tokenizer_sha256": tokenizer.sha256,
        "tokens": str(saved.tokens),
        "last_token": str(saved.last_token),
    }
    try:
        remove_stale(path.parent, path.name)  # temporaries of earlier writes of this file cut short by a kill
        with locked_temp(path) as tmp:
            _save_tensors(tmp, saved.state.to_tensors(), metadata)
            os.replace(tmp, path)
    except OSError as e:  # disk full, read-only folder, name too long (safetensors' own errors arrive as OSError)
        raise CheckpointError(f"cannot write state file {str(path)!r}: {e.strerror or e}") from None


def load_state(path: Path, model: LongContextLM, config: Config, tokenizer: Tokenizer) -> SavedState:
    """Read a state written by :func:`save_state`; refuse one made for another model or tokenizer."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"state file {str(path)!r} {problem}; write one with --save-state")
    header, meta = read_safetensors_header(path)  # checked before any tensor is read
    if meta.get("format") != "longctx-state":
        raise CheckpointError(f"{path} is not a state saved by longctx generate --save-state")
    if meta.get("model_config") != json.dumps(config.to_dict()["model"], sort_keys=True):
        raise CheckpointError(f"{path} was saved with a different model; use it with the checkpoint that wrote it")
    if meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise CheckpointError(f"{path} was saved with a different tokenizer; use it with the checkpoint that wrote it")
    empty = model.init_state(1, device="cpu")
    template = empty.tensors()
    for name in sorted(set(header) | set(template)):
        if name not in template or name not in header:
            problem = "is missing" if name in template else "is not part of this model's state"
            raise CheckpointError(f"{path}: state tensor {name} {problem}; the state belongs to another model")
        want = (template[name].dtype, tuple(template[name].shape))
        if header[name] != want:
            raise CheckpointError(
                f"{path}: state tensor {name} is {header[name][1]} {header[name][0]}, this model "
                f"needs {want[1]} {want[0]} (one stream); the state belongs to another model or "
                "is damaged"
            )
    tensors, _ = _read_weights(path)
    state = type(empty).from_tensors(tensors)
    for name, t in state.tensors().items():
        check_tensor(t, name, str(path), tuple(template[name].shape), template[name].dtype)
    counts: dict[str, int] = {}
    for key, limit in (("tokens", None), ("last_token", tokenizer.vocab_size - 1)):
        text = meta.get(key, "")
        if not (text.isascii() and text.isdigit() and len(text) <= 19) or (limit is not None and int(text) > limit):
            raise CheckpointError(
                f"{path}: metadata {key} must be an integer in [0, {limit or 2**63 - 1}], got "
                f"{text[:40]!r}; the file is damaged"
            )
        counts[key] = int(text)
    return SavedState(state=state, tokens=counts["tokens"], last_token=counts["last_token"])
