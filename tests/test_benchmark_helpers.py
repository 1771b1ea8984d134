"""What the benchmarks build their inputs with: synthetic batches shaped like the shards', shards fingerprinted as the pipeline does."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, make_sentences

from kogpt2 import outputs, records
from kogpt2.dataset import IGNORE_ID, open_shards
from kogpt2.tf_setup import import_tf


@pytest.fixture(scope="module")
def bench_train() -> ModuleType:
    """benchmarks/train.py, imported as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


def fingerprint_of(folder: Path) -> str:
    """The data fingerprint of a shard folder, recomputed from its files by the definition (kogpt2.records)."""
    tf = import_tf()
    shards = open_shards(str(folder))
    digests = {
        Path(path).name: records.shard_digest(r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP"))
        for split in records.SPLITS
        for path in shards.files(split)
    }
    return records.data_fingerprint(digests)


def test_synthetic_dataset_matches_the_shard_batches(bench_train: ModuleType) -> None:
    x, y = next(iter(bench_train.synthetic_dataset(400, 32, 8, real_fraction=0.5)))
    assert x.shape == y.shape == (8, 31)
    assert int(np.sum(y.numpy() != IGNORE_ID)) == 8 * 15
    assert x.numpy().max() < 400


def test_benchmark_and_test_shards_carry_the_pipelines_fingerprint(
    bench_train: ModuleType, tmp_path: Path, tiny_tokenizer, tiny_shards: Path
) -> None:
    folder = bench_train.write_shards(tmp_path / "bench", tiny_tokenizer, make_sentences(40), 16, packing=True)
    info = outputs.open_committed(str(folder)).read_json("info.json")
    assert info["data_fingerprint"] == fingerprint_of(folder)
    assert open_shards(str(tiny_shards)).data_fingerprint == fingerprint_of(tiny_shards)  # conftest's shards too


@pytest.fixture(scope="module")
def bench_steal() -> ModuleType:
    """benchmarks/steal.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("bench_steal", REPO / "benchmarks" / "steal.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quiet_rounds_drop_a_round_either_side_of_which_lost_time_to_the_hypervisor(bench_steal) -> None:
    """The benchmark's quiet figure keeps only rounds where neither our run nor its ceiling pass lost
    more than the limit; rounds of unknown steal are never called quiet."""
    ratios = [0.61, 0.74, 0.80, 0.78, 0.90]
    steal = [(0.20, 0.0), (0.005, 0.002), (0.0, 0.0), (0.0, 0.03), (None, 0.0)]
    assert bench_steal.quiet_figures(ratios, steal, 0.01) == {"quiet_rounds": 2, "vs_adjacent_ceiling_quiet": 0.77}
    assert bench_steal.quiet_figures(ratios, steal, 0.0) == {"quiet_rounds": 1, "vs_adjacent_ceiling_quiet": 0.8}
    assert bench_steal.quiet_figures(ratios[:1], steal[:1], 0.01) == {
        "quiet_rounds": 0,
        "vs_adjacent_ceiling_quiet": None,
    }


def test_steal_is_a_share_of_the_machines_cpu_time_and_unknown_off_linux(bench_steal, monkeypatch) -> None:
    stolen = iter([100.0, 101.0])  # one CPU-second stolen
    clock = itertools.count(0.0, 2.0)  # in two seconds of wall time
    monkeypatch.setattr(bench_steal, "stolen_seconds", lambda: next(stolen))
    monkeypatch.setattr(bench_steal, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(bench_steal, "os", SimpleNamespace(cpu_count=lambda: 2))
    assert bench_steal.with_steal(lambda: "done") == ("done", 0.25)
    monkeypatch.setattr(bench_steal, "stolen_seconds", lambda: None)
    assert bench_steal.with_steal(lambda: 7) == (7, None)
    assert bench_steal.pct(0.0561) == "5.6%" and bench_steal.pct(None) == "?"
