"""pipelines.shards.spill: sorted runs spilled by workers, merged in order in bounded memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.shards import spill
from pipelines.shards.runs import KEY_LEN, batch_from_records, run_record


@pytest.mark.parametrize("block", [30, 200, 1 << 20])
def test_merge_blocks_merges_sorted_runs_in_order(tmp_path: Path, monkeypatch, block: int) -> None:
    import random

    monkeypatch.setattr(spill, "READ_BLOCK", block)
    monkeypatch.setattr(spill, "RUN_BLOCK", block)
    rng = random.Random(block)
    keys = [bytes(rng.randrange(4) for _ in range(KEY_LEN)) for _ in range(400)]  # many ties
    recs = [run_record(k, bytes(rng.randrange(2) for _ in range(rng.randrange(5)))) for k in keys]
    recs += recs[:40]  # equal records, in different runs
    prefix = str(tmp_path / "_spill-t-")
    refs = [spill.write_run(prefix, [batch_from_records(sorted(recs[r::5]))]) for r in range(5)]
    merged = [rec for batch in spill.merge_blocks(refs) for rec in batch.records()]
    assert merged == sorted(recs)
    merged = [rec for batch in spill.merge_runs(refs, str(tmp_path / "_spill-u-")) for rec in batch.records()]
    assert merged == sorted(recs)


def test_spill_sorts_what_arrives_in_any_order(tmp_path: Path) -> None:
    """A worker's buffer is written sorted (key, size, payload) whatever order its batches came in."""
    import random

    rng = random.Random(5)
    recs = [run_record(bytes(rng.randrange(3) for _ in range(KEY_LEN)), bytes([rng.randrange(3)])) for _ in range(300)]
    spiller = spill.SpillRuns(str(tmp_path / "_spill-s-"), 1 << 30)
    spiller.start_bundle()
    for i in range(0, 300, 70):
        assert not list(spiller.process({"f": batch_from_records(recs[i : i + 70])}))
    (name, ref), *_ = [w.value for w in spiller.finish_bundle()]
    assert name == "f" and ref[3] == 300
    assert [rec for batch in spill.merge_blocks([ref]) for rec in batch.records()] == sorted(recs)


def test_merge_memory_stays_bounded_however_many_runs(tmp_path: Path, monkeypatch) -> None:
    """Many runs share the merge's budget: the records held (and each batch yielded) do not grow with the runs."""
    import random

    budget = 8192
    monkeypatch.setattr(spill, "READ_BLOCK", 4096)
    monkeypatch.setattr(spill, "RUN_BLOCK", 64)
    monkeypatch.setattr(spill, "MERGE_BUDGET", budget, raising=False)
    monkeypatch.setattr(spill, "MIN_READ_BLOCK", 64, raising=False)
    rng = random.Random(7)
    runs = 40
    recs = [
        run_record(bytes(rng.randrange(256) for _ in range(KEY_LEN)), b"y" * rng.randrange(41))
        for _ in range(runs * 150)
    ]
    prefix = str(tmp_path / "_spill-t-")
    refs = [spill.write_run(prefix, [batch_from_records(sorted(recs[r::runs]))]) for r in range(runs)]
    assert min(ref[2] for ref in refs) > 4096  # every run is larger than a full read block
    batches = list(spill.merge_blocks(refs))
    assert [rec for batch in batches for rec in batch.records()] == sorted(recs)
    longest = max(map(len, recs))
    # each run holds at most its share of the budget plus one block cut by a read
    assert max(batch.nbytes for batch in batches) <= budget + runs * (longest + 64)
    # merged in rounds of 3 runs at a time: the same records in the same order
    monkeypatch.setattr(spill, "MAX_FANIN", 3)
    merged = [rec for batch in spill.merge_runs(refs, str(tmp_path / "_spill-u-")) for rec in batch.records()]
    assert merged == sorted(recs)
