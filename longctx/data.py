"""Corpus discovery, the token cache and the lanes that training reads.

- Documents: every file is one document. ``--data`` takes files, folders (searched recursively, hidden entries
  skipped) and globs; without it, the bundled Shakespeare corpus (``longctx/corpora/shakespeare.tar.xz``) is used.
- Split: the last ``data.val_docs`` documents in sorted name order are held out for validation (at most a quarter of
  the documents, and none when there is only one).
- Token cache: each split becomes one stream ``SEP doc1 SEP doc2 ...`` of uint16 (or uint32) ids in a flat file that
  is memory-mapped. The file name is a hash of the documents (names, sizes, mtimes) and the tokenizer, so a change to
  either builds a new cache; a cache is written to a temporary file and renamed, so a half-written one is never used.
- Lanes (Transformer-XL style): the stream is cut into B contiguous lanes; step i reads segment i of every lane, so
  each lane's decoder state is carried from one segment to the next.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from longctx.config import DataConfig
from longctx.errors import DataError, LongctxError
from longctx.tempfiles import TEMP_NAME, locked_temp, remove_stale
from longctx.tokenizer import Tokenizer
from longctx.validate import read_json

BUNDLED = "shakespeare"
log = logging.getLogger("longctx")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One input file: a name for messages, its size and mtime for the cache key, and how to open it."""

    name: str
    size: int
    mtime_ns: int
    opener: Callable[[], BinaryIO]

    def open(self) -> BinaryIO:
        return self.opener()


# --------------------------------------------------------------------------------------------------------------------
# discovery


@lru_cache(maxsize=1)
def _bundled_members() -> tuple[tuple[str, bytes, int], ...]:
    """(name, bytes, mtime) of every text in the bundled archive, read once (about 5 MB)."""
    archive = resources.files("longctx") / "corpora" / f"{BUNDLED}.tar.xz"
    with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tar:
        members = []
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                members.append((member.name, f.read(), int(member.mtime)))
    return tuple(members)


def bundled_documents() -> list[Document]:
    """The bundled corpus: 42 public-domain works of Shakespeare, one document each."""
    docs = []
    for name, data, mtime in _bundled_members():
        docs.append(Document(f"{BUNDLED}/{name}", len(data), mtime, lambda d=data: io.BytesIO(d)))
    return docs


def _file_document(path: Path) -> Document:
    st = path.stat()
    return Document(str(path), st.st_size, st.st_mtime_ns, lambda p=path: open(p, "rb"))


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if path.exists():
        if not path.is_file():
            raise DataError(f"data path {pattern!r} is not a regular file or folder; give text files or folders")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not matches:
        raise DataError(f"data path {pattern!r} does not exist; give existing files, folders or a glob")
    if not files:
        raise DataError(f"data pattern {pattern!r} matches no files")
    return files


CACHE_MARKER = ".longctx-token-cache"
RUN_MARKERS = ("model.safetensors", "metrics.jsonl", CACHE_MARKER)  # a checkpoint, a run folder, a token cache
TEXT_PROBE_BYTES = 65536  # how much of a file is read to decide whether it is text
MAX_INVALID_SHARE = 0.3  # more than this share of the probe in invalid UTF-8 sequences: not text


def _in_run_folder(path: Path, marked: dict[Path, bool]) -> bool:
    """Whether ``path`` lies in a checkpoint, a training run folder or a token cache: never training data.
    ``marked`` remembers the answer per folder, so that the files of one folder cost one look at its ancestors."""
    folder = path.parent
    if folder not in marked:
        marked[folder] = any((folder / m).exists() for m in RUN_MARKERS) or (
            folder.parent != folder and _in_run_folder(folder, marked)
        )
    return marked[folder]


def is_text(path: Path) -> bool:
    """A text file: no NUL byte and mostly valid UTF-8 in its first ``TEXT_PROBE_BYTES`` bytes (Latin-1 text, with
    a few invalid sequences, still counts)."""
    try:
        with open(path, "rb") as f:
            probe = f.read(TEXT_PROBE_BYTES)
    except OSError:
        return True  # unreadable files are reported as such below
    if b"\0" in probe:
        return False
    invalid = probe.decode("utf-8", errors="replace").count("\ufffd")
    return invalid <= MAX_INVALID_SHARE * max(1, len(probe))


def discover(paths: list[str]) -> list[Document]:
    """Documents for ``--data`` paths (the bundled corpus when ``paths`` is empty), sorted by name, no duplicates.

    A file named explicitly must not be empty and is read as it is; of the files found in folders or by globs, the
    empty ones, those that are not text (checkpoints, archives, images: :func:`is_text`) and everything inside a run
    folder, a checkpoint or the token cache are skipped, the last two with one warning that counts them.
    """
    if not paths:
        return bundled_documents()
    seen: dict[str, Document] = {}
    skipped = {"not text": 0, "in a run folder or token cache": 0}
    marked: dict[Path, bool] = {}
    for pattern in paths:
        named = Path(pattern).expanduser()
        if named.is_file() and named.stat().st_size == 0:
            raise DataError(f"{pattern!r} is empty (0 bytes); give a file with text")
        for path in _expand(pattern):
            key = str(path.resolve())
            if key in seen:
                continue
            if named.is_file():  # named explicitly: read as given (any bytes are valid input)
                seen[key] = _file_document(path)
            elif _in_run_folder(path.resolve(), marked):
                skipped["in a run folder or token cache"] += 1
            elif os.access(path, os.R_OK) and not is_text(path):
                skipped["not text"] += 1
            else:
                seen[key] = _file_document(path)
    if any(skipped.values()):
        log.warning("skipped %s", ", ".join(f"{n} file{'s' * (n != 1)} {why}" for why, n in skipped.items() if n))
    docs = sorted(seen.values(), key=lambda d: d.name)
    for doc in docs:
        if not os.access(doc.name, os.R_OK):
            raise DataError(f"cannot read data file {doc.name!r}: permission denied")
    docs = [d for d in docs if d.size > 0]
    if not docs:
        raise DataError(f"no data: {' '.join(paths)} holds no text files with content; give files with text")
    return docs


def split_documents(docs: list[Document], val_docs: int) -> tuple[list[Document], list[Document]]:
    """(train, validation): the last ``val_docs`` documents are held out, at most a quarter of them."""
    n_val = min(val_docs, len(docs) // 4) if len(docs) >= 2 else 0
    if val_docs and len(docs) >= 2:
        n_val = max(n_val, 1)
    return docs[: len(docs) - n_val], docs[len(docs) - n_val :]


# --------------------------------------------------------------------------------------------------------------------
# token cache


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("LONGCTX_CACHE"):
        return Path(os.environ["LONGCTX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longctx" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _cache_key(docs: list[Document], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"format={CACHE_FORMAT};tokenizer={tokenizer.sha256}".encode())
    for d in docs:
        h.update(f"\n{d.name}\t{d.size}\t{d.mtime_ns}".encode())
    return h.hexdigest()[:24]


def iter_document_tokens(doc: Document, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, int]]:
    """(ids, bytes) chunks of one document, read incrementally."""
    try:
        with doc.open() as f:
            yield from tokenizer.iter_encode(f, where=doc.name)
    except OSError as e:
        raise DataError(f"cannot read {doc.name!r}: {e.strerror or e}") from None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _cache_is_intact(path: Path, meta_path: Path) -> bool:
    """The cache file exists and matches the size and SHA-256 recorded when it was written."""
    if not path.is_file() or not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path, "token cache record")
        return path.stat().st_size == meta["bytes"] and _file_sha256(path) == meta["sha256"]
    except (LongctxError, OSError, ValueError, KeyError, TypeError):
        return False


def _write_token_cache(docs: list[Document], tokenizer: Tokenizer, path: Path, dtype: np.dtype) -> dict:
    """Tokenize ``docs`` into ``path`` (through a locked temporary); returns the metadata with size and hash."""
    h, n_tokens = hashlib.sha256(), 0
    with locked_temp(path) as tmp:
        with open(tmp, "wb") as out:
            for doc in docs:
                for ids in (np.array([tokenizer.sep_id]), *(ids for ids, _ in iter_document_tokens(doc, tokenizer))):
                    data = ids.astype(dtype).tobytes()
                    out.write(data)
                    h.update(data)
                    n_tokens += len(ids)
        os.replace(tmp, path)
    return {
        "documents": [d.name for d in docs],
        "tokens": n_tokens,
        "dtype": dtype.name,
        "tokenizer_sha256": tokenizer.sha256,
        "bytes": n_tokens * dtype.itemsize,
        "sha256": h.hexdigest(),
    }


OLD_TEMP_NAME = re.compile(r"^[0-9a-f]{24}\.tmp(?P<pid>\d+)$")  # the temporaries of longctx 0.x before this rule


def remove_outdated_caches(root: Path, keep: Path) -> list[Path]:
    """Delete caches that can never be used again: one of the files they were built from (named by absolute path in
    their ``.json``) has changed since (it is newer than the cache), so its key -- names, sizes, mtimes -- no longer
    matches. Caches of files that are gone are kept (a disk may only be unmounted). Returns the caches deleted."""
    removed = []
    for meta_path in root.glob("*.json"):
        path = meta_path.with_suffix(".bin")
        if path == keep:
            continue
        try:
            built = path.stat().st_mtime_ns
            names = json.loads(meta_path.read_text())["documents"]
            outdated = any(os.path.isabs(n) and os.path.exists(n) and os.stat(n).st_mtime_ns > built for n in names)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or replaced by another process, or not ours
        if outdated:
            path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def build_token_cache(docs: list[Document], tokenizer: Tokenizer, root: Path) -> np.ndarray:
    """The memory-mapped token stream ``SEP doc1 SEP doc2 ...`` of ``docs``, built once and reused.

    A cache whose size or SHA-256 differs from what was recorded when it was written (truncated, modified) is
    rebuilt, never used. Building one first deletes what is provably stale in ``root``: temporaries of builds whose
    process died, and caches of files that have changed since. A failed write (disk full, read-only) is one
    DataError.
    """
    try:
        return _build_token_cache(docs, tokenizer, root)
    except OSError as e:
        raise DataError(
            f"cannot write the token cache in {root}: {e.strerror or e}; free space there or point "
            "$LONGCTX_CACHE (or data.cache_dir) to another folder"
        ) from None


def _build_token_cache(docs: list[Document], tokenizer: Tokenizer, root: Path) -> np.ndarray:
    dtype = token_dtype(tokenizer.vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    (root / CACHE_MARKER).touch()  # so that `--data` over a folder holding the cache never trains on it
    path = root / f"{_cache_key(docs, tokenizer)}.bin"
    meta_path = path.with_suffix(".json")
    if not _cache_is_intact(path, meta_path):
        for stale in (
            remove_stale(root) + remove_stale(root, pattern=OLD_TEMP_NAME) + remove_outdated_caches(root, keep=path)
        ):
            log.info(
                "deleted %s from the token cache (%s)",
                stale.name,
                "an interrupted build"
                if TEMP_NAME.match(stale.name) or OLD_TEMP_NAME.match(stale.name)
                else "its documents have changed since",
            )
        if path.exists():
            log.warning(
                "token cache %s does not match its recorded size and hash (damaged, or written by an older "
                "version); rebuilding it",
                path,
            )
        meta_path.unlink(missing_ok=True)
        meta = _write_token_cache(docs, tokenizer, path, dtype)
        meta_path.write_text(json.dumps(meta, indent=1))
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_texts(docs: list[Document]) -> Iterator[str]:
    """Document texts in pieces of about 1 MB for tokenizer training (invalid UTF-8 replaced)."""
    for doc in docs:
        with doc.open() as f:
            while block := f.read(1 << 20):
                yield block.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------------------
# lanes


class Lanes:
    """B contiguous lanes over a token stream, read one segment of ``seq_len`` tokens per step.

    Segment ``index`` of lane b holds inputs ``stream[b*L + s*T : b*L + s*T + T]`` and the targets shifted by one,
    where ``s = index mod segments_per_epoch`` and L the lane length. At the start of each epoch the lanes begin
    again, and the trainer resets their states.
    """

    def __init__(self, tokens: np.ndarray, n_lanes: int, seq_len: int) -> None:
        self.tokens, self.n_lanes, self.seq_len = tokens, n_lanes, seq_len
        self.lane_len = len(tokens) // n_lanes
        self.segments_per_epoch = (self.lane_len - 1) // seq_len
        if self.segments_per_epoch < 1:
            need = n_lanes * (seq_len + 1)
            raise DataError(
                f"the training data has {len(tokens):,} tokens, fewer than one segment per lane "
                f"({n_lanes} lanes x {seq_len + 1} = {need:,}); give more data or lower "
                "--batch-size / --seq-len"
            )

    def is_epoch_start(self, index: int) -> bool:
        return index % self.segments_per_epoch == 0

    def batch(self, index: int, lanes: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (len(lanes), T) int64 for segment ``index`` of the given lanes."""
        start = (index % self.segments_per_epoch) * self.seq_len
        rows = [
            self.tokens[lane * self.lane_len + start : lane * self.lane_len + start + self.seq_len + 1]
            for lane in lanes
        ]
        block = torch.from_numpy(np.stack(rows).astype(np.int64))  # (b, T + 1)
        return block[:, :-1], block[:, 1:]
