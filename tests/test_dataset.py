"""tf.data input over preprocessing shards: contract checks, labels by shift, seeded shuffling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sentences, write_test_shards

from kogpt2.dataset import (
    IGNORE_ID,
    ShardError,
    TokenizerMismatchError,
    check_tokenizer,
    make_dataset,
    open_shards,
    shift_targets,
)
from kogpt2.tf_setup import import_tf


def _rows(ds) -> list[tuple[list[int], list[int]]]:
    return [(list(x), list(y)) for xb, yb in ds for x, y in zip(xb.numpy(), yb.numpy(), strict=True)]


def test_shift_targets_masks_padding() -> None:
    ids = np.array([[0, 7, 8, 1, 3, 3], [0, 9, 9, 9, 9, 1]])
    inputs, targets = shift_targets(ids, np.array([4, 6]))
    assert inputs.numpy().tolist() == [[0, 7, 8, 1, 3], [0, 9, 9, 9, 9]]
    assert targets.numpy().tolist() == [[7, 8, 1, IGNORE_ID, IGNORE_ID], [9, 9, 9, 9, 1]]


def test_validation_split_reads_back_the_tokenized_texts(tiny_shards: Path, tiny_tokenizer) -> None:
    shards = open_shards(str(tiny_shards))
    assert shards.max_len == 32 and not shards.packing and len(shards.files("validation")) == 2
    rows = _rows(make_dataset(shards, "validation", 5))
    assert len(rows) == shards.num_examples("validation") == 16
    expected = []
    for text in make_sentences(64)[48:]:
        seq = [tiny_tokenizer.bos_id, *tiny_tokenizer.encode(text), tiny_tokenizer.eos_id][:32]
        ids = seq + [tiny_tokenizer.pad_id] * (32 - len(seq))
        expected.append((ids[:-1], seq[1:] + [IGNORE_ID] * (32 - len(seq))))
    key = lambda r: r[0]  # noqa: E731
    assert sorted(rows, key=key) == sorted(expected, key=key)
    assert all(x[0] == tiny_tokenizer.bos_id for x, _ in rows)


def test_training_order_is_seeded_per_epoch_and_resumable(tiny_shards: Path) -> None:
    shards = open_shards(str(tiny_shards))
    steps = shards.steps("train", 16)
    full = _rows(make_dataset(shards, "train", 16, training=True, seed=3, epochs=3))
    again = _rows(make_dataset(shards, "train", 16, training=True, seed=3, epochs=3))
    other = _rows(make_dataset(shards, "train", 16, training=True, seed=4, epochs=3))
    resumed = _rows(make_dataset(shards, "train", 16, training=True, seed=3, first_epoch=2, epochs=3))
    n = shards.num_examples("train")
    assert steps == 3 and len(full) == 3 * n
    epochs = [full[i * n : (i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch sees every example once
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert full == again and full != other
    assert resumed == epochs[2]  # a resumed run sees the order of an uninterrupted one
    tf = import_tf()
    tf.random.set_seed(0)  # TensorFlow's global seed plays no part in the order
    assert _rows(make_dataset(shards, "train", 16, training=True, seed=3, epochs=3)) == full


def test_uncached_pipeline_gives_the_same_examples(tiny_shards: Path) -> None:
    shards = open_shards(str(tiny_shards))
    cached = _rows(make_dataset(shards, "train", 8, training=True, seed=1, cache=True))
    streamed = _rows(make_dataset(shards, "train", 8, training=True, seed=1, cache=False))
    assert sorted(cached) == sorted(streamed) and len(streamed) == 48


def test_packed_shards_are_full_blocks(tmp_path: Path, tiny_tokenizer) -> None:
    texts = make_sentences(12)
    folder = write_test_shards(tmp_path, tiny_tokenizer, texts[:10], texts[10:], max_len=16, packing=True)
    rows = _rows(make_dataset(open_shards(str(folder)), "train", 4))
    stream = [t for s in texts[:10] for t in [tiny_tokenizer.bos_id, *tiny_tokenizer.encode(s), tiny_tokenizer.eos_id]]
    ignored = [sum(t == IGNORE_ID for t in y) for _, y in rows]
    assert ignored[:-1] == [0] * (len(rows) - 1)  # only the last block is padded
    rebuilt = [t for x, y in rows for t in [x[0], *[v for v in y if v != IGNORE_ID]]]
    assert rebuilt == stream


def test_missing_completed_marker_is_refused(tmp_path: Path, tiny_tokenizer) -> None:
    folder = write_test_shards(tmp_path, tiny_tokenizer, ["가나다"], ["라마바"], completed=False)
    with pytest.raises(ShardError, match="no committed version"):
        open_shards(str(folder))
    with pytest.raises(ShardError, match="no such output folder"):
        open_shards(str(tmp_path / "nowhere"))


def test_malformed_info_and_missing_shard_are_refused(tmp_path: Path, tiny_shards: Path) -> None:
    from kogpt2 import outputs

    folder = tmp_path / "copy"
    shutil.copytree(tiny_shards, folder)
    root = Path(outputs.open_committed(str(folder)).root)
    info = json.loads((root / "info.json").read_text())
    shard = root / info["shards"]["train"][0]
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(ShardError, match="is missing"):
        open_shards(str(folder))
    shard.write_bytes(data[:-1])
    with pytest.raises(ShardError, match="bytes, the manifest says"):
        open_shards(str(folder))
    shard.write_bytes(data)
    (root / "info.json").write_text(json.dumps({**info, "max_len": 99}))  # edited after the commit
    with pytest.raises(ShardError, match="does not match"):
        open_shards(str(folder))
    # a version committed with an info.json that breaks the schema
    del info["max_len"]
    lease = outputs.Lease(str(folder), "preprocess").acquire()
    claim = outputs.begin(str(folder), "preprocess", {"bad": True}, lease, overwrite=True)
    (Path(claim.work) / "info.json").write_text(json.dumps(info))
    outputs.commit(claim, ["info.json"])
    lease.release()
    with pytest.raises(ShardError, match="max_len"):
        open_shards(str(folder))


def test_several_span_folders_train_as_one_and_odd_ones_are_named(tmp_path: Path, tiny_tokenizer) -> None:
    texts = make_sentences(40)
    a = write_test_shards(tmp_path / "span-1", tiny_tokenizer, texts[:10], texts[10:14], max_len=16)
    b = write_test_shards(tmp_path / "span-2", tiny_tokenizer, texts[14:30], texts[30:34], max_len=16)
    both = open_shards(str(tmp_path / "span-*"))
    assert both.num_examples("train") == 26 and both.num_examples("validation") == 8
    assert both.files("train") == open_shards(str(a)).files("train") + open_shards(str(b)).files("train")
    assert both.data_fingerprint not in (open_shards(str(a)).data_fingerprint, open_shards(str(b)).data_fingerprint)
    rows = _rows(make_dataset(both, "train", 4))
    assert len(rows) == 26
    write_test_shards(tmp_path / "span-3", tiny_tokenizer, texts[34:38], texts[38:], max_len=24)
    with pytest.raises(ShardError, match=r"span-3: max_len 24, but .*span-1 has 16"):
        open_shards([str(tmp_path / "span-*")])
    with pytest.raises(ShardError, match="matches no folder"):
        open_shards(str(tmp_path / "nothing-*"))


def test_tokenizer_mismatch_names_both_sides(tmp_path: Path, tiny_tokenizer, tiny_shards: Path) -> None:
    check_tokenizer(open_shards(str(tiny_shards)), tiny_tokenizer, model_vocab_size=tiny_tokenizer.vocab_size)
    other = write_test_shards(
        tmp_path,
        tiny_tokenizer,
        ["가나다"],
        ["라마바"],
        tokenizer_overrides={"fingerprint": "f" * 64, "vocab_size": 50000},
    )
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizer(open_shards(str(other)), tiny_tokenizer, model="my-model")
    msg = str(err.value)
    assert "ffffffffffffffff" in msg and tiny_tokenizer.fingerprint[:16] in msg
    assert "50000" in msg and str(tiny_tokenizer.vocab_size) in msg and "my-model" in msg


def test_worker_shares_cover_each_example_once_in_equal_steps(tmp_path: Path, tiny_tokenizer) -> None:
    from kogpt2.distribute import Worker, plan_input

    texts = make_sentences(45)
    folder = write_test_shards(tmp_path / "s", tiny_tokenizer, texts[:37], texts[37:], max_len=32, num_shards=3)
    shards = open_shards(str(folder))
    full = sorted(x for x, _ in _rows(make_dataset(shards, "train", 8, training=True, seed=5)))
    for count, by in ((2, "file"), (4, "data")):  # 3 files: enough for 2 workers, not for 4
        plans = [plan_input(shards, "train", 8 * count, Worker(count, i, i == 0, 1)) for i in range(count)]
        assert {p.shard_by for p in plans} == {by} and len({p.steps for p in plans}) == 1
        rows, per_worker = [], []
        for i, plan in enumerate(plans):
            ds = make_dataset(shards, "train", plan.per_replica_batch, training=True, seed=5, shard=(count, i),
                              shard_by=plan.shard_by, pad_to_batches=plan.batches_per_worker)  # fmt: skip
            batches = list(ds)
            per_worker.append(len(batches))
            rows += [(list(x), list(y)) for xb, yb in batches for x, y in zip(xb.numpy(), yb.numpy(), strict=True)
                     if (y != IGNORE_ID).any()]  # fmt: skip
        assert per_worker == [plans[0].steps] * count  # padded with empty batches: no worker runs out early
        assert sorted(x for x, _ in rows) == full  # every example once
    with pytest.raises(ValueError, match="--batch-size 10: must be a multiple of the 4 replicas"):
        plan_input(shards, "train", 10, Worker(4, 0, True, 1))
