"""The output protocol (kogpt2.outputs) on a local disk: leases, versions, commits, units, status.

The same properties on Cloud Storage (through the emulator) are in tests/test_outputs_gcs.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from outputs_helpers import SIG, build

from kogpt2 import outputs
from kogpt2.outputs import (
    ALREADY_COMPLETE,
    NEW,
    RESUME,
    CommitConflictError,
    Lease,
    LockLostError,
    NotCommittedError,
    OutputConflictError,
    OutputLockedError,
    begin,
    commit,
    open_committed,
)
from kogpt2.storage import store_for


def test_a_commit_makes_a_version_readers_open_through_the_manifest(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    manifest = build(out, SIG, {"a.bin": b"hello", "sub/b.bin": b"world!"})
    assert manifest.version == 1
    done = open_committed(out, job="test", verify="full")
    assert done.root == f"{out}/{manifest.folder}"
    assert done.read("sub/b.bin") == b"world!"
    assert done.manifest.files["a.bin"].size == 5
    # the version folder alone is checkable too (its MANIFEST.json)
    assert open_committed(done.root).manifest.version == 1
    # a rerun with the same signature does nothing
    again = build(out, SIG, {"a.bin": b"other"})
    assert again.action == ALREADY_COMPLETE
    assert open_committed(out).read("a.bin") == b"hello"


def test_another_run_is_refused_naming_each_difference_and_overwrite_builds_a_new_version(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build(out, SIG, {"a.bin": b"v1"})
    with pytest.raises(OutputConflictError, match=r"max_len: 30 -> 64"):
        build(out, {**SIG, "max_len": 64}, {"a.bin": b"v2"})
    m2 = build(out, {**SIG, "max_len": 64}, {"a.bin": b"v2"}, overwrite=True)
    assert m2.version == 2 and open_committed(out).read("a.bin") == b"v2"
    assert [v["version"] for v in m2.versions] == [2, 1]


def test_the_last_good_version_stays_readable_until_a_new_one_commits(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = build(out, SIG, {"a.bin": b"good"})
    store = store_for(out)
    with Lease(out, "test") as lease:  # a rebuild that fails before its commit
        run = begin(out, "test", {**SIG, "max_len": 99}, lease, overwrite=True)
        store.write(run.path("a.bin"), b"half")
        # readers still get the good version while the new one is being written
        assert open_committed(out).read("a.bin") == b"good"
    assert open_committed(out).manifest.folder == first.folder
    assert outputs.status(out)["pending"]["work"] == os.path.basename(run.work)


def test_retention_keeps_n_versions_and_removes_abandoned_work(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    names = []
    for i in range(4):
        names.append(build(out, {**SIG, "i": i}, {"a.bin": str(i).encode()}, overwrite=True, keep=2).folder)
    with Lease(out, "test") as lease:  # abandoned: started, never committed
        abandoned = begin(out, "test", {**SIG, "i": 9}, lease, overwrite=True).work
        store_for(out).write(f"{abandoned}/x.bin", b"x")
    last = build(out, {**SIG, "i": 5}, {"a.bin": b"5"}, overwrite=True, keep=2)
    left = sorted(p.name for p in Path(out).iterdir() if p.is_dir())
    assert left == sorted([names[3], last.folder])
    assert [v["folder"] for v in last.versions] == [last.folder, names[3]]


def test_a_listing_error_never_reads_as_empty_and_deletes_nothing(tmp_path: Path, monkeypatch) -> None:
    out = str(tmp_path / "out")
    old = build(out, SIG, {"a.bin": b"1"})
    store = store_for(out)
    real_list = type(store).list_objects

    def failing_list(self, prefix):  # type: ignore[no-untyped-def]
        raise OSError("injected listing error")

    with Lease(out, "test") as lease:
        run = begin(out, "test", {**SIG, "v": 2}, lease, overwrite=True)
        store.write(run.path("a.bin"), b"2")
        monkeypatch.setattr(type(store), "list_objects", failing_list)
        with pytest.raises(OSError, match="injected"):
            commit(run, ["a.bin"])
    monkeypatch.setattr(type(store), "list_objects", real_list)
    assert open_committed(out).manifest.folder == old.folder  # nothing committed, nothing deleted
    assert (Path(out) / old.folder / "a.bin").read_bytes() == b"1"
    with pytest.raises(OSError, match="injected"):
        monkeypatch.setattr(type(store), "list_objects", failing_list)
        open_committed(out)  # a reader's listing error is an error too, never "missing files"


def test_a_commit_after_someone_else_committed_is_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build(out, SIG, {"a.bin": b"1"})
    store = store_for(out)
    lease = Lease(out, "test", lease_seconds=0.2).acquire()
    run = begin(out, "test", {**SIG, "v": "slow"}, lease, overwrite=True)
    store.write(run.path("a.bin"), b"slow")
    time.sleep(0.3)  # the slow run's lease expires; another run takes over and commits
    fast = build(out, {**SIG, "v": "fast"}, {"a.bin": b"fast"}, overwrite=True)
    with pytest.raises(LockLostError):
        commit(run, ["a.bin"])
    lease2 = Lease(out, "test").acquire()  # even with a lock, a commit on a stale base is refused
    stale = outputs.OutputRun(**{**run.__dict__, "lease": lease2.ref()})
    with pytest.raises(CommitConflictError, match="committed after this run started"):
        commit(stale, ["a.bin"])
    lease2.release()
    assert open_committed(out).manifest.folder == fast.folder


def test_a_second_run_is_refused_while_the_lease_lives_and_proceeds_after_it_expires(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = Lease(out, "job-a", lease_seconds=0.5).acquire()  # a run that then dies without releasing
    with pytest.raises(OutputLockedError, match=r"in use by job-a.*expires \d+ s from now"):
        Lease(out, "job-b").acquire()
    time.sleep(0.6)
    second = Lease(out, "job-b").acquire()
    assert second.took_over and second.took_over["job"] == "job-a"
    first.release()  # the dead run's release must not remove its successor's lock
    assert json.loads((Path(out) / ".lock").read_text())["token"] == second.token
    with pytest.raises(LockLostError):
        first.renew()
    second.release()
    assert not (Path(out) / ".lock").exists()


def _take_over(out: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        lease = Lease(out, f"racer-{os.getpid()}").acquire()
        results.put(("won", lease.token))
        time.sleep(0.5)  # hold it while the other racer looks
        lease.release()
    except OutputLockedError:
        results.put(("refused", None))


def test_two_processes_racing_for_an_expired_lock_one_wins(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    Lease(out, "dead", lease_seconds=0.1).acquire()
    time.sleep(0.2)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_take_over, args=(out, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5)[0] for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_resume_finds_the_unfinished_run_with_the_same_signature(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with Lease(out, "test") as lease:
        work = begin(out, "test", SIG, lease).work
    with Lease(out, "test") as lease:
        again = begin(out, "test", SIG, lease)
        assert (again.action, again.work) == (RESUME, work)
    with Lease(out, "test") as lease, pytest.raises(OutputConflictError, match="unfinished test run"):
        begin(out, "test", {**SIG, "max_len": 1}, lease)
    with Lease(out, "test") as lease:
        fresh = begin(out, "test", SIG, lease, overwrite=True)
        assert fresh.action == NEW and fresh.work != work


def test_files_this_protocol_did_not_write_are_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with Lease(str(out), "test") as lease, pytest.raises(OutputConflictError, match="did not write"):
        begin(str(out), "test", SIG, lease)
    build(str(out), SIG, {"a.bin": b"x"}, overwrite=True)
    assert (out / "mine.txt").read_text() == "user data"  # never deleted


def test_units_are_trusted_only_while_their_files_match(tmp_path: Path) -> None:
    work = str(tmp_path / "w")
    store = store_for(work)
    store.write(f"{work}/u1.parquet", b"rows")
    assert outputs.read_unit(work, "u1") is None
    outputs.commit_unit(work, "u1", ["u1.parquet"], {"rows": 1})
    assert outputs.read_unit(work, "u1") == {"rows": 1}
    (tmp_path / "w" / "u1.parquet").write_bytes(b"ROWS")  # same size, other content
    assert outputs.read_unit(work, "u1") is None


def test_a_damaged_file_fails_full_verification(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    m = build(out, SIG, {"a.bin": b"abcd"})
    (Path(out) / m.folder / "a.bin").write_bytes(b"abce")
    assert open_committed(out, verify="size").manifest.version == 1
    with pytest.raises(NotCommittedError, match="CRC32C"):
        open_committed(out, verify="full")
    (Path(out) / m.folder / "a.bin").write_bytes(b"abc")
    with pytest.raises(NotCommittedError, match="3 bytes"):
        open_committed(out)


def test_status_reads_without_writing(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert outputs.status(out)["complete"] is False
    build(out, SIG, {"a.bin": b"x"})
    before = sorted(p.name for p in Path(out).iterdir())
    s = outputs.status(out)
    assert s["complete"] and s["current"]["version"] == 1 and s["lock"] is None
    assert "complete, version 1" in outputs.format_status(s)
    assert sorted(p.name for p in Path(out).iterdir()) == before


def test_file_urls_are_local_paths_and_overlaps_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OutputConflictError, match="lies inside"):
        outputs.refuse_output_over_inputs(f"file://{data}/out", [str(data)])
    with pytest.raises(OutputConflictError, match="contains"):
        outputs.refuse_output_over_inputs(str(tmp_path), [f"file://{data}/x.txt"])
