"""tf.data input: preprocessing shards as ``(inputs, targets)`` batches for a causal LM.

A shard folder (written by ``pipelines/preprocess.py``) holds a committed version:
``info.json`` and gzip TFRecord shards per split, named with their sizes and checksums by the
``COMPLETED`` manifest written last (:mod:`kogpt2.outputs`). Examples hold
``input_ids`` (``max_len`` ids, right-padded with ``<pad>``) and ``length`` (real
tokens). Packed shards hold full blocks of concatenated ``<s> ... </s>`` sentences.

Labels by shift: ``inputs = ids[:-1]``, ``targets = ids[1:]``; a target whose
position is padding is :data:`IGNORE_ID`, so loss and metrics skip it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kogpt2.outputs import INFO_FILE
from kogpt2.records import SPLITS, TokenizerFacts
from kogpt2.schemas import tf_feature_spec, validate_info
from kogpt2.tf_setup import import_tf
from kogpt2.tokenizer import Tokenizer

#: Target id of padding positions: masked out of loss and metrics.
IGNORE_ID = -100
#: Shards whose raw records are estimated below this many bytes are cached in memory.
CACHE_LIMIT_BYTES = 512 << 20


class ShardError(ValueError):
    """A shard folder is missing, unfinished or malformed."""


class TokenizerMismatchError(ValueError):
    """Shards were tokenized with a different tokenizer than the model's."""


@dataclass(frozen=True)
class ShardSet:
    """The committed shards of one or more preprocessing outputs, as one data set.

    Attributes:
        folder: what was given (one output folder, or several joined by ``, ``).
        info: the ``info.json`` of the data: one folder's as written; for several, the first's
            with the counts summed, every shard listed and a combined fingerprint.
        paths: full paths of each split's shards, in order.
        roots: the committed version folders read (one per output folder).
    """

    folder: str
    info: dict[str, Any]
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    roots: tuple[str, ...] = ()

    @property
    def max_len(self) -> int:
        return int(self.info["max_len"])

    @property
    def packing(self) -> bool:
        return bool(self.info["packing"])

    @property
    def tokenizer(self) -> TokenizerFacts:
        """The facts of the tokenizer the shards were made with (``info.json``'s ``tokenizer``)."""
        return TokenizerFacts.from_json(self.info["tokenizer"])

    @property
    def data_fingerprint(self) -> str:
        return str(self.info["data_fingerprint"])

    def files(self, split: str) -> list[str]:
        """Full paths of the shards of ``split`` (``train`` or ``validation``)."""
        _check_split(split)
        return list(self.paths.get(split, ()))

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split``, from ``info.json``."""
        _check_split(split)
        return int(self.info["counts"]["examples"][split])

    def steps(self, split: str, batch_size: int, *, drop_remainder: bool = False) -> int:
        """Number of batches one pass over ``split`` yields."""
        n = self.num_examples(split)
        return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")


def open_shards(folders: str | Sequence[str]) -> ShardSet:
    """The committed shards of one or several preprocessing outputs (folders or globs of folders).

    Each folder is read through its ``COMPLETED`` manifest (:func:`kogpt2.outputs.open_committed`):
    ``info.json`` is checked against its recorded size and CRC32C, and every shard it lists must
    be a file of the committed version with its recorded size. Several folders (a daily span
    each, say) become one data set when they share the tokenizer and the example format.

    Args:
        folders: output folders of ``pipelines.preprocess`` (local, ``gs://``), or globs over
            the last path part (``gs://bucket/data/span-*``).

    Returns:
        A :class:`ShardSet`.

    Raises:
        ShardError: nothing matches; a folder with nothing committed (an unfinished or failed
            run); an ``info.json`` that does not match ``schemas/shard_info.json``; shards that
            do not match the manifest; folders that differ in tokenizer, ``max_len`` or packing
            (the odd one named).
    """
    from kogpt2 import outputs

    given = [folders] if isinstance(folders, str) else list(folders)
    try:
        names = outputs.expand_folders([str(f) for f in given], flag="--data")
    except FileNotFoundError as exc:
        raise ShardError(str(exc)) from None
    sets = [_open_one(folder) for folder in names]
    if not sets:
        raise ShardError("no shard folder given")
    if len(sets) == 1:
        return sets[0]
    first = sets[0]
    for other in sets[1:]:
        for key, what in (("tokenizer", "tokenizer"), ("max_len", "max_len"), ("packing", "packing")):
            if other.info[key] != first.info[key]:
                shown = (lambda i: i["fingerprint"][:16]) if key == "tokenizer" else (lambda v: v)
                raise ShardError(
                    f"--data {other.folder}: {what} {shown(other.info[key])}, but {first.folder} has "
                    f"{shown(first.info[key])}; shard folders trained together need the same tokenizer and "
                    "example format"
                )
    info = dict(first.info)
    counts = dict(info["counts"])
    counts["examples"] = {s: sum(x.num_examples(s) for x in sets) for s in SPLITS}
    counts["tokens"] = {s: sum(int(x.info["counts"].get("tokens", {}).get(s, 0)) for x in sets) for s in SPLITS}
    info["counts"] = counts
    info["shards"] = {s: [p for x in sets for p in x.files(s)] for s in SPLITS}
    info["data_fingerprint"] = hashlib.sha256(
        "".join(f"{x.data_fingerprint}\n" for x in sets).encode("utf-8")
    ).hexdigest()
    info["inputs"] = [i for x in sets for i in x.info.get("inputs", [])]
    return ShardSet(
        ", ".join(x.folder for x in sets),
        info,
        {s: tuple(info["shards"][s]) for s in SPLITS},
        tuple(r for x in sets for r in x.roots),
    )


def _open_one(folder: str) -> ShardSet:
    from kogpt2 import outputs

    try:
        done = outputs.open_committed(str(folder), job="preprocess")
    except outputs.NotCommittedError as exc:
        raise ShardError(f"{exc}; rerun preprocessing before training") from None
    info_path = done.path(INFO_FILE)
    try:
        info = done.read_json(INFO_FILE)
    except outputs.NotCommittedError as exc:
        raise ShardError(str(exc)) from None
    except ValueError as exc:
        raise ShardError(f"{info_path}: not valid JSON: {exc}") from None
    try:
        validate_info(info)
    except ValueError as exc:
        raise ShardError(f"{info_path}: {exc}") from exc
    paths = {}
    for split in SPLITS:
        names = list(info["shards"][split])
        if int(info["counts"]["examples"][split]) and not names:
            raise ShardError(
                f"{info_path}: counts {info['counts']['examples'][split]} {split} examples but lists no shard"
            )
        missing = [n for n in names if n not in done.manifest.files]
        if missing:
            raise ShardError(f"{info_path} lists {missing[0]}, which is not a file of the committed version")
        paths[split] = tuple(done.path(n) for n in names)
    return ShardSet(str(folder).rstrip("/"), info, paths, (done.root,))


def check_tokenizer(
    shards: ShardSet, tokenizer: Tokenizer, *, model_vocab_size: int | None = None, model: str = "model"
) -> None:
    """Refuse shards made with another tokenizer than the model's.

    Args:
        shards: the shard folder.
        tokenizer: the model's tokenizer.
        model_vocab_size: the model's embedding rows (``config.vocab_size``), if known.
        model: how to name the model in messages (its folder or preset).

    Raises:
        TokenizerMismatchError: fingerprints, vocabulary sizes or special ids differ, or
            the shards hold ids the model has no embedding for. The message names both sides.
    """
    tok = shards.tokenizer
    where = f"shards {shards.folder}"
    if tok.fingerprint != tokenizer.fingerprint or tok.vocab_size != tokenizer.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {where} were tokenized with sha256 {tok.fingerprint[:16]} "
            f"(vocab {tok.vocab_size}), but {model} uses {tokenizer.path.name} sha256 "
            f"{tokenizer.fingerprint[:16]} (vocab {tokenizer.vocab_size}); rerun preprocessing with "
            "the model's tokenizer (--tokenizer) or train with a model built on the shards' tokenizer"
        )
    for role in ("bos", "eos", "pad"):
        have, want = getattr(tok, f"{role}_id"), getattr(tokenizer, f"{role}_id")
        if have != want:
            raise TokenizerMismatchError(f"{where}: {role}_id {have}, but {model}'s tokenizer says {want}")
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise TokenizerMismatchError(
            f"{where}: vocab {tok.vocab_size} is larger than {model}'s embedding ({model_vocab_size} rows)"
        )


def shift_targets(input_ids: Any, length: Any) -> tuple[Any, Any]:
    """Labels by shift, padding masked.

    Args:
        input_ids: ``(B, T)`` integer ids, right-padded.
        length: ``(B,)`` number of real tokens per row.

    Returns:
        ``(inputs, targets)``, both ``(B, T-1)`` int32: ``inputs = ids[:, :-1]``,
        ``targets = ids[:, 1:]`` with :data:`IGNORE_ID` where the target is padding.
    """
    tf = import_tf()
    ids = tf.cast(input_ids, tf.int32)  # (B, T)
    inputs = ids[:, :-1]  # (B, T-1)
    targets = ids[:, 1:]  # (B, T-1)
    positions = tf.range(1, tf.shape(ids)[1])[tf.newaxis, :]  # (1, T-1): index of each target in ids
    real = positions < tf.cast(length, tf.int32)[:, tf.newaxis]  # (B, T-1)
    return inputs, tf.where(real, targets, tf.fill(tf.shape(targets), IGNORE_ID))


def _parse_batch(max_len: int) -> Any:
    spec = tf_feature_spec(max_len)

    def parse(serialized: Any) -> tuple[Any, Any]:
        tf = import_tf()
        ex = tf.io.parse_example(serialized, spec)  # input_ids (B, T) int64, length (B,) int64
        return shift_targets(ex["input_ids"], ex["length"])

    return parse


def _records(files: list[str], *, seed: Any = None, cycle_length: int = 8) -> Any:
    """Serialized examples of ``files``, interleaved; file order permuted by ``seed`` ((2,) int64) if given."""
    tf = import_tf()
    names = tf.constant(files)
    if seed is not None and len(files) > 1:
        names = tf.random.experimental.stateless_shuffle(names, seed=seed)
    return tf.data.Dataset.from_tensor_slices(names).interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP", buffer_size=1 << 20),
        cycle_length=max(1, min(cycle_length, len(files))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _window_shuffle(records: Any, window: int, seed: Any) -> Any:
    """Shuffle within consecutive windows of ``window`` examples, statelessly from ``seed`` ((2,) int64).

    Unlike ``Dataset.shuffle`` this takes a tensor seed without touching TensorFlow's global
    seed, so each epoch's order is a pure function of ``(seed, epoch)``. A split smaller than
    the window gets a uniform shuffle.
    """
    tf = import_tf()

    def permute(index: Any, chunk: Any) -> Any:
        window_seed = tf.stack([seed[0], seed[1] * 1_000_003 + index])  # (2,)
        return tf.random.experimental.stateless_shuffle(chunk, seed=window_seed)

    return records.batch(window).enumerate().map(permute).unbatch()


def make_dataset(
    shards: ShardSet,
    split: str,
    batch_size: int,
    *,
    training: bool = False,
    seed: int = 0,
    first_epoch: int = 0,
    epochs: int = 1,
    shuffle_buffer: int = 10_000,
    cache: bool | None = None,
    drop_remainder: bool = False,
    skip_batches: int = 0,
    shard: tuple[int, int] | None = None,
    shard_by: str = "data",
    pad_to_batches: int | None = None,
) -> Any:
    """A ``tf.data`` pipeline of ``(inputs, targets)`` batches over one split.

    Training datasets run epochs ``first_epoch .. epochs-1`` back to back; each epoch
    shuffles its file order and its examples (within windows of ``shuffle_buffer``)
    statelessly from ``(seed, epoch)``, so a resumed run sees the same order as an
    uninterrupted one, whatever TensorFlow's global seed. Each epoch ends with
    its own (possibly partial) batch: pass ``steps_per_epoch=shards.steps(...)`` to Keras.

    Args:
        shards: the shard folder.
        split: ``train`` or ``validation``.
        batch_size: examples per batch (global batch under a distribution strategy).
        training: shuffle and run several epochs; otherwise one pass in file order.
        seed: base shuffle seed.
        first_epoch: first epoch to produce (0-based), when resuming.
        epochs: epochs to produce up to (exclusive); ignored unless ``training``.
        shuffle_buffer: examples per shuffle window.
        cache: keep raw records in memory after the first pass (default: when they are
            estimated under :data:`CACHE_LIMIT_BYTES`).
        drop_remainder: drop each epoch's last partial batch (static shapes, e.g. for XLA).
        skip_batches: batches of ``first_epoch`` to leave out (already trained on before a
            mid-epoch resume); the rest of that epoch keeps its order. Training only.
        shard: ``(workers, index)``: this worker's share (multi-worker training), by
            ``shard_by``: ``file`` (files ``index::workers``) or ``data`` (after the shuffle,
            which every worker does alike, examples ``index::workers``: the workers' batches of
            a step together hold exactly the examples of one global batch).
        pad_to_batches: end every epoch with empty batches (one row, all targets
            :data:`IGNORE_ID`: no loss, no tokens) up to this many batches, so that workers with
            shares of different sizes run the same number of steps.

    Returns:
        A ``tf.data.Dataset`` of ``(inputs (B, T-1) int32, targets (B, T-1) int32)``.

    Raises:
        ShardError: the split lists no shard.
    """
    tf = import_tf()
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive")
    if skip_batches < 0 or (skip_batches and not training):
        raise ValueError(f"skip_batches={skip_batches}: must be >= 0, and only for training datasets")
    files = shards.files(split)
    if not files:
        raise ShardError(f"{shards.folder}: no {split} shards")
    workers, index = shard or (1, 0)
    if shard_by not in ("file", "data"):
        raise ValueError(f"shard_by={shard_by!r}: must be 'file' or 'data'")
    if workers > 1 and shard_by == "file":
        if len(files) < workers:
            raise ValueError(f"shard_by='file': {len(files)} {split} files for {workers} workers")
        files = files[index::workers]
    if cache is None:
        cache = shards.num_examples(split) * (shards.max_len * 3 + 32) < CACHE_LIMIT_BYTES
    parse = _parse_batch(shards.max_len)
    cached = _records(files).cache() if cache else None

    def one_epoch(epoch: Any) -> Any:
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])  # (2,): resumable order
        records = cached if cached is not None else _records(files, seed=epoch_seed if training else None)
        if training:
            records = _window_shuffle(records, shuffle_buffer, epoch_seed)
        if workers > 1 and shard_by == "data":
            records = records.shard(workers, index)
        batches = records.batch(batch_size, drop_remainder=drop_remainder)
        skipped = tf.where(tf.equal(epoch, first_epoch), tf.constant(skip_batches, tf.int64), 0)
        if skip_batches:  # before parsing: skipped batches cost only their reading
            batches = batches.skip(skipped)
        # Parse whole batches at once (vectorized), then shift.
        parsed = batches.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        if pad_to_batches is None:
            return parsed
        empty = (tf.zeros([1, shards.max_len - 1], tf.int32), tf.fill([1, shards.max_len - 1], IGNORE_ID))
        return parsed.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(pad_to_batches - skipped)

    if training:
        if epochs <= first_epoch:
            raise ValueError(f"epochs={epochs}: must be greater than first_epoch={first_epoch}")
        ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    else:
        ds = one_epoch(0)
    options = tf.data.Options()
    options.experimental_deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
