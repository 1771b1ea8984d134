"""Tokenizers: one interface over SentencePiece files and HF ``tokenizer.json``.

Encoding is deterministic (never subword sampling) and NFKC-normalizes first, as
the KoGPT2 SentencePiece normalizer does. Text never encodes to a special id: a
special-piece string typed in a corpus or a seed (``<usr>``, ``</s>``, ``<pad>``,
``<unused0>``) is encoded as the plain characters it is made of; special ids come
only from the code that frames examples (``<s>`` + ids + ``</s>``). Decoding joins pieces, drops special
pieces and turns the conjoining jamo that NFKC produced (``ᄏ``) back into the
compatibility jamo people type (``ㅋ``).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kogpt2.protowire import read_varint, varint

SPIECE_SUFFIXES = (".spiece", ".model")
SPECIAL_PIECES = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
#: The KoGPT2 v1 ids of the special pieces; trained tokenizers use the same.
SPECIAL_IDS = {"bos": 0, "eos": 1, "pad": 3, "unk": 5}
#: Key of ``tokenizer_config.json`` naming the SentencePiece file its ``tokenizer.json`` was converted from.
CONVERTED_FROM_KEY = "kogpt2_converted_from"


class TokenizerError(ValueError):
    """A tokenizer file or folder is missing, unreadable or inconsistent."""


def _compat_jamo_table() -> dict[int, str]:
    """Map each conjoining jamo that NFKC yields back to its compatibility jamo."""
    table: dict[int, str] = {}
    for cp in range(0x3131, 0x318F):
        nfkc = unicodedata.normalize("NFKC", chr(cp))
        if len(nfkc) == 1 and nfkc != chr(cp):
            table.setdefault(ord(nfkc), chr(cp))
    return table


_COMPAT_JAMO = _compat_jamo_table()


def normalize(text: str) -> str:
    """NFKC-normalize ``text`` as the model's own normalizer does."""
    return unicodedata.normalize("NFKC", text)


def restore_compat_jamo(text: str) -> str:
    """Turn standalone conjoining jamo (``ᄏᄏ``) back into compatibility jamo (``ㅋㅋ``).

    Args:
        text: decoded text.

    Returns:
        The text with U+1100..U+11FF jamo mapped to U+3131..U+318E where one exists.
    """
    return text.translate(_COMPAT_JAMO)


def file_fingerprint(path: str | Path) -> str:
    """Return the sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer(ABC):
    """What the rest of kogpt2 needs from a tokenizer.

    Attributes:
        path: the tokenizer file (a SentencePiece model or a ``tokenizer.json``).
        fingerprint: sha256 of that file's bytes.
    """

    path: Path
    fingerprint: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of pieces."""

    @abstractmethod
    def _encode_normalized(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode_ids(self, ids: list[int]) -> str: ...

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id."""

    def encode(self, text: str) -> list[int]:
        """Encode text into piece ids, without ``<s>``/``</s>``.

        Args:
            text: raw text; it is NFKC-normalized first.

        Returns:
            The piece ids, deterministically (no subword sampling).
        """
        return self._encode_normalized(normalize(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; same result as calling :meth:`encode` on each."""
        return [self.encode(t) for t in texts]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({self.bos_id, self.eos_id, self.pad_id})

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text: pieces joined, specials dropped, compatibility jamo restored."""
        special = self.special_ids
        kept = [int(i) for i in ids if int(i) not in special]
        return restore_compat_jamo(self._decode_ids(kept))

    def save(self, folder: str | Path) -> Path:
        """Copy the tokenizer file into ``folder`` under its canonical name; return the copy."""
        target = Path(folder) / self.canonical_name
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        return target

    @property
    @abstractmethod
    def canonical_name(self) -> str:
        """File name used when the tokenizer is saved into a model folder."""

    def describe(self) -> dict[str, object]:
        """The facts recorded beside data and models to detect mismatches."""
        return {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
        }

    def __getstate__(self) -> dict[str, object]:
        # Beam and multiprocessing pickle by path: the native processor is reloaded.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, object]) -> None:
        other = load_tokenizer(str(state["path"]))
        self.__dict__.update(other.__dict__)


# --- SentencePiece model protos, edited on the wire (the generated protobuf module may not import) ---

_UNUSED = 5  # ModelProto.SentencePiece.Type.UNUSED: never produced by encoding


def _proto_fields(data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Top-level protobuf fields: ``(number, wire type, raw field bytes, payload of a length-delimited field)``."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = read_varint(data, pos)
        wire = key & 7
        payload = b""
        if wire == 0:
            _, pos = read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = read_varint(data, pos)
            payload = data[pos : pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {start}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield key >> 3, wire, data[start:pos], payload


def mark_pieces_unused(model_proto: bytes, ids: frozenset[int]) -> bytes:
    """A copy of a SentencePiece ``ModelProto`` whose pieces ``ids`` have type UNUSED.

    SentencePiece matches user-defined pieces (``<usr>``, ``<unused0>``) in raw text; an
    UNUSED piece is never produced, so the text is segmented into ordinary pieces (or byte
    fallback). Ids and every other piece are unchanged.
    """
    out = bytearray()
    index = 0
    for number, wire, raw, payload in _proto_fields(model_proto):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces = 1
            if index in ids:
                body = b"".join(r for n, _, r, _ in _proto_fields(payload) if n != 3) + bytes([3 << 3, _UNUSED])
                raw = bytes([1 << 3 | 2]) + varint(len(body)) + body
            index += 1
        out += raw
    return bytes(out)


def _is_symbol(sp: Any, token_id: int) -> bool:
    """A user-defined special piece such as ``<usr>``, ``<sys>``, ``<unused0>`` (not bytes, not ``<unk>``)."""
    piece = sp.id_to_piece(token_id)
    return (
        len(piece) > 2
        and piece[0] == "<"
        and piece[-1] == ">"
        and not sp.IsByte(token_id)
        and token_id != sp.unk_id()
        and piece[1:-1].replace("_", "").isalnum()
    )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (KoGPT2 v1's ``gpt2_kor_tokenizer.spiece``)."""

    canonical_name = "tokenizer.spiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"cannot read SentencePiece model {self.path}: {exc}") from exc
        self.fingerprint = hashlib.sha256(data).hexdigest()
        sp = self._sp
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else sp.piece_to_id("<s>")
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.piece_to_id("<pad>")
        self.unk_id = sp.unk_id()
        self._control = frozenset(i for i in range(sp.vocab_size()) if sp.is_control(i) or _is_symbol(sp, i))
        # Encoding runs on a copy where the special pieces text could match are UNUSED (control
        # pieces never match text; <unk> stays: it is how unknown characters are spelled).
        matchable = frozenset(i for i in self.special_ids if not sp.is_control(i) and i != self.unk_id)
        #: The model proto encoding runs on (``kogpt2.hf_export`` converts this one).
        self.encoder_proto = mark_pieces_unused(data, matchable) if matchable else data
        self._encoder = spm.SentencePieceProcessor(model_proto=self.encoder_proto) if matchable else sp

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def special_ids(self) -> frozenset[int]:
        return self._control | {self.bos_id, self.eos_id, self.pad_id}

    def _encode_normalized(self, text: str) -> list[int]:
        return list(self._encoder.encode(text, enable_sampling=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        normalized = [normalize(t) for t in texts]
        return list(self._encoder.encode(normalized, enable_sampling=False))

    def _decode_ids(self, ids: list[int]) -> str:
        return str(self._sp.decode(ids))

    def id_to_piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(int(token_id)))


class HFJsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (KoGPT2 v2 style, where bos = eos = ``</s>``)."""

    canonical_name = "tokenizer.json"

    def __init__(self, path: str | Path):
        import json

        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:
            raise TokenizerError(f"cannot read tokenizer.json {self.path}: {exc}") from exc
        self.fingerprint = file_fingerprint(self.path)
        names = dict(SPECIAL_PIECES)
        folder = self.path.parent
        for meta in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / meta).is_file():
                data = json.loads((folder / meta).read_text(encoding="utf-8"))
                for role in names:
                    value = data.get(f"{role}_token")
                    if isinstance(value, dict):
                        value = value.get("content")
                    if isinstance(value, str):
                        names[role] = value
        ids = {}
        for role, piece in names.items():
            token_id = self._tok.token_to_id(piece)
            if token_id is None:
                raise TokenizerError(f"{self.path}: special piece {piece!r} ({role}) is not in the vocabulary")
            ids[role] = token_id
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids["bos"], ids["eos"], ids["pad"], ids["unk"])
        self._vocab = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        # every added special token but <unk>, which is how unknown characters are spelled
        specials = {int(i) for i, t in added.items() if t.special} | {self.bos_id, self.eos_id, self.pad_id}
        self._special = frozenset(specials - {self.unk_id})
        # typed "</s>" / "<pad>" are not matched as added tokens but go through the model as text
        self._tok.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return int(self._vocab)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def _encode_normalized(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        special = self._special
        # A model vocabulary may itself hold a piece such as "</s>": never let text reach it.
        return [self.unk_id if i in special else i for i in ids] if special.intersection(ids) else ids

    def _decode_ids(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        return text.replace("\u2581", " ").strip()

    def id_to_piece(self, token_id: int) -> str:
        return str(self._tok.id_to_token(int(token_id)))


def _converted_from(folder: Path) -> Path | None:
    """The SentencePiece file a folder's ``tokenizer.json`` was converted from (``kogpt2 export``), if present."""
    import json

    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        name = config[CONVERTED_FROM_KEY]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    source = folder / Path(str(name)).name
    return source if source.suffix in SPIECE_SUFFIXES and source.is_file() else None


def find_tokenizer_file(folder: Path) -> Path:
    """Return the tokenizer file inside a model folder.

    A ``tokenizer.json`` wins over SentencePiece files, unless ``tokenizer_config.json`` says it
    was converted from one of them (the Hugging Face files :func:`kogpt2.hf_export.write_hf_tokenizer`
    adds): then the SentencePiece file is the tokenizer, and its fingerprint is the folder's.

    Raises:
        TokenizerError: the folder holds no tokenizer, or several candidates.
    """
    if (folder / "tokenizer.json").is_file():
        return _converted_from(folder) or folder / "tokenizer.json"
    candidates = sorted(p for p in folder.iterdir() if p.suffix in SPIECE_SUFFIXES and p.is_file())
    if (folder / "tokenizer.spiece") in candidates:
        return folder / "tokenizer.spiece"
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise TokenizerError(
            f"{folder} holds no tokenizer: expected tokenizer.json or a SentencePiece "
            "file (*.spiece / *.model, e.g. gpt2_kor_tokenizer.spiece)"
        )
    raise TokenizerError(f"{folder} holds several SentencePiece files {[p.name for p in candidates]}; keep one")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a SentencePiece file, a model folder, or a ``tokenizer.json``.

    Args:
        path: a ``.spiece``/``.model`` file; a ``tokenizer.json``; or a folder holding one
            (the KoGPT2 v1 layout, a saved kogpt2 model, an HF folder, or an output folder of
            training or preprocessing, whose committed version holds it).

    Returns:
        A :class:`Tokenizer`.

    Raises:
        TokenizerError: the path does not exist or holds no readable tokenizer.
    """
    p = Path(path)
    if p.is_dir():
        from kogpt2.outputs import NotCommittedError, version_root

        try:  # an output folder of these jobs: its committed version holds the tokenizer
            p = Path(version_root(str(p)))
        except NotCommittedError as exc:
            raise TokenizerError(str(exc)) from None
        p = find_tokenizer_file(p)
    if not p.is_file():
        raise TokenizerError(
            f"tokenizer not found: {path} (give a .spiece/.model file, tokenizer.json or a model folder)"
        )
    st = p.stat()
    return _open_tokenizer(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _open_tokenizer(path: str, size: int, mtime_ns: int) -> Tokenizer:
    """One :class:`Tokenizer` per file (and version of it) per process: a job's plan, its validation
    step and its model share it instead of parsing the model three times (0.3 s each for the v1 file).
    A tokenizer is not changed after it is built."""
    if path.endswith(".json"):
        return HFJsonTokenizer(path)
    return SentencePieceTokenizer(path)


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    output: str | Path,
    *,
    character_coverage: float = 0.9995,
    model_type: str = "unigram",
) -> SentencePieceTokenizer:
    """Train a SentencePiece tokenizer with KoGPT2's special pieces and ids.

    ``<s>``=0, ``</s>``=1, ``<usr>``=2, ``<pad>``=3, ``<sys>``=4, ``<unk>``=5, then 256
    byte-fallback pieces, so rare syllables and hanja never become ``<unk>``.

    Args:
        files: UTF-8 text files, one sentence per line.
        vocab_size: target number of pieces (at least 300: specials + 256 bytes + some).
        output: folder to write ``tokenizer.spiece`` (and ``tokenizer.vocab``) into.
        character_coverage: share of characters covered by pieces; the rest fall back to bytes.
        model_type: ``unigram`` (as KoGPT2) or ``bpe``.

    Returns:
        The trained tokenizer, loaded from ``output/tokenizer.spiece``.

    Raises:
        ValueError: bad vocab size, no input file, or an empty corpus.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: must be at least 300 (6 specials + 256 byte pieces + pieces)")
    paths = [str(f) for f in files]
    if not paths:
        raise ValueError("train_tokenizer: no input files")
    for f in paths:
        if not Path(f).is_file():
            raise ValueError(f"train_tokenizer: input file not found: {f}")
    if all(Path(f).stat().st_size == 0 for f in paths):
        raise ValueError("train_tokenizer: input files are empty")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=paths,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc",
        bos_id=SPECIAL_IDS["bos"],
        eos_id=SPECIAL_IDS["eos"],
        pad_id=SPECIAL_IDS["pad"],
        unk_id=SPECIAL_IDS["unk"],
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        unk_piece="<unk>",
        user_defined_symbols=["<usr>", "<sys>"],
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        num_threads=2,
        minloglevel=2,
    )
    model_file = prefix.with_suffix(".model")
    final = out / SentencePieceTokenizer.canonical_name
    model_file.replace(final)
    return SentencePieceTokenizer(final)
