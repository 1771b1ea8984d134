"""The per-example contract: what one training example is, which split and shard it goes to, its bytes.

Pure functions, one example (or one text) at a time: frame (``<s>`` + ids + ``</s>``), fit to
``max_len`` (truncate, or cut into windows), pad, pack, the split and shard chosen by a hash of
the text, the shard file names, and the ``tf.train.Example`` bytes. No TensorFlow here:
:func:`serialize_example` writes the protocol buffer bytes directly (identical to TensorFlow's
deterministic serialization, which the tests check), so Beam workers stay light. The features
are those of ``schemas/tfrecord_example.json``: ``input_ids`` (int64 [max_len]) and ``length``
(int64). :func:`data_fingerprint` is the one definition of a shard set's content fingerprint.

The preprocessing pipeline does the same work on thousands of examples at once with numpy
(:mod:`pipelines.shards.framing`), byte for byte as these functions do it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kogpt2.protowire import read_varint, varint
from kogpt2.schemas import load_schema
from kogpt2.tokenizer import Tokenizer

SPLITS = ("train", "validation")
OVERFLOW_MODES = ("truncate", "window")


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer facts examples are made with: what ``info.json`` records (its ``tokenizer`` object).

    The special ids frame (``<s>``, ``</s>``) and pad (``<pad>``) every example; the fingerprint
    and vocabulary size tie shards to the tokenizer that made them (training refuses another).

    Attributes:
        fingerprint: sha256 of the tokenizer file.
        vocab_size: number of pieces.
        bos_id: ``<s>``. eos_id: ``</s>``. pad_id: ``<pad>``. unk_id: ``<unk>``.
    """

    fingerprint: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenizerFacts:
        """The facts of a loaded tokenizer."""
        return cls(tokenizer.fingerprint, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                   tokenizer.pad_id, tokenizer.unk_id)  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TokenizerFacts:
        """The facts recorded in an ``info.json`` (its ``tokenizer`` object; other keys are ignored).

        Raises:
            KeyError: a fact is missing.
        """
        return cls(
            str(doc["fingerprint"]), *(int(doc[k]) for k in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id"))
        )

    def to_json(self) -> dict[str, Any]:
        """The ``tokenizer`` object of ``info.json`` (:meth:`kogpt2.tokenizer.Tokenizer.describe`'s keys)."""
        return asdict(self)


def frame(ids: Sequence[int], bos_id: int, eos_id: int) -> list[int]:
    """``<s>`` + ids + ``</s>``."""
    return [bos_id, *ids, eos_id]


def truncate(seq: Sequence[int], max_len: int) -> list[int]:
    """Keep the first ``max_len`` tokens: the front (and ``<s>``) survives, the end is cut."""
    return list(seq[:max_len])


def windows(seq: Sequence[int], max_len: int) -> list[list[int]]:
    """Cut a long sequence into consecutive windows of at most ``max_len`` tokens.

    The first window starts with ``<s>``, the last ends with ``</s>``; no token is repeated.
    A trailing window of a single token (a lone ``</s>``) is dropped: it teaches nothing.
    """
    out = [list(seq[i : i + max_len]) for i in range(0, len(seq), max_len)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


def fit(seq: Sequence[int], max_len: int, overflow: str = "truncate") -> list[list[int]]:
    """Fit a framed sequence to ``max_len``: itself, its front (``truncate``) or its ``window`` pieces.

    Raises:
        ValueError: unknown ``overflow``.
    """
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow={overflow!r}: must be one of {OVERFLOW_MODES}")
    if len(seq) <= max_len:
        return [list(seq)]
    if overflow == "truncate":
        return [truncate(seq, max_len)]
    return windows(seq, max_len)


def pad(seq: Sequence[int], max_len: int, pad_id: int) -> tuple[list[int], int]:
    """Right-pad to ``max_len`` with ``pad_id``.

    Returns:
        ``(ids, length)``: ``max_len`` ids and the number of real tokens at the front.

    Raises:
        ValueError: ``seq`` is longer than ``max_len``.
    """
    if len(seq) > max_len:
        raise ValueError(f"sequence of {len(seq)} tokens does not fit max_len={max_len}; fit() it first")
    return [*seq, *([pad_id] * (max_len - len(seq)))], len(seq)


def pack(seqs: Iterable[Sequence[int]], max_len: int, pad_id: int) -> Iterator[tuple[list[int], int]]:
    """Concatenate sequences into blocks of exactly ``max_len`` tokens.

    Sequences run on across block boundaries (no token is lost, no padding between them);
    only the last block is padded.

    Yields:
        ``(ids, length)`` per block, ``length == max_len`` except possibly for the last.
    """
    buf: list[int] = []
    for seq in seqs:
        buf.extend(seq)
        while len(buf) >= max_len:
            yield buf[:max_len], max_len
            del buf[:max_len]
    if buf:
        yield pad(buf, max_len, pad_id)


def packing_efficiency(tokens: int, blocks: int, max_len: int) -> float | None:
    """Real tokens over token slots (``blocks * max_len``); None when there are no blocks."""
    return tokens / (blocks * max_len) if blocks else None


def stable_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the UTF-8 text: the same on every machine and run."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def stable_hashes(texts: Iterable[str]) -> list[bytes]:
    """:func:`stable_hash` of each text."""
    blake2b = hashlib.blake2b
    return [blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]


def assign_split(digest: bytes, val_fraction: float) -> str:
    """``"validation"`` for a ``val_fraction`` share of digests, else ``"train"``.

    Args:
        digest: :func:`stable_hash` of the normalized text (equal texts go the same way).
        val_fraction: share of validation, in [0, 1).
    """
    return "validation" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def assign_shard(digest: bytes, num_shards: int) -> int:
    """Shard index of a digest, uniform over ``range(num_shards)`` and independent of the split."""
    return int.from_bytes(digest[8:16], "big") % num_shards


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00000-of-00004.tfrecord.gz``: the file pattern of ``schemas/tfrecord_example.json``."""
    return str(load_schema("tfrecord_example")["file_pattern"]).format(split=split, shard=index, num_shards=count)


# --- tf.train.Example wire format -------------------------------------------------------

_VARINT_CACHE = 1 << 16
_VARINTS = [varint(i) for i in range(_VARINT_CACHE)]


def _enc(value: int) -> bytes:
    return _VARINTS[value] if 0 <= value < _VARINT_CACHE else varint(value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _enc(number << 3 | 2) + _enc(len(payload)) + payload


def _packed(values: Sequence[int]) -> bytes:
    """Packed varints of int64 values."""
    if values and (min(values) < 0 or max(values) >= _VARINT_CACHE):
        return b"".join([varint(v) for v in values])
    return b"".join(map(_VARINTS.__getitem__, values))


def _int64_feature(values: Sequence[int]) -> bytes:
    """``Feature{int64_list: Int64List{value: values}}`` (the packed field is omitted when empty)."""
    packed = _packed(values)
    int64_list = b"\x0a" + _enc(len(packed)) + packed if packed else b""  # Int64List.value = 1
    return b"\x1a" + _enc(len(int64_list)) + int64_list  # Feature.int64_list = 3


_INPUT_IDS_KEY = _field(1, b"input_ids") + b"\x12"  # map entry: key = 1, value = 2
_LENGTH_KEY = _field(1, b"length") + b"\x12"


def serialize_example(input_ids: Sequence[int], length: int) -> bytes:
    """Serialize one training example as ``tf.train.Example`` bytes.

    Byte-identical to ``tf.train.Example(...).SerializeToString(deterministic=True)``
    (map entries in key order: ``input_ids``, ``length``).

    Args:
        input_ids: the padded ids (``max_len`` of them).
        length: number of real tokens.

    Returns:
        The serialized proto.
    """
    ids_feature = _int64_feature(input_ids)
    ids_entry = _INPUT_IDS_KEY + _enc(len(ids_feature)) + ids_feature
    len_feature = _int64_feature((length,))
    len_entry = _LENGTH_KEY + _enc(len(len_feature)) + len_feature
    # Example.features = 1 { Features.feature = 1 (one entry per feature) }
    features = b"\x0a" + _enc(len(ids_entry)) + ids_entry + b"\x0a" + _enc(len(len_entry)) + len_entry
    return b"\x0a" + _enc(len(features)) + features


def _fields(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Length-delimited fields of a message (the only wire type our Example uses besides varints)."""
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        if tag & 7 != 2:
            raise ValueError(f"unexpected wire type {tag & 7} in tf.train.Example bytes")
        size, pos = read_varint(data, pos)
        yield tag >> 3, data[pos : pos + size]
        pos += size


def parse_example(data: bytes) -> dict[str, list[int]]:
    """Decode the int64 features of serialized ``tf.train.Example`` bytes (no TensorFlow).

    Returns:
        ``{feature name: values}``, e.g. ``{"input_ids": [...], "length": [7]}``.
    """
    out: dict[str, list[int]] = {}
    for _, features in _fields(data):
        for _, entry in _fields(features):
            parts = dict(_fields(entry))
            key = parts[1].decode("utf-8")
            values: list[int] = []
            for kind, body in _fields(parts.get(2, b"")):
                if kind != 3:
                    raise ValueError(f"feature {key!r} is not an int64_list")
                for _, packed in _fields(body):
                    pos = 0
                    while pos < len(packed):
                        v, pos = read_varint(packed, pos)
                        values.append(v - (1 << 64) if v >= 1 << 63 else v)
            out[key] = values
    return out


def example_prefix(packed_len: int, suffix_len: int) -> bytes:
    """Everything of a serialized Example before its packed ``input_ids`` varints.

    What a batch framer (:mod:`pipelines.shards.framing`) writes around the ids it lays out itself:
    ``example_prefix(len(packed), len(suffix)) + packed + suffix`` is :func:`serialize_example`'s
    bytes for non-empty ``input_ids``.

    Args:
        packed_len: bytes of the ``input_ids`` varints (at least one id).
        suffix_len: bytes of :func:`example_suffix`.
    """
    int64_list_len = 1 + len(_enc(packed_len)) + packed_len
    ids_feature_len = 1 + len(_enc(int64_list_len)) + int64_list_len
    ids_entry_len = len(_INPUT_IDS_KEY) + len(_enc(ids_feature_len)) + ids_feature_len
    features_len = 1 + len(_enc(ids_entry_len)) + ids_entry_len + suffix_len
    return (
        b"\x0a"
        + _enc(features_len)
        + b"\x0a"
        + _enc(ids_entry_len)
        + _INPUT_IDS_KEY
        + _enc(ids_feature_len)
        + b"\x1a"
        + _enc(int64_list_len)
        + b"\x0a"
        + _enc(packed_len)
    )


def example_suffix(length: int) -> bytes:
    """Everything of a serialized Example after its ``input_ids``: the ``length`` feature entry."""
    len_feature = _int64_feature((length,))
    len_entry = _LENGTH_KEY + _enc(len(len_feature)) + len_feature
    return b"\x0a" + _enc(len(len_entry)) + len_entry


# --- the data fingerprint ---------------------------------------------------------------

FINGERPRINT_METHOD = (
    "sha256 over the lines 'shard name<TAB>sha256 of its records' of every train/validation shard, "
    "sorted by name; a shard's sha256 runs over its serialized tf.train.Example records concatenated "
    "in file order (self-delimiting protos; independent of gzip and TFRecord framing)"
)


def shard_digest(examples: Iterable[bytes]) -> str:
    """The sha256 of one shard's serialized examples concatenated in file order (see :data:`FINGERPRINT_METHOD`)."""
    digest = hashlib.sha256()
    for data in examples:
        digest.update(data)
    return digest.hexdigest()


def data_fingerprint(shard_digests: Mapping[str, str]) -> str:
    """The fingerprint of a shard set (``info.json``'s ``data_fingerprint``; :data:`FINGERPRINT_METHOD`).

    Args:
        shard_digests: ``{shard file name: its shard_digest}`` of every train and validation shard.

    Returns:
        A sha256 hex digest: equal for equal examples in equally named shards, whatever wrote them.
    """
    lines = sorted(f"{name}\t{digest}\n" for name, digest in shard_digests.items())
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
