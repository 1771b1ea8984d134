"""pipelines.shards.writer: gzip TFRecord files written without TensorFlow, byte-identical to tf.io.TFRecordWriter's."""

from __future__ import annotations

import hashlib

from kogpt2.records import pad, serialize_example
from pipelines.shards import writer
from pipelines.shards.framing import tfrecord_frames
from pipelines.shards.writer import frames_of, write_tfrecord

BOS, EOS, PAD = 0, 1, 3


def test_tfrecord_gzip_file_is_byte_identical_to_tensorflows(tmp_path, monkeypatch) -> None:
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    examples = [serialize_example(*pad([BOS, *range(i % 300, i % 300 + i % 9), EOS], 12, PAD)) for i in range(5000)]
    expected = tmp_path / "tf.tfrecord.gz"
    with tf.io.TFRecordWriter(str(expected), options=tf.io.TFRecordOptions(compression_type="GZIP")) as tf_writer:
        for data in examples:
            tf_writer.write(data)
    ours = tmp_path / "ours.tfrecord.gz"
    framed = tfrecord_frames(examples)
    result = write_tfrecord(str(ours), [frames_of(framed[i : i + 777]) for i in range(0, len(framed), 777)])
    assert ours.read_bytes() == expected.read_bytes()
    assert result == {"examples": 5000, "sha256": hashlib.sha256(b"".join(examples)).hexdigest()}
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(ours), compression_type="GZIP")]
    assert read == examples
    # a file of many blocks (compressed on threads): the same bytes however it is written, read by TensorFlow
    import gzip

    monkeypatch.setattr(writer, "GZIP_BLOCK", 10_000)
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
