"""The shard engine: lines of raw text in, byte-identical gzip TFRecord shards out, in flat memory, no TensorFlow.

What preprocessing (:mod:`pipelines.preprocess`) runs between reading its inputs and committing
its shards:

- :mod:`~pipelines.shards.textio`: files cut into byte ranges (compressed files into parts) and
  read as lines of bytes; dead letters of lines and files; ``rejected-*.jsonl``.
- :mod:`~pipelines.shards.framing`: examples a batch at a time (numpy): fit, pad, serialize and
  frame as TFRecords, byte for byte as :mod:`kogpt2.records` does it one example at a time.
- :mod:`~pipelines.shards.runs`: run records (a fixed-length sort key and a payload) as numpy
  columns, and their blocks on disk.
- :mod:`~pipelines.shards.spill`: each worker sorts what it holds and spills it as sorted runs;
  the runs of one output file are merged back in order.
- :mod:`~pipelines.shards.writer`: one task per output file merges its runs and writes it (a gzip
  TFRecord shard, or the rejected-lines JSONL).

Why this instead of Beam's ``GroupByKey`` of the examples and ``WriteToTFRecord``:

- **Determinism.** ``WriteToTFRecord`` (a ``FileBasedSink``) writes a shard's records in the order
  the runner hands them over, and with a fixed shard count assigns elements to shards round robin
  from a random start per bundle (``apache_beam.io.iobase._RoundRobinKeyFn``): the same input gives
  other bytes on every run. Here an example's shard follows a hash of its text
  (:func:`kogpt2.records.assign_shard`) and a shard's records are written in a total order (sort
  key, length, bytes), so a rerun, two worker processes, or runs spilled tiny and merged in several
  rounds write the same bytes (``tests/test_preprocess_outputs.py``), and ``data_fingerprint``
  changes only when the examples do.
- **Flat memory.** Only small references to sorted-run files are grouped; the examples stay on disk
  in sorted runs, and a merge holds at most :data:`~pipelines.shards.spill.MERGE_BUDGET` (4 MiB) of
  them however many runs there are. Measured (docs/BENCHMARKS.md, preprocessing, 2026-12-02): peak
  RSS 272 MiB on 356,238 reviews and 266 MiB on ten times as many lines (**0.98x**). In an earlier
  version, where a ``Flatten`` of every example came before the spill, the FnApiRunner held every
  example in memory and peak RSS grew with the corpus (commit 232827b).
- **Speed, without TensorFlow.** Framing, CRC32C (``google-crc32c``) and gzip (in blocks, on
  threads) run on whole batches, and no worker imports TensorFlow. Measured (same page): the whole
  command, one worker, at **0.40x** the lines/s of the raw floor (read, NFKC and SentencePiece's
  encode alone) against 0.16x for the project's plain single-process loop; 0.11-0.14x before the
  batched, TensorFlow-free path.

Not measured: the same job written with ``GroupByKey`` and ``WriteToTFRecord``, side by side; the
comparisons above are against the encode floor, the plain loop and this pipeline's earlier versions.
"""
