"""Pure token and record functions: frame, fit, pad, pack, split, serialize."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from kogpt2.records import (
    assign_shard,
    assign_split,
    fit,
    fit_batch,
    flatten,
    frame,
    frame_flat,
    masked_crc32c,
    pack,
    pack_array,
    packing_efficiency,
    pad,
    parse_example,
    serialize_example,
    shard_name,
    split_masks,
    stable_hash,
    stable_hashes,
    tfrecord_examples,
    tfrecord_frame,
    tfrecord_frames,
    truncate,
    truncate_flat,
    unflatten,
    windows,
)
from kogpt2.schemas import load_schema

BOS, EOS, PAD = 0, 1, 3


def test_frame() -> None:
    assert frame([7, 8], BOS, EOS) == [BOS, 7, 8, EOS]
    assert frame([], BOS, EOS) == [BOS, EOS]


def test_truncate_keeps_the_front_and_bos() -> None:
    seq = frame(list(range(10, 50)), BOS, EOS)
    cut = truncate(seq, 30)
    assert cut == seq[:30]
    assert cut[0] == BOS and len(cut) == 30


def test_fit_truncate_and_window() -> None:
    seq = frame([10, 11, 12, 13, 14, 15, 16], BOS, EOS)  # 9 tokens
    assert fit(seq, 9) == [seq]
    assert fit(seq, 4) == [[BOS, 10, 11, 12]]
    assert fit(seq, 4, "window") == [[BOS, 10, 11, 12], [13, 14, 15, 16]]  # a lone </s> window is dropped
    assert fit(seq, 5, "window") == [[BOS, 10, 11, 12, 13], [14, 15, 16, EOS]]
    with pytest.raises(ValueError, match="overflow"):
        fit(seq, 4, "wrap")


def test_windows_cover_the_sequence_in_order() -> None:
    for n in (20, 21, 22, 23):  # framed: 22 .. 25 tokens
        seq = frame(list(range(100, 100 + n)), BOS, EOS)
        pieces = windows(seq, 6)
        assert all(2 <= len(p) <= 6 for p in pieces) and pieces[0][0] == BOS
        stream = [t for p in pieces for t in p]
        assert stream == (seq if len(seq) % 6 != 1 else seq[:-1])  # only a lone trailing </s> is dropped


def test_pad_records_length() -> None:
    assert pad([BOS, 9, EOS], 5, PAD) == ([BOS, 9, EOS, PAD, PAD], 3)
    assert pad([BOS, 9, EOS], 3, PAD) == ([BOS, 9, EOS], 3)
    with pytest.raises(ValueError, match="max_len=2"):
        pad([BOS, 9, EOS], 2, PAD)


def test_pack_fills_blocks_and_pads_only_the_last() -> None:
    seqs = [frame([10] * n, BOS, EOS) for n in (3, 8, 1, 5)]  # 5 + 10 + 3 + 7 = 25 tokens
    blocks = list(pack(seqs, 8, PAD))
    assert [length for _, length in blocks] == [8, 8, 8, 1]
    assert all(len(ids) == 8 for ids, _ in blocks)
    assert blocks[-1][0] == [EOS] + [PAD] * 7
    stream = [t for ids, length in blocks for t in ids[:length]]
    assert stream == [t for s in seqs for t in s]  # nothing lost, order kept
    assert packing_efficiency(25, len(blocks), 8) == 25 / 32
    assert packing_efficiency(0, 0, 8) is None
    assert list(pack([], 8, PAD)) == []


def test_stable_hash_is_fixed_across_runs_and_machines() -> None:
    assert stable_hash("그는 웃었다.") == hashlib.blake2b("그는 웃었다.".encode(), digest_size=16).digest()
    assert stable_hash("그는 웃었다.").hex() == "192ad431d657eb01c18a0af67c47eaad"
    assert stable_hash("그는 웃었다.") != stable_hash("그는 웃었다")


def test_assign_split_share_and_consistency() -> None:
    digests = [stable_hash(f"문장 {i}") for i in range(20000)]
    share = sum(assign_split(d, 0.1) == "validation" for d in digests) / len(digests)
    assert 0.09 < share < 0.11
    assert {assign_split(d, 0.0) for d in digests} == {"train"}
    assert assign_split(digests[0], 0.3) == assign_split(stable_hash("문장 0"), 0.3)


def test_assign_shard_is_uniform_and_in_range() -> None:
    counts = [0] * 4
    for i in range(8000):
        counts[assign_shard(stable_hash(str(i)), 4)] += 1
    assert all(1800 < c < 2200 for c in counts)


def test_shard_name_follows_the_schema_pattern() -> None:
    assert shard_name("train", 3, 12) == "train-00003-of-00012.tfrecord.gz"
    pattern = load_schema("tfrecord_example")["file_pattern"]
    assert re.fullmatch(r"\{split\}-\{shard:05d\}-of-\{num_shards:05d\}\.tfrecord\.gz", pattern)


@pytest.mark.parametrize(
    "ids",
    [[BOS, 5, 300, 49999, EOS, PAD, PAD], [BOS, EOS], [], [2**40, 2**63 - 1, -1, -(2**63)], list(range(70000, 70030))],
)
def test_serialize_example_round_trip(ids: list[int]) -> None:
    data = serialize_example(ids, len(ids))
    assert parse_example(data) == {"input_ids": ids, "length": [len(ids)]}


def test_serialize_example_matches_tensorflow() -> None:
    from kogpt2.schemas import tf_feature_spec
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    for ids in ([BOS, 5, 300, 49999, EOS, PAD, PAD], [BOS] + list(range(127, 140)) + [EOS], [-5, 2**62, 0]):
        feature = {
            "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
            "length": tf.train.Feature(int64_list=tf.train.Int64List(value=[4])),
        }
        expected = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)
        assert serialize_example(ids, 4) == expected
    parsed = tf.io.parse_single_example(serialize_example([BOS, 9, EOS, PAD], 3), tf_feature_spec(4))
    assert parsed["input_ids"].numpy().tolist() == [BOS, 9, EOS, PAD]
    assert int(parsed["length"]) == 3


# --- batches (numpy) and TFRecord framing --------------------------------------------------


def test_flat_frame_and_truncate() -> None:
    flat, lengths = flatten([[7, 8], [], [9, 10, 11, 12]])
    assert flat.tolist() == [7, 8, 9, 10, 11, 12] and lengths.tolist() == [2, 0, 4]
    framed, framed_lengths = frame_flat(flat, lengths, BOS, EOS)
    assert unflatten(framed, framed_lengths) == [[BOS, 7, 8, EOS], [BOS, EOS], [BOS, 9, 10, 11, 12, EOS]]
    cut, cut_lengths = truncate_flat(framed, framed_lengths, 3)
    assert unflatten(cut, cut_lengths) == [[BOS, 7, 8], [BOS, EOS], [BOS, 9, 10]]
    assert fit_batch([[1, 2, 3, 4, 5], [6]], 2, "window") == ([0, 0, 1], [[1, 2], [3, 4], [6]])


@pytest.mark.parametrize("top", [100, 50_000, 2**21 + 5, 2**34 + 3, 2**40])
def test_tfrecord_examples_are_the_one_at_a_time_bytes(top: int) -> None:
    seqs = [[BOS, EOS], [BOS, 5, top - 1, EOS], [BOS] + list(range(top - 6, top)) + [EOS], [top // 2] * 8]
    flat, lengths = flatten(seqs)
    expected = [tfrecord_frame(serialize_example(*pad(seq, 8, PAD))) for seq in seqs]
    assert tfrecord_examples(flat, lengths, 8, PAD) == expected
    assert tfrecord_frames([serialize_example(*pad(seq, 8, PAD)) for seq in seqs]) == expected
    with pytest.raises(ValueError, match="max_len=7"):
        tfrecord_examples(flat, lengths, 7, PAD)


def test_tfrecord_example_batch_is_the_same_in_any_chunks(monkeypatch) -> None:
    """Big batches are laid out in chunks of rows; every chunking, length and id width gives the same bytes."""
    from kogpt2 import records

    rng = np.random.default_rng(7)
    seqs = [[BOS, *rng.integers(0, 60_000, int(rng.integers(0, 15))).tolist(), EOS] for _ in range(500)]
    flat, lengths = flatten(seqs)
    expected = [tfrecord_frame(serialize_example(*pad(seq, 17, PAD))) for seq in seqs]
    for slots in (17, 17 * 3, 1 << 18):
        monkeypatch.setattr(records, "_TABLE_SLOTS", slots)
        data, sizes = records.tfrecord_example_batch(flat, lengths, 17, PAD)
        assert sizes.tolist() == [len(e) for e in expected]
        assert data.tobytes() == b"".join(expected)
    assert records.tfrecord_example_batch(flat[:0], lengths[:0], 17, PAD)[1].tolist() == []


def test_split_masks_agree_with_assign_split_and_shard() -> None:
    digests = [stable_hash(f"문장 {i}") for i in range(3000)]
    for fraction, shards in ((0.0, (1, 1)), (0.1, (3, 1)), (0.5, (4, 7))):
        splits, indices = split_masks(digests, fraction, shards)
        assert splits == [int(assign_split(d, fraction) == "validation") for d in digests]
        assert indices == [assign_shard(d, shards[v]) for d, v in zip(digests, splits, strict=True)]


def test_pack_array_gives_the_full_blocks_of_pack() -> None:
    import numpy as np

    blocks, rest = pack_array(np.arange(11), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and rest.tolist() == [8, 9, 10]


def test_masked_crc32c_known_value() -> None:
    # TFRecord's masked CRC32C of b"" and of the 8-byte length 0 (TensorFlow's own test values)
    assert masked_crc32c(b"") == 0xA282EAD8
    assert tfrecord_frame(b"")[:12].hex() == "0000000000000000" + masked_crc32c(bytes(8)).to_bytes(4, "little").hex()


def test_tfrecord_gzip_file_is_byte_identical_to_tensorflows(tmp_path, monkeypatch) -> None:
    from kogpt2.tf_setup import import_tf
    from pipelines.sorted_shards import frames_of, write_tfrecord

    tf = import_tf()
    examples = [serialize_example(*pad([BOS, *range(i % 300, i % 300 + i % 9), EOS], 12, PAD)) for i in range(5000)]
    expected = tmp_path / "tf.tfrecord.gz"
    with tf.io.TFRecordWriter(str(expected), options=tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        for data in examples:
            writer.write(data)
    ours = tmp_path / "ours.tfrecord.gz"
    framed = tfrecord_frames(examples)
    result = write_tfrecord(str(ours), [frames_of(framed[i : i + 777]) for i in range(0, len(framed), 777)])
    assert ours.read_bytes() == expected.read_bytes()
    assert result == {"examples": 5000, "sha256": hashlib.sha256(b"".join(examples)).hexdigest()}
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(ours), compression_type="GZIP")]
    assert read == examples
    # a file of many blocks (compressed on threads): the same bytes however it is written, read by TensorFlow
    import gzip

    from pipelines import sorted_shards

    monkeypatch.setattr(sorted_shards, "GZIP_BLOCK", 10_000)
    many = [tmp_path / f"many-{size}.tfrecord.gz" for size in (1, 333, 5000)]
    for path, size in zip(many, (1, 333, 5000), strict=True):
        write_tfrecord(str(path), [frames_of(framed[i : i + size]) for i in range(0, len(framed), size)])
    assert many[0].read_bytes() == many[1].read_bytes() == many[2].read_bytes() != expected.read_bytes()
    assert gzip.decompress(many[0].read_bytes()) == gzip.decompress(expected.read_bytes()) == b"".join(framed)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(many[0]), compression_type="GZIP")] == examples
    empty = tmp_path / "empty.tfrecord.gz"
    with tf.io.TFRecordWriter(str(empty), options=tf.io.TFRecordOptions(compression_type="GZIP")):
        pass
    assert write_tfrecord(str(tmp_path / "e.gz"), [])["examples"] == 0
    assert (tmp_path / "e.gz").read_bytes() == empty.read_bytes()


def test_stable_hashes() -> None:
    assert stable_hashes(["그는 웃었다.", ""]) == [stable_hash("그는 웃었다."), stable_hash("")]
