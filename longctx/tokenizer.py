"""Tokenizers (Hugging Face ``tokenizers``): byte-level by default, byte-level BPE trained from the corpus as an option.

Both kinds are stored as one ``tokenizer.json``. Every token maps to an exact byte string (the byte-level alphabet of
GPT-2 maps each byte to one printable character), so decoding is "concatenate the bytes, then decode UTF-8
incrementally", which never splits a character in streamed output and works for text that is not valid UTF-8.

The byte tokenizer has ids 0..255 for the bytes and 256 for the document separator; encoding reads bytes directly
(no text decoding), so any file, valid UTF-8 or not, round-trips exactly.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from longctx.errors import CheckpointError
from longctx.validate import MAX_JSON_BYTES, loads_json, read_bytes

SEPARATOR = "<|endoftext|>"  # joins documents in the training stream; starts every evaluated stream
CHUNK_BYTES = 1 << 20  # incremental encoding reads this many bytes at a time
# BPE encodes at most this many characters without whitespace in one call: one pre-token of n characters costs the
# encoder ~270 bytes of memory per byte (a 4 MB run: ~1 GB); a longer run is cut at a character boundary
MAX_RUN_CHARS = 1 << 16
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN_CHARS + 1},}}")
log = logging.getLogger("longctx")


def byte_alphabet() -> list[str]:
    """The printable character that stands for each byte 0..255 (the GPT-2 byte-level mapping).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points 256 and above.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {}
    shift = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return [chars[b] for b in range(256)]


def _cut_point(data: bytes, force: bool) -> int:
    """Where to cut ``data`` so that BPE pre-tokenization of the two parts equals that of the whole.

    Prefers the last line end followed by a non-space byte, then the last space followed by a non-space byte (the
    space starts the next piece, as GPT-2's pre-tokenizer attaches it to the following word). Returns 0 (read
    more) when neither exists, unless ``force``, which cuts at a UTF-8 character boundary.
    """
    for sep in (b"\n", b" "):
        pos = data.rfind(sep, 0, len(data) - 1)
        while pos >= 0 and data[pos + 1 : pos + 2].isspace():
            pos = data.rfind(sep, 0, pos)
        if pos > 0:
            return pos + 1 if sep == b"\n" else pos
    if not force:
        return 0
    cut = len(data)
    while cut > len(data) - 4 and cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1  # back over continuation bytes
    if cut > 0 and data[cut - 1] >= 0xC0:
        cut -= 1  # a lead byte whose continuation bytes follow
    return cut or len(data)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the byte table that makes decoding and byte counting exact."""

    def __init__(self, hf: HFTokenizer, kind: Literal["byte", "bpe"]) -> None:
        self.hf = hf
        hf.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not a document boundary
        self.kind = kind
        sep = hf.token_to_id(SEPARATOR)
        if sep is None:
            raise CheckpointError(f"tokenizer has no {SEPARATOR} token; it was not made by longctx")
        self.sep_id: int = sep
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------------------------------------------- building

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens + the separator; needs no training."""
        alphabet = byte_alphabet()
        hf = HFTokenizer(models.BPE(vocab={ch: b for b, ch in enumerate(alphabet)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([SEPARATOR])
        return cls(hf, "byte")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE trained on ``texts``; ``vocab_size`` counts the 256 bytes and the separator."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[SEPARATOR],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, "bpe")

    @classmethod
    def from_str(cls, text: str, where: str = "tokenizer.json") -> Tokenizer:
        merges = _check_structure(loads_json(text, where, what="a valid tokenizer file"), where)
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception subclasses for any parse problem
            raise CheckpointError(
                f"{where} is not a valid tokenizer file ({str(e).splitlines()[0][:120]}); "
                "use the tokenizer.json written by longctx train"
            ) from None
        # the byte tokenizer is a BPE model without merges over the 256 byte symbols
        kind = "byte" if not merges and hf.get_vocab_size(with_added_tokens=False) <= 257 else "bpe"
        return cls(hf, kind)

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        """Read a ``tokenizer.json`` of at most :data:`~longctx.validate.MAX_JSON_BYTES` (its size is checked before
        it is read)."""
        data = read_bytes(Path(path), MAX_JSON_BYTES, "tokenizer file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}); the tokenizer file is damaged") from None
        return cls.from_str(text, where=path)

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_str())

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------------- bytes

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The exact bytes of every token id (special tokens: empty)."""
        inverse = {ch: b for b, ch in enumerate(byte_alphabet())}
        table = [b""] * self.vocab_size
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            table[idx] = bytes(inverse[ch] for ch in token if ch in inverse)
        return table

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """Bytes per token id, (V,) int64: sums over targets give the byte counts of bits_per_byte."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        table = self.token_bytes
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ---------------------------------------------------------------------------------------------------- encoding

    def encode_text(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes, where: str = "<input>", offset: int = 0) -> np.ndarray:
        """Token ids (int64) of a byte string. BPE replaces invalid UTF-8 and warns, naming ``where`` and the offset."""
        if self.kind == "byte":
            return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            log.warning("%s: invalid UTF-8 at byte %d; replaced with U+FFFD", where, offset + e.start)
            text = data.decode("utf-8", errors="replace")
        return self._encode_bpe(text)

    def _encode_bpe(self, text: str) -> np.ndarray:
        """BPE ids of ``text`` in bounded memory: a run of more than :data:`MAX_RUN_CHARS` characters without
        whitespace is encoded in pieces of that many characters (as the byte tokenizer cuts anywhere), so the tokens
        at each cut may differ from one call's; text with whitespace at least that often is encoded exactly."""
        pieces, start = [], 0
        for run in _LONG_RUN.finditer(text):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                pieces.append(text[start:cut])
                start = cut
        pieces.append(text[start:])
        ids = [np.asarray(self.hf.encode(piece, add_special_tokens=False).ids, dtype=np.int64) for piece in pieces]
        return np.concatenate(ids) if len(ids) > 1 else ids[0]

    def iter_encode(
        self, stream: BinaryIO, where: str = "<input>", chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Encode a binary stream in chunks: yields (ids, bytes read) with memory bounded by ``chunk_bytes``.

        Chunks are cut where pre-tokenization is unaffected (see :func:`_cut_point`), so the ids equal those of
        one call; at most about 4 x ``chunk_bytes`` are held, and BPE sees at most :data:`MAX_RUN_CHARS` characters
        without whitespace at once (longer runs are cut, see :meth:`_encode_bpe`). Invalid UTF-8 is reported once
        per stream.
        """
        pending = b""
        offset = 0
        warned = False
        while True:
            block = stream.read(chunk_bytes)
            eof = not block
            data = pending + block
            if not data:
                return
            cut = len(data) if (eof or self.kind == "byte") else _cut_point(data, len(data) >= 4 * chunk_bytes)
            piece, pending = data[:cut], data[cut:]
            if not piece:
                continue
            if warned:  # BPE only: report the first invalid sequence of a stream, replace the others silently
                ids = self._encode_bpe(piece.decode("utf-8", errors="replace"))
            else:
                ids = self.encode_bytes(piece, where, offset)
                warned = self.kind == "bpe" and not _valid_utf8(piece)
            offset += len(piece)
            yield ids, len(piece)
            if eof:
                return


def _check_structure(data: Any, where: str) -> list[Any]:
    """A tokenizer file is one longctx writes: a byte-level BPE model whose ids (vocabulary and added tokens) are
    exactly 0..V-1 and whose tokens are spelled in the byte alphabet, the ByteLevel pre-tokenizer and decoder, no
    normalizer or post-processor (a ``Split`` regex, for one, would change the tokens and costs time unbounded by the
    input). Returns the merges."""

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {problem}; use the tokenizer.json written by longctx train")

    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise refuse("no tokenizer model")
    model = data["model"]
    vocab, merges, added = model.get("vocab"), model.get("merges"), data.get("added_tokens")
    if (
        model.get("type") != "BPE"
        or not isinstance(vocab, dict)
        or not isinstance(merges, list)
        or not isinstance(added, list)
        or not all(isinstance(t, dict) for t in added)
    ):
        raise refuse("the model is not a byte-level BPE with a vocabulary, merges and added tokens")
    for part in ("pre_tokenizer", "decoder"):
        kind = data.get(part).get("type") if isinstance(data.get(part), dict) else data.get(part)
        if kind != "ByteLevel":
            raise refuse(f"its {part} is {kind!r}, not the ByteLevel one longctx writes")
    for part in ("normalizer", "post_processor"):
        if data.get(part) is not None:
            raise refuse(f"it has a {part}, which longctx never writes")
    if not all(isinstance(t.get("content"), str) for t in added):
        raise refuse("an added token has no text")
    tokens = {**{i: t for t, i in vocab.items()}, **{t.get("id"): t["content"] for t in added}}  # id -> token
    size = len(tokens)
    bad = next((i for i in tokens if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size), None)
    if bad is not None:
        raise refuse(f"token id {bad!r} lies outside 0..{size - 1}")
    if len(set(vocab.values())) != len(vocab) or any(vocab.get(t["content"], t["id"]) != t["id"] for t in added):
        raise refuse("two tokens share an id")
    alphabet = set(byte_alphabet())
    specials = {t["content"] for t in added}
    if any(set(token) - alphabet for token in vocab if token not in specials):
        raise refuse("a token is not spelled in the byte alphabet")
    return merges


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class StreamDecoder:
    """Turns token ids into text as they come, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.table = tokenizer.token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.table[token])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
