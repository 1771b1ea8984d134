"""The output protocol on Cloud Storage (gs://), against the GCS emulator that honours preconditions.

The same properties as tests/test_outputs.py on a local disk: create-if-absent and compare-and-swap
are Cloud Storage's own ``ifGenerationMatch`` preconditions here, checksums come from object
metadata, and a listing error raised by the service is an error, never "empty".
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
from outputs_helpers import SIG, build

from kogpt2 import outputs
from kogpt2.outputs import (
    ALREADY_COMPLETE,
    CommitConflictError,
    Lease,
    LockLostError,
    NotCommittedError,
    OutputLockedError,
    begin,
    commit,
    open_committed,
)
from kogpt2.storage import ABSENT, PreconditionFailed, store_for


def test_objects_are_written_only_if_absent_or_at_their_generation(gcs_bucket: str) -> None:
    store = store_for(gcs_bucket)
    path = f"{gcs_bucket}/x/obj"
    first = store.write(path, b"one", if_generation=ABSENT)
    with pytest.raises(PreconditionFailed):
        store.write(path, b"two", if_generation=ABSENT)
    second = store.write(path, b"two", if_generation=first.generation)
    with pytest.raises(PreconditionFailed):
        store.write(path, b"three", if_generation=first.generation)  # a stale generation
    with pytest.raises(PreconditionFailed):
        store.delete(path, if_generation=first.generation)
    assert store.read(path) == b"two"
    assert store.checksum(path) == (3, second.crc32c)  # CRC32C from the object's metadata
    from kogpt2.storage import crc32c_hex

    assert second.crc32c == crc32c_hex(b"two")


def test_a_version_commits_and_readers_trust_its_manifest(gcs_bucket: str, gcs_server) -> None:
    out = f"{gcs_bucket}/out"
    manifest = build(out, SIG, {"a.bin": b"hello", "sub/b.bin": b"world!"})
    gcs_server.clear_requests()
    done = open_committed(out, verify="full")
    downloads = [r for r in gcs_server.requests() if r["kind"] == "get" and r.get("name", "").endswith(".bin")]
    assert downloads == []  # sizes and CRC32C come from one listing, no file is downloaded to check it
    assert done.read("sub/b.bin") == b"world!" and done.manifest.version == manifest.version == 1
    assert build(out, SIG, {"a.bin": b"other"}).action == ALREADY_COMPLETE
    m2 = build(out, {**SIG, "v": 2}, {"a.bin": b"v2"}, overwrite=True)
    assert open_committed(out).read("a.bin") == b"v2" and [v["version"] for v in m2.versions] == [2, 1]
    store_for(out).write(f"{out}/{m2.folder}/a.bin", b"V2")  # replaced after the commit: same size, other bytes
    with pytest.raises(NotCommittedError, match="CRC32C"):
        open_committed(out)  # the listing's CRC32C catches it without a download


def test_a_second_run_is_refused_and_an_expired_lease_is_taken_over(gcs_bucket: str) -> None:
    out = f"{gcs_bucket}/out"
    dead = Lease(out, "job-a", lease_seconds=1.0).acquire()
    with pytest.raises(OutputLockedError, match="in use by job-a"):
        Lease(out, "job-b").acquire()
    time.sleep(1.2)
    second = Lease(out, "job-b").acquire()
    assert second.took_over and second.took_over["job"] == "job-a"
    dead.release()  # never removes a successor's lock
    assert json.loads(store_for(out).read(f"{out}/.lock"))["token"] == second.token
    with pytest.raises(LockLostError):
        dead.renew()
    second.release()
    assert not store_for(out).exists(f"{out}/.lock")


def _race(out: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        lease = Lease(out, f"racer-{os.getpid()}").acquire()
        results.put("won")
        time.sleep(1.0)
        lease.release()
    except OutputLockedError:
        results.put("refused")


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_processes_racing_for_one_folder_exactly_one_wins(gcs_bucket: str, expired: bool) -> None:
    out = f"{gcs_bucket}/race"
    if expired:
        Lease(out, "dead", lease_seconds=0.5).acquire()
        time.sleep(0.7)
    ctx = multiprocessing.get_context("spawn")  # each process its own client, as separate jobs are
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(out, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == ["refused", "refused", "won"]


def test_a_commit_on_a_stale_base_or_without_the_lease_is_refused(gcs_bucket: str) -> None:
    out = f"{gcs_bucket}/out"
    build(out, SIG, {"a.bin": b"1"})
    slow_lease = Lease(out, "slow", lease_seconds=0.5).acquire()
    slow = begin(out, "test", {**SIG, "v": "slow"}, slow_lease, overwrite=True)
    store_for(out).write(slow.path("a.bin"), b"slow")
    time.sleep(0.7)
    fast = build(out, {**SIG, "v": "fast"}, {"a.bin": b"fast"}, overwrite=True)
    with pytest.raises(LockLostError):
        commit(slow, ["a.bin"])
    with Lease(out, "test") as lease:
        stale = outputs.OutputRun(**{**slow.__dict__, "lease": lease.ref()})
        with pytest.raises(CommitConflictError):
            commit(stale, ["a.bin"])
    assert open_committed(out).manifest.folder == fast.folder


def test_a_listing_error_is_an_error_and_deletes_nothing(gcs_bucket: str, gcs_server) -> None:
    from gcs_emulator import fast_retries

    out = f"{gcs_bucket}/out"
    old = build(out, SIG, {"a.bin": b"1"})
    with Lease(out, "test") as lease:
        run = begin(out, "test", {**SIG, "v": 2}, lease, overwrite=True)
        store_for(out).write(run.path("a.bin"), b"2")
        gcs_server.fail("list", 503, times=None)  # the service keeps failing listings
        with fast_retries(), pytest.raises(Exception, match="503|Service Unavailable|RetryError|Timeout"):
            commit(run, ["a.bin"])
        with fast_retries(), pytest.raises(Exception, match="503|Service Unavailable|RetryError|Timeout"):
            open_committed(out)  # a reader's listing error too: never "the files are missing"
        gcs_server.clear_faults()
    assert open_committed(out, verify="full").manifest.folder == old.folder  # nothing committed or deleted
    gcs_server.fail("list", 503, times=1)  # a one-off failure: retried away by the client
    assert open_committed(out).manifest.version == 1


def test_units_are_trusted_only_while_their_objects_match(gcs_bucket: str) -> None:
    work = f"{gcs_bucket}/w"
    store = store_for(work)
    store.write(f"{work}/u1.parquet", b"rows")
    assert outputs.read_unit(work, "u1") is None
    outputs.commit_unit(work, "u1", ["u1.parquet"], {"rows": 1})
    assert outputs.read_unit(work, "u1") == {"rows": 1}
    store.write(f"{work}/u1.parquet", b"ROWS")  # rewritten by a straggling attempt: not the committed bytes
    assert outputs.read_unit(work, "u1") is None
