"""pipelines.shards.framing: examples a batch at a time (numpy), byte for byte as kogpt2.records does them one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from kogpt2.records import assign_shard, assign_split, pad, serialize_example, stable_hash
from pipelines.shards import framing, runs
from pipelines.shards.framing import (
    fit_batch,
    flatten,
    frame_flat,
    masked_crc32c,
    pack_array,
    split_masks,
    tfrecord_frame,
    tfrecord_frames,
    truncate_flat,
    unflatten,
)

BOS, EOS, PAD = 0, 1, 3


def tfrecord_examples(flat: np.ndarray, lengths: np.ndarray, max_len: int, pad_id: int) -> list[bytes]:
    """Framed TFRecords of padded examples, one ``bytes`` per sequence (what the batch framer writes, cut apart)."""
    data, sizes = framing.tfrecord_example_batch(flat, lengths, max_len, pad_id)
    return runs.split_buffer(data.tobytes(), sizes)


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
    rng = np.random.default_rng(7)
    seqs = [[BOS, *rng.integers(0, 60_000, int(rng.integers(0, 15))).tolist(), EOS] for _ in range(500)]
    flat, lengths = flatten(seqs)
    expected = [tfrecord_frame(serialize_example(*pad(seq, 17, PAD))) for seq in seqs]
    for slots in (17, 17 * 3, 1 << 18):
        monkeypatch.setattr(framing, "_TABLE_SLOTS", slots)
        data, sizes = framing.tfrecord_example_batch(flat, lengths, 17, PAD)
        assert sizes.tolist() == [len(e) for e in expected]
        assert data.tobytes() == b"".join(expected)
    assert framing.tfrecord_example_batch(flat[:0], lengths[:0], 17, PAD)[1].tolist() == []


def test_split_masks_agree_with_assign_split_and_shard() -> None:
    digests = [stable_hash(f"문장 {i}") for i in range(3000)]
    for fraction, shards in ((0.0, (1, 1)), (0.1, (3, 1)), (0.5, (4, 7))):
        splits, indices = split_masks(digests, fraction, shards)
        assert splits == [int(assign_split(d, fraction) == "validation") for d in digests]
        assert indices == [assign_shard(d, shards[v]) for d, v in zip(digests, splits, strict=True)]


def test_pack_array_gives_the_full_blocks_of_pack() -> None:
    blocks, rest = pack_array(np.arange(11), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and rest.tolist() == [8, 9, 10]


def test_masked_crc32c_known_value() -> None:
    # TFRecord's masked CRC32C of b"" and of the 8-byte length 0 (TensorFlow's own test values)
    assert masked_crc32c(b"") == 0xA282EAD8
    assert tfrecord_frame(b"")[:12].hex() == "0000000000000000" + masked_crc32c(bytes(8)).to_bytes(4, "little").hex()
