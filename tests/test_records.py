"""Pure token and record functions: frame, fit, pad, pack, split, serialize."""

from __future__ import annotations

import hashlib
import re

import pytest

from kogpt2.records import (
    assign_shard,
    assign_split,
    fit,
    frame,
    pack,
    packing_efficiency,
    pad,
    parse_example,
    serialize_example,
    shard_name,
    stable_hash,
    stable_hashes,
    truncate,
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


def test_stable_hashes() -> None:
    assert stable_hashes(["그는 웃었다.", ""]) == [stable_hash("그는 웃었다."), stable_hash("")]


def test_example_prefix_and_suffix_frame_the_packed_ids() -> None:
    """What the batch framer writes around the ids it lays out itself is serialize_example's bytes."""
    from kogpt2.protowire import varint
    from kogpt2.records import example_prefix, example_suffix

    for ids, length in (([BOS, 9, EOS, PAD], 3), ([BOS, *range(100, 300), EOS], 202), ([2**40, 7], 2)):
        packed = b"".join(varint(i) for i in ids)
        suffix = example_suffix(length)
        assert example_prefix(len(packed), len(suffix)) + packed + suffix == serialize_example(ids, length)


def test_data_fingerprint_is_over_sorted_shard_digests() -> None:
    from kogpt2.records import data_fingerprint, shard_digest

    examples = [serialize_example(*pad([BOS, i, EOS], 5, PAD)) for i in range(10)]
    digest = shard_digest(examples)
    assert digest == hashlib.sha256(b"".join(examples)).hexdigest()
    two = {"train-00000-of-00001.tfrecord.gz": digest, "validation-00000-of-00001.tfrecord.gz": shard_digest([])}
    expected = "".join(f"{name}\t{d}\n" for name, d in sorted(two.items()))
    assert data_fingerprint(two) == hashlib.sha256(expected.encode()).hexdigest()
    assert data_fingerprint(dict(reversed(two.items()))) == data_fingerprint(two)  # order-free
    assert data_fingerprint(
        {**two, "train-00000-of-00001.tfrecord.gz": shard_digest(examples[1:])}
    ) != data_fingerprint(two)
