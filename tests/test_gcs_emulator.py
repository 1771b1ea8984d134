"""The GCS emulator fixture (tests/gcs_emulator.py): the behaviour later gs:// tests rely on.

Beam's gs:// IO and google.cloud.storage against the emulator: reads, writes, listings,
renames and pipelines (in-process and with worker processes); generation preconditions as
GCS honours them; injected faults and how the clients retry them. docs/TESTING.md sums up.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed (the dev extra has it)")

from gcs_emulator import fast_retries, reset_beam_credentials, split_gcs  # noqa: E402
from google.api_core import exceptions as gexc  # noqa: E402
from google.cloud.storage.exceptions import InvalidResponse  # noqa: E402

MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def blob_of(gcs_server, path: str):
    bucket, name = split_gcs(path)
    return gcs_server.client().bucket(bucket).blob(name)


def object_requests(gcs_server, bucket: str) -> list[dict]:
    """The journal's requests on objects of ``bucket`` (Beam also reads bucket metadata)."""
    return [e for e in gcs_server.requests(bucket) if e["kind"] != "bucket"]


def listing(bucket: str) -> list[str]:
    """Every object name in ``bucket`` (gs://...), sorted, through Beam's FileSystems.match."""
    from apache_beam.io.filesystems import FileSystems

    return sorted(m.path[len(bucket) + 1 :] for m in FileSystems.match([f"{bucket}/**"])[0].metadata_list)


def b64_crc32c(data: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


# --- set-up: credentials, timings, subprocesses ---


def test_fake_credentials_need_no_network(gcs_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam's first gs:// call loads the fake credentials and never refreshes them."""
    import socket

    import google.auth
    from apache_beam.io.filesystems import FileSystems

    credentials, project = google.auth.default()
    assert credentials.valid and not credentials.expired  # a token that needs no refresh
    assert project == "test-project"

    hosts: list[str] = []
    getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host, *args, **kwargs):
        hosts.append(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    reset_beam_credentials()  # as in a fresh process
    t0 = time.perf_counter()
    with FileSystems.create(f"{gcs_bucket}/first.txt") as f:
        f.write(b"first")
    first_call = time.perf_counter() - t0
    assert FileSystems.exists(f"{gcs_bucket}/first.txt")
    assert set(hosts) <= {"127.0.0.1"}, hosts  # never oauth2.googleapis.com or the metadata server
    assert first_call < 5, f"first gs:// write took {first_call:.1f} s"  # ~0.05 s; 120 s if it tried to refresh


def test_emulator_starts_quickly(gcs_server) -> None:
    assert gcs_server.start_seconds is not None and gcs_server.start_seconds < 10


def test_a_subprocess_reaches_the_emulator_through_the_environment(gcs_server, gcs_bucket: str) -> None:
    blob_of(gcs_server, f"{gcs_bucket}/from-parent.txt").upload_from_string(b"parent")
    bucket = split_gcs(gcs_bucket)[0]
    code = (
        "import sys; from google.cloud import storage\n"
        "b = storage.Client().bucket(sys.argv[1])\n"  # default construction, as our code does
        "b.blob('from-child.txt').upload_from_string(b.blob('from-parent.txt').download_as_bytes() + b'+child')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, bucket], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert blob_of(gcs_server, f"{gcs_bucket}/from-child.txt").download_as_bytes() == b"parent+child"


# --- Beam FileSystems and gcsio ---


def test_beam_filesystems_create_open_match_rename_delete(gcs_server, gcs_bucket: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp.gcsio import GcsIO

    data = "한국어 문장\n".encode() * 5000  # 80 kB: several read chunks
    a, b, c, empty = (f"{gcs_bucket}/dir/{n}" for n in ("a.txt", "b.txt", "c.txt", "empty.txt"))
    with FileSystems.create(a) as f:
        f.write(data)
    with FileSystems.create(empty):
        pass
    with FileSystems.open(a) as f:
        assert f.read() == data
    with FileSystems.open(empty) as f:
        assert f.read() == b""
    assert FileSystems.exists(a) and not FileSystems.exists(f"{gcs_bucket}/dir/missing.txt")
    assert FileSystems.checksum(a) == b64_crc32c(data)

    listed = FileSystems.match([f"{gcs_bucket}/dir/*"])[0].metadata_list
    assert sorted((m.path, m.size_in_bytes) for m in listed) == [(a, len(data)), (empty, 0)]
    assert [m.path for m in FileSystems.match([a])[0].metadata_list] == [a]
    assert FileSystems.match([f"{gcs_bucket}/dir/missing.txt"])[0].metadata_list == []

    # FileSystems.rename: a batch of copies, then a batch of deletes (not atomic)
    gcs_server.clear_requests()
    FileSystems.rename([a], [b])
    journal = [
        (e["kind"], e["method"], e["batch"], e["name"], e["dest"]) for e in object_requests(gcs_server, gcs_bucket)
    ]
    assert journal == [("copy", "POST", True, "dir/a.txt", "dir/b.txt"), ("delete", "DELETE", True, "dir/a.txt", None)]
    assert not FileSystems.exists(a)

    # GcsIO.rename: copy, then delete; onto an existing name it overwrites silently
    with FileSystems.create(c) as f:
        f.write(b"old c")
    gcs_server.clear_requests()
    GcsIO().rename(b, c)
    kinds = [(e["kind"], e["batch"]) for e in object_requests(gcs_server, gcs_bucket)]
    assert kinds == [("copy", False), ("delete", False)]
    with FileSystems.open(c) as f:
        assert f.read() == data

    FileSystems.delete([c, empty])
    assert FileSystems.match([f"{gcs_bucket}/dir/*"])[0].metadata_list == []


def test_beam_pipeline_writes_and_reads_gs(gcs_bucket: str) -> None:
    """WriteToText and WriteToParquet to gs://, then ReadFromText and ReadFromParquet (FnApiRunner)."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.common import create_pipeline, pipeline_options

    n = 300
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with create_pipeline(pipeline_options([])) as p:
        rows = p | beam.Create(range(n)) | beam.Map(lambda i: {"id": i, "text": f"문장 {i}"})
        _ = (
            rows
            | beam.Map(lambda r: f"{r['id']}\t{r['text']}")
            | beam.io.WriteToText(f"{gcs_bucket}/text/part", file_name_suffix=".txt", num_shards=2)
        )
        _ = rows | beam.io.WriteToParquet(
            f"{gcs_bucket}/parquet/part", schema, file_name_suffix=".parquet", num_shards=2
        )

    # exactly the shards: Beam's temporary files are gone
    assert listing(gcs_bucket) == [
        "parquet/part-00000-of-00002.parquet",
        "parquet/part-00001-of-00002.parquet",
        "text/part-00000-of-00002.txt",
        "text/part-00001-of-00002.txt",
    ]
    with create_pipeline(pipeline_options([])) as p:
        text = p | beam.io.ReadFromText(f"{gcs_bucket}/text/part-*") | beam.Map(lambda line: tuple(line.split("\t")))
        parquet = p | beam.io.ReadFromParquet(f"{gcs_bucket}/parquet/part-*") | beam.Map(lambda r: (r["id"], r["text"]))
        assert_that(text, equal_to([(str(i), f"문장 {i}") for i in range(n)]), label="text")
        assert_that(parquet, equal_to([(i, f"문장 {i}") for i in range(n)]), label="parquet")
    with FileSystems.open(f"{gcs_bucket}/text/part-00000-of-00002.txt") as f:
        assert f.read().decode().count("\n") in range(1, n)


def test_beam_worker_processes_read_and_write_gs(gcs_bucket: str) -> None:
    """--direct_running_mode=multi_processing: the worker processes reach the emulator too."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.common import create_pipeline, pipeline_options

    n = 200
    with FileSystems.create(f"{gcs_bucket}/in/lines.txt") as f:
        f.write("".join(f"{i}\n" for i in range(n)).encode())
    with FileSystems.create(f"{gcs_bucket}/in/rows.parquet") as f:
        pq.write_table(pa.table({"id": list(range(n))}), f)

    with create_pipeline(pipeline_options(MULTI_PROCESS)) as p:
        lines = p | beam.io.ReadFromText(f"{gcs_bucket}/in/lines.txt") | beam.Map(int)
        rows = p | beam.io.ReadFromParquet(f"{gcs_bucket}/in/rows.parquet") | beam.Map(lambda r: r["id"])
        assert_that(rows, equal_to(list(range(n))), label="parquet read")
        _ = (
            lines
            | beam.Map(lambda i: f"{i}\t{os.getpid()}")
            | beam.io.WriteToText(f"{gcs_bucket}/out/part", file_name_suffix=".txt", num_shards=2)
        )
        _ = (
            rows
            | beam.Map(lambda i: {"id": i})
            | beam.io.WriteToParquet(f"{gcs_bucket}/out/rows", pa.schema([("id", pa.int64())]), num_shards=1)
        )

    out = [name for name in listing(gcs_bucket) if name.startswith("out/")]
    assert out == ["out/part-00000-of-00002.txt", "out/part-00001-of-00002.txt", "out/rows-00000-of-00001"]
    ids, pids = [], set()
    for name in out[:2]:
        with FileSystems.open(f"{gcs_bucket}/{name}") as f:
            for line in f.read().decode().splitlines():
                i, pid = line.split("\t")
                ids.append(int(i))
                pids.add(int(pid))
    assert sorted(ids) == list(range(n))
    assert pids and os.getpid() not in pids  # made, and written to gs://, by worker processes
    with FileSystems.open(f"{gcs_bucket}/out/rows-00000-of-00001") as f:
        assert sorted(pq.read_table(f).column("id").to_pylist()) == list(range(n))


# --- google.cloud.storage: preconditions and object resources ---


def upload(blob, data: bytes, how: str, **preconditions) -> None:
    """Upload ``data`` the way google-cloud-storage (or a plain HTTP client, for media) would."""
    if how == "multipart":  # what upload_from_string uses up to 8 MiB
        blob.upload_from_string(data, **preconditions)
    elif how == "resumable":  # what it uses above 8 MiB or for a size it does not know: here 2 chunks
        blob.chunk_size = 256 * 1024
        blob.upload_from_file(io.BytesIO(data), **preconditions)
    elif how == "writer":  # blob.open("wb"), and Beam's writer: resumable
        with blob.open("wb", **preconditions) as f:
            f.write(data)
    elif how == "media":  # uploadType=media: no client method uses it, other tools do
        params = {"uploadType": "media", "name": blob.name}
        if "if_generation_match" in preconditions:
            params["ifGenerationMatch"] = preconditions["if_generation_match"]
        client = blob.client
        url = f"{client._connection.API_BASE_URL}/upload/storage/v1/b/{blob.bucket.name}/o"
        response = client._http.post(url, params=params, data=data)
        if response.status_code != 200:
            raise gexc.from_http_response(response)
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["multipart", "resumable", "writer", "media"])
def test_create_if_absent_succeeds_once(gcs_server, gcs_bucket: str, how: str) -> None:
    blob = blob_of(gcs_server, f"{gcs_bucket}/lock")
    first = os.urandom(300 * 1024) if how == "resumable" else b"owner-1"
    upload(blob, first, how, if_generation_match=0)
    # blob.open("wb") surfaces the 412 of its last chunk as the media layer's InvalidResponse
    refused = (gexc.PreconditionFailed, InvalidResponse) if how == "writer" else gexc.PreconditionFailed
    with pytest.raises(refused) as err:
        upload(blob_of(gcs_server, f"{gcs_bucket}/lock"), b"owner-2", how, if_generation_match=0)
    if how == "writer":
        assert err.value.response.status_code == 412
    assert blob_of(gcs_server, f"{gcs_bucket}/lock").download_as_bytes() == first
    uploads = [e for e in gcs_server.requests(gcs_bucket) if e["kind"] == "upload"]
    if how == "resumable":  # initiation, two chunks; then initiation, one final chunk refused
        assert [e["status"] for e in uploads] == [200, 308, 200, 200, 412]
    else:
        assert uploads[-1]["status"] == 412


def test_compare_and_swap_with_a_stale_generation_fails(gcs_server, gcs_bucket: str) -> None:
    blob = blob_of(gcs_server, f"{gcs_bucket}/state.json")
    blob.upload_from_string(b"v1", if_generation_match=0)
    g1 = blob.generation
    blob.upload_from_string(b"v2", if_generation_match=g1)
    g2 = blob.generation
    assert g2 > g1 and blob.metageneration == 1
    with pytest.raises(gexc.PreconditionFailed):  # a writer that read v1 loses
        blob_of(gcs_server, f"{gcs_bucket}/state.json").upload_from_string(b"v3", if_generation_match=g1)
    with pytest.raises(gexc.PreconditionFailed):
        blob_of(gcs_server, f"{gcs_bucket}/state.json").upload_from_string(b"v3", if_metageneration_match=2)
    with pytest.raises(gexc.PreconditionFailed):  # metageneration never matches an absent object
        blob_of(gcs_server, f"{gcs_bucket}/absent").upload_from_string(b"x", if_metageneration_match=1)
    assert blob_of(gcs_server, f"{gcs_bucket}/state.json").download_as_bytes() == b"v2"


def test_delete_with_a_stale_generation_fails(gcs_server, gcs_bucket: str) -> None:
    blob = blob_of(gcs_server, f"{gcs_bucket}/lock")
    blob.upload_from_string(b"mine")
    stale = blob.generation
    blob.upload_from_string(b"theirs")
    with pytest.raises(gexc.PreconditionFailed):
        blob.bucket.delete_blob("lock", if_generation_match=stale)
    with pytest.raises(gexc.NotFound):  # a generation that is not the live one
        blob.bucket.delete_blob("lock", generation=stale)
    # in a batch (as gcsio.delete_batch sends them): the item answers 412
    client = gcs_server.client()
    with client.batch(raise_exception=False) as batch:
        client.bucket(blob.bucket.name).delete_blob("lock", if_generation_match=stale)
    assert [r.status_code for r in batch._responses] == [412]
    assert blob.exists()
    blob.bucket.delete_blob("lock", if_generation_match=blob.generation)
    assert not blob.exists()


def test_metadata_get_and_patch_preconditions(gcs_server, gcs_bucket: str) -> None:
    blob = blob_of(gcs_server, f"{gcs_bucket}/obj")
    blob.upload_from_string(b"data", content_type="text/plain")
    generation = blob.generation
    blob.metadata = {"owner": "a"}
    blob.patch(if_metageneration_match=1)
    assert blob.metageneration == 2 and blob.generation == generation
    blob.metadata = {"owner": "b"}
    with pytest.raises(gexc.PreconditionFailed):
        blob.patch(if_metageneration_match=1)
    with pytest.raises(gexc.PreconditionFailed):
        blob.reload(if_generation_match=generation - 1)
    with pytest.raises(gexc.NotModified):  # GCS answers 304 when a *NotMatch condition fails
        blob.reload(if_generation_not_match=generation)
    with pytest.raises(gexc.PreconditionFailed):
        blob.download_as_bytes(if_generation_match=generation - 1)
    assert blob.download_as_bytes(if_generation_match=generation) == b"data"
    fresh = blob.bucket.get_blob("obj", if_metageneration_match=2)
    assert fresh is not None and fresh.metadata == {"owner": "a"}


def test_copy_and_rewrite_honour_destination_and_source_preconditions(gcs_server, gcs_bucket: str) -> None:
    bucket = gcs_server.client().bucket(split_gcs(gcs_bucket)[0])
    src = bucket.blob("src")
    src.metadata = {"k": "v"}
    src.upload_from_string(b"source")
    copied = bucket.copy_blob(src, bucket, "dst", if_generation_match=0)
    assert copied.generation > src.generation and copied.metageneration == 1
    assert copied.crc32c == src.crc32c and copied.metadata == {"k": "v"}
    with pytest.raises(gexc.PreconditionFailed):  # the destination exists now
        bucket.copy_blob(src, bucket, "dst", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("dst").rewrite(src, if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.copy_blob(src, bucket, "dst2", if_source_generation_match=src.generation - 1)
    token, done, total = bucket.blob("dst").rewrite(src, if_generation_match=copied.generation)
    assert token is None and done == total == len(b"source")


def test_object_resources_carry_what_gcs_sets(gcs_server, gcs_bucket: str) -> None:
    import google_crc32c

    blob = blob_of(gcs_server, f"{gcs_bucket}/check")
    data = b"123456789"
    before = datetime.now(UTC)
    blob.metadata = {"a": "b"}
    blob.upload_from_string(data)  # multipart with metadata: still metageneration 1
    assert blob.size == 9 and blob.metageneration == 1
    assert blob.crc32c == "4waSgw==" == b64_crc32c(data)  # CRC-32C of "123456789" is 0xE3069283, big-endian
    assert base64.b64decode(blob.crc32c) == google_crc32c.value(data).to_bytes(4, "big")
    assert blob.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert blob.updated.tzinfo is not None and before.replace(microsecond=0) <= blob.updated <= datetime.now(UTC)
    generations = [blob.generation]
    for i in range(5):  # back-to-back writes still get increasing generations
        blob.upload_from_string(b"%d" % i)
        generations.append(blob.generation)
    assert generations == sorted(set(generations))
    listed = next(iter(blob.client.list_blobs(blob.bucket.name)))
    assert (listed.generation, listed.size, listed.crc32c) == (blob.generation, 1, b64_crc32c(b"4"))


# --- faults and retries ---


def write_files(folder: str, n: int = 3) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    paths = [f"{folder}/f{i}.txt" for i in range(n)]
    for path in paths:
        with FileSystems.create(path) as f:
            f.write(b"x")
    return paths


def test_a_persistent_listing_failure_is_an_error_never_an_empty_folder(gcs_server, gcs_bucket: str) -> None:
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    write_files(f"{gcs_bucket}/data")
    write_files(f"{gcs_bucket}/other", 1)
    client = gcs_server.client()
    bucket = split_gcs(gcs_bucket)[0]

    # a status the clients retry (503), failing for longer than they retry (shortened here from 120 s)
    fault = gcs_server.fail("list", 503, times=None, prefix=f"{gcs_bucket}/data/")
    with fast_retries(timeout=0.5):
        with pytest.raises(BeamIOError, match="List operation failed"):
            FileSystems.match([f"{gcs_bucket}/data/*"])
        beam_attempts = fault.fired
        with pytest.raises(gexc.RetryError) as err:
            list(client.list_blobs(bucket, prefix="data/"))
        assert isinstance(err.value.__cause__, gexc.ServiceUnavailable)
        assert len(FileSystems.match([f"{gcs_bucket}/other/*"])[0].metadata_list) == 1  # other prefixes list
    assert beam_attempts > 1 and fault.fired > beam_attempts  # both retried before giving up

    # a status they do not retry (403): one attempt, then the error
    gcs_server.clear_faults()
    fault = gcs_server.fail("list", 403, times=None, prefix=f"{gcs_bucket}/data/")
    with pytest.raises(BeamIOError):
        FileSystems.match([f"{gcs_bucket}/data/*"])
    with pytest.raises(gexc.Forbidden):
        list(client.list_blobs(bucket, prefix="data/"))
    assert fault.fired == 2


def test_a_one_off_listing_failure_is_retried_away(gcs_server, gcs_bucket: str) -> None:
    """With the clients' real retry schedule (first sleep drawn from 0-1 s)."""
    from apache_beam.io.filesystems import FileSystems

    paths = write_files(f"{gcs_bucket}/data")
    fault = gcs_server.fail("list", 503, times=1, prefix=f"{gcs_bucket}/data/")
    assert sorted(m.path for m in FileSystems.match([f"{gcs_bucket}/data/*"])[0].metadata_list) == paths
    assert fault.fired == 1 and fault.remaining == 0
    fault = gcs_server.fail("list", 503, times=1, method="GET")
    listed = gcs_server.client().list_blobs(split_gcs(gcs_bucket)[0], prefix="data/")
    assert sorted(b.name for b in listed) == ["data/f0.txt", "data/f1.txt", "data/f2.txt"]
    assert fault.fired == 1


RETRIED = (408, 429, 500, 502, 503, 504)
NOT_RETRIED = (400, 403, 404, 409, 412)  # 401 is refused: it makes google-auth refresh the token


def test_which_statuses_the_clients_retry(gcs_server, gcs_bucket: str) -> None:
    """google-cloud-storage's DEFAULT_RETRY and Beam's gcsio retry (same predicate): 408, 429, 5xx."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    write_files(f"{gcs_bucket}/data", 1)
    client, bucket = gcs_server.client(), split_gcs(gcs_bucket)[0]
    outcomes = {}
    with fast_retries():
        for status in RETRIED + NOT_RETRIED:
            fault = gcs_server.fail("list", status, times=1, prefix=f"{gcs_bucket}/data/")
            try:
                beam = len(FileSystems.match([f"{gcs_bucket}/data/*"])[0].metadata_list) == 1
            except BeamIOError:
                beam = False
            fault2 = gcs_server.fail("list", status, times=1, prefix=f"{gcs_bucket}/data/")
            try:
                storage = len(list(client.list_blobs(bucket, prefix="data/"))) == 1
            except gexc.GoogleAPICallError:
                storage = False
            outcomes[status] = (beam, storage, fault.fired + fault2.fired)
    # retried: the one failure is hidden; not retried: it surfaces (each fault fired once either way)
    assert outcomes == {s: (True, True, 2) for s in RETRIED} | {s: (False, False, 2) for s in NOT_RETRIED}


def test_one_off_upload_failures_are_retried(gcs_server, gcs_bucket: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with fast_retries():
        # google-cloud-storage 3.x retries uploads by default, with or without a precondition
        for name, preconditions in (("a", {}), ("b", {"if_generation_match": 0})):
            fault = gcs_server.fail("upload", 503, times=1, prefix=f"{gcs_bucket}/{name}")
            blob_of(gcs_server, f"{gcs_bucket}/{name}").upload_from_string(b"data", **preconditions)
            assert fault.fired == 1
        # Beam's gcsio passes its own unconditional retry (resumable uploads: initiation and chunks)
        fault = gcs_server.fail("upload", 503, times=2, prefix=f"{gcs_bucket}/c")
        with FileSystems.create(f"{gcs_bucket}/c") as f:
            f.write(b"c")
        assert fault.fired == 2
    assert listing(gcs_bucket) == ["a", "b", "c"]


def test_rename_is_copy_then_delete_and_a_failed_delete_leaves_both_names(gcs_server, gcs_bucket: str) -> None:
    """FileSystems.rename on gs:// (issue 19): a batch copy, then a batch delete, each item retried."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    a, b, c = (f"{gcs_bucket}/{name}" for name in ("a", "b", "c"))
    with FileSystems.create(a) as f:
        f.write(b"a")
    fault = gcs_server.fail("copy", 503, times=1, prefix=f"{gcs_bucket}/a")  # one batch item fails once
    FileSystems.rename([a], [b])
    assert fault.fired == 1 and listing(gcs_bucket) == ["b"]

    fault = gcs_server.fail("delete", 403, times=None, prefix=f"{gcs_bucket}/b")
    with pytest.raises(BeamIOError, match="Rename operation failed"):
        FileSystems.rename([b], [c])
    assert fault.fired == 1 and listing(gcs_bucket) == ["b", "c"]  # copied, never deleted: two names


def test_a_lost_response_turns_a_retried_create_if_absent_into_a_412(gcs_server, gcs_bucket: str) -> None:
    """The first attempt creates the object but its answer is lost; the retry meets that object.

    On GCS as here: code that creates a lock with if_generation_match=0 must be ready to find
    its own object behind a PreconditionFailed (compare its token).
    """
    fault = gcs_server.fail("upload", 503, times=1, prefix=f"{gcs_bucket}/lock", after=True)
    with fast_retries(), pytest.raises(gexc.PreconditionFailed):
        blob_of(gcs_server, f"{gcs_bucket}/lock").upload_from_string(b"token-1", if_generation_match=0)
    assert fault.fired == 1
    assert blob_of(gcs_server, f"{gcs_bucket}/lock").download_as_bytes() == b"token-1"
    statuses = [e["status"] for e in object_requests(gcs_server, gcs_bucket)]
    assert statuses[-3:] == [503, 412, 200]  # the lost answer, the retry, the download


def test_fault_specs_are_checked(gcs_server) -> None:
    gcs_server.clear_faults()
    with pytest.raises(RuntimeError, match="kind must be"):
        gcs_server.fail("lists", 503)
    with pytest.raises(RuntimeError, match="not an error"):
        gcs_server.fail("list", 200)
    with pytest.raises(RuntimeError, match="refresh"):
        gcs_server.fail("list", 401)
    assert gcs_server.faults() == []
