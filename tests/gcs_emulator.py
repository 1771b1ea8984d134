"""A GCS emulator for the tests: ``gcp-storage-emulator`` in a subprocess, made to behave like GCS.

The test process starts :class:`GcsEmulator`, which runs this file as a script: the child
patches the emulator's request handlers (nothing vendored), serves on 127.0.0.1 on a port
the OS picks, prints the port, and serves until its stdin closes (the parent stopped it or
died). Every process that inherits :attr:`GcsEmulator.env` (Beam's multi-process workers,
CLI commands run with ``subprocess``) reaches the same server through ``gs://``.

What the child adds to the emulator (see docs/TESTING.md for the why):

* preconditions, as GCS's JSON API evaluates them: ``ifGenerationMatch`` (``0``: only if
  absent), ``ifMetagenerationMatch`` (412 when they do not hold), ``ifGenerationNotMatch``,
  ``ifMetagenerationNotMatch`` (304), and ``generation`` (404 unless it is the live one), on
  object uploads (media, multipart, resumable: checked when the upload completes), delete,
  metadata get/patch, media download, and the destination of copy/rewrite/compose
  (``ifSource*`` and ``sourceGeneration`` for their source); batch items too;
* object resources as GCS writes them: a new, increasing ``generation`` and
  ``metageneration`` 1 on every write (the emulator starts copies and multipart uploads at
  metageneration 2, and dates a resumable upload at its start), ``size`` from the content,
  ``updated``/``timeCreated`` in RFC 3339 server time, ``crc32c``, ``md5Hash``, ``etag``;
* fault injection (:meth:`GcsEmulator.fail`) and a request journal
  (:meth:`GcsEmulator.requests`), through control endpoints under ``/_emulator/``;
* robustness: a handler error answers 501 (not retried by clients) instead of dropping the
  connection (which clients retry for two minutes); a listen backlog of 128; in-memory storage
  without re-serializing all metadata on every write.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What a request is, for faults and the journal: ``list``, ``get`` (metadata or media),
#: ``upload`` (any upload request, resumable chunks included), ``delete``, ``copy`` (copy,
#: rewrite, compose), ``patch`` (object metadata), ``batch`` (the batch request itself;
#: its items are matched as ``delete``/``copy``/``patch``), ``bucket``, ``other``.
KINDS = ("list", "get", "upload", "delete", "copy", "patch", "batch", "bucket", "other")

#: Credentials google-auth accepts without any network: an authorized-user file whose access
#: token is present and unexpired. Without ``token``/``expiry`` the first Beam request tries
#: to refresh it at oauth2.googleapis.com and retries for 120 s.
FAKE_CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "fake-client-id",
    "client_secret": "fake-client-secret",
    "refresh_token": "fake-refresh-token",
    "token": "fake-access-token",
    "expiry": "2999-01-01T00:00:00Z",
}

PROJECT = "test-project"
REQUIREMENTS = ("gcp_storage_emulator", "google.cloud.storage")


def missing_requirements() -> list[str]:
    """Modules the emulator fixture needs that are not installed (empty when all are)."""
    missing = []
    for name in REQUIREMENTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a missing parent package; a module set to None
            found = False
        if not found:
            missing.append(name)
    return missing


def split_gcs(path: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> ``("bucket", "name")``; a bare string is an object-name prefix."""
    if not path.startswith("gs://"):
        return "", path
    bucket, _, name = path[len("gs://") :].partition("/")
    return bucket, name


# --------------------------------------------------------------------------------------------
# Test-process side
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected fault; :attr:`fired` and :attr:`remaining` ask the server."""

    emulator: GcsEmulator
    id: int

    def _state(self) -> dict[str, Any]:
        for fault in self.emulator.faults():
            if fault["id"] == self.id:
                return fault
        raise KeyError(f"fault {self.id} was cleared")

    @property
    def fired(self) -> int:
        """How many requests this fault has failed so far."""
        return self._state()["fired"]

    @property
    def remaining(self) -> int | None:
        """How many more requests it will fail (None: every matching request)."""
        return self._state()["remaining"]


class GcsEmulator:
    """The emulator subprocess, seen from the test process.

    ``start()`` writes the fake credentials into ``workdir``, starts the child and waits
    until it answers; ``env`` is what a process needs to reach it through ``gs://``;
    ``stop()`` ends it (so does the test process exiting: the child serves until its stdin
    closes).
    """

    def __init__(self, workdir: Path | str, *, host: str = "127.0.0.1", project: str = PROJECT):
        self.workdir = Path(workdir)
        self.host = host
        self.project = project
        self.port: int | None = None
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self._buckets = 0

    # -- lifecycle --

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the emulator is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def credentials_file(self) -> Path:
        return self.workdir / "fake-credentials.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "emulator.log"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point google-cloud-storage and Beam's gcsio here."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.credentials_file),
            "GOOGLE_CLOUD_PROJECT": self.project,
            "NO_GCE_CHECK": "true",
        }

    def start(self, timeout: float = 30.0) -> GcsEmulator:
        t0 = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials_file.write_text(json.dumps(FAKE_CREDENTIALS))
        self._log = open(self.log_file, "ab")  # noqa: SIM115 (closed in stop())
        self._proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--host", self.host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=self.workdir,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else b""  # the child prints its port once it listens
        if not line:
            self.stop()
            raise RuntimeError(f"the GCS emulator did not start within {timeout} s; see {self.log_file}")
        self.port = int(json.loads(line)["port"])
        deadline = time.monotonic() + timeout
        while True:  # listening already; one round trip proves it serves
            try:
                self._control("GET", "/")
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.02)
        self.start_seconds = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # the child's signal to stop
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GcsEmulator:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control endpoints --

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"{method} {path}: {err.code} {err.read().decode(errors='replace')}") from None
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(payload) if ctype.startswith("application/json") else payload.decode()

    def fail(
        self,
        kind: str,
        status: int = 503,
        *,
        times: int | None = 1,
        method: str | None = None,
        prefix: str = "",
        after: bool = False,
    ) -> Fault:
        """Fail the next ``times`` requests of ``kind`` (None: all, until cleared) with ``status``.

        ``kind`` is one of :data:`KINDS` or ``"any"``; ``method`` optionally narrows it
        (``"GET"``, ``"POST"``, ...). ``prefix`` narrows it to one bucket and object-name
        prefix: ``"gs://bucket/folder/"`` (or a bare ``"folder/"`` for any bucket). A listing
        matches on its ``prefix`` parameter, a copy on its source or its destination.
        Faults are tried in the order they were added; the first that matches fires.

        By default the request fails before it does anything. ``after=True`` lets it take
        effect and then replaces its answer with the error: a lost response, which the
        client retries (a retried ``if_generation_match=0`` upload then meets its own object).
        """
        bucket, name_prefix = split_gcs(prefix)
        spec = {
            "kind": kind,
            "status": status,
            "times": times,
            "method": method,
            "bucket": bucket or None,
            "prefix": name_prefix,
            "after": after,
        }
        return Fault(self, self._control("POST", "/_emulator/faults", spec)["id"])

    def faults(self) -> list[dict[str, Any]]:
        """Every fault still registered, with its ``fired`` and ``remaining`` counts."""
        return self._control("GET", "/_emulator/faults")["faults"]

    def clear_faults(self) -> None:
        self._control("DELETE", "/_emulator/faults")

    def requests(self, bucket: str | None = None) -> list[dict[str, Any]]:
        """The journal, oldest first: ``method``, ``kind``, ``bucket``, ``name``, ``dest``,
        ``status``, ``batch`` (an item of a batch request), ``fault`` (its id, if injected).

        ``bucket`` (``"gs://b"`` or ``"b"``) keeps the entries of one bucket.
        """
        entries = self._control("GET", "/_emulator/requests")["requests"]
        if bucket:
            name = split_gcs(bucket)[0] or bucket
            entries = [e for e in entries if name in (e["bucket"], e.get("dest_bucket"))]
        return entries

    def clear_requests(self) -> None:
        self._control("DELETE", "/_emulator/requests")

    # -- conveniences --

    def client(self):
        """A ``google.cloud.storage.Client`` for the emulator (anonymous; no network)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default); returns ``gs://name``."""
        if name is None:
            self._buckets += 1
            name = f"bucket-{self._buckets}-{os.urandom(4).hex()}"
        self.client().create_bucket(name)
        return f"gs://{name}"


def reset_beam_credentials() -> None:
    """Make Beam read credentials again (it caches them per process, even a failed lookup)."""
    auth = sys.modules.get("apache_beam.internal.gcp.auth")
    if auth is not None and hasattr(auth, "_Credentials"):
        with auth._Credentials._credentials_lock:
            auth._Credentials._credentials_init = False
            auth._Credentials._credentials = None


def _retry_objects() -> list[Any]:
    """The retry policies google-cloud-storage and Beam's gcsio use by default."""
    objects = []
    with contextlib.suppress(ImportError):
        from google.cloud.storage import retry as storage_retry

        objects.append(storage_retry.DEFAULT_RETRY)
    with contextlib.suppress(ImportError):
        from apache_beam.io.gcp import gcsio_retry

        objects.append(gcsio_retry.DEFAULT_RETRY_WITH_THROTTLING_COUNTER)
    return objects


@contextlib.contextmanager
def fast_retries(timeout: float = 1.0, initial: float = 0.01, maximum: float = 0.1) -> Iterator[None]:
    """Shrink the default client retry schedule in this process (not in worker processes).

    google-cloud-storage and Beam's gcsio retry 408/429/5xx and connection errors for up to
    120 s (sleeps drawn from 0..1 s, doubling up to 60 s), so a persistent fault costs two
    minutes per call. Inside this block they retry the same way, for ``timeout`` seconds with
    ``initial``..``maximum`` sleeps. The policies are module-level objects bound as default
    arguments, so they are changed in place and restored on exit.
    """
    saved = [(r, r._initial, r._maximum, r._timeout, r._deadline) for r in _retry_objects()]
    try:
        for r, *_ in saved:
            r._initial, r._maximum, r._timeout, r._deadline = initial, maximum, timeout, timeout
        yield
    finally:
        for r, ini, mx, to, dl in saved:
            r._initial, r._maximum, r._timeout, r._deadline = ini, mx, to, dl


# --------------------------------------------------------------------------------------------
# Server side (runs in the child process)
# --------------------------------------------------------------------------------------------


class PreconditionFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _NotLive(Exception):
    """A ``generation`` parameter names a generation that is not the live one."""


def _error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }


_FAULT_REASONS = {
    400: "invalid",
    403: "forbidden",
    404: "notFound",
    408: "requestTimeout",
    409: "conflict",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    500: "internalError",
    502: "badGateway",
    503: "backendError",
    504: "gatewayTimeout",
}


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def check_preconditions(obj: dict[str, Any] | None, query: dict[str, list[str]], source: bool = False) -> None:
    """Raise :class:`PreconditionFailed` unless ``obj`` (the live object, None if absent)
    satisfies the ``if(Source)(Meta)generation(Not)Match`` parameters in ``query``.

    An absent object has generation 0 and no metageneration, as in GCS: ``ifGenerationMatch=0``
    means "only if absent", ``ifGenerationNotMatch=0`` "only if present", and
    ``ifMetagenerationMatch`` never holds for an absent object. A failed ``*Match`` answers
    412 Precondition Failed, a failed ``*NotMatch`` 304 Not Modified (GCS's documented codes).
    """
    generation = int(obj["generation"]) if obj else 0
    metageneration = int(obj["metageneration"]) if obj else None
    infix = "Source" if source else ""
    checks = (
        (f"if{infix}GenerationMatch", lambda v: v == generation, 412),
        (f"if{infix}MetagenerationMatch", lambda v: v == metageneration, 412),
        (f"if{infix}GenerationNotMatch", lambda v: v != generation, 304),
        (f"if{infix}MetagenerationNotMatch", lambda v: v != metageneration, 304),
    )
    for key, holds, status in checks:
        value = _first(query, key)
        if value is not None and not holds(int(value)):
            what = "source object" if source else "object"
            raise PreconditionFailed(
                status,
                f"{key}={value} does not hold: the {what} has generation {generation} (0: absent)"
                f" and metageneration {metageneration}",
            )


def _check_generation(obj: dict[str, Any] | None, query: dict[str, list[str]], key: str = "generation") -> None:
    value = _first(query, key)
    if value is not None and obj is not None and int(value) != int(obj["generation"]):
        raise _NotLive(f"{key}={value} is not the live generation {obj['generation']}")


def _etag(generation: int, metageneration: int) -> str:
    """GCS's object etag: base64 of the protobuf fields (1: generation, 2: metageneration)."""
    import base64

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return base64.b64encode(b"\x08" + varint(generation) + b"\x10" + varint(metageneration)).decode()


def _now_rfc3339() -> str:
    """Server time as GCS writes it (UTC, milliseconds)."""
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _ServerState:
    """Faults, the journal and the generation clock (the server handles one request at a time)."""

    def __init__(self) -> None:
        import collections
        import threading

        self.lock = threading.Lock()
        self.faults: list[dict[str, Any]] = []
        self.next_fault_id = 1
        self.journal: collections.deque[dict[str, Any]] = collections.deque(maxlen=20000)
        self.last_generation = 0
        self.local = threading.local()  # .query: the request (or batch item) being handled

    @property
    def query(self) -> dict[str, list[str]]:
        return getattr(self.local, "query", None) or {}

    def next_generation(self) -> int:
        """Microseconds since the epoch, as GCS's, and strictly increasing."""
        with self.lock:
            self.last_generation = max(time.time_ns() // 1000, self.last_generation + 1)
            return self.last_generation

    def add_fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        from http import HTTPStatus

        kind = spec.get("kind")
        if kind not in (*KINDS, "any"):
            raise ValueError(f"kind must be one of {KINDS} or 'any', not {kind!r}")
        status = int(spec.get("status", 503))
        HTTPStatus(status)  # ValueError for a status http.server cannot send
        if status < 400:
            raise ValueError(f"status {status} is not an error")
        if status == 401:  # google-auth answers 401 by refreshing the token: a network call
            raise ValueError("status 401 makes the clients refresh their credentials (network); use 403")
        times = spec.get("times", 1)
        if times is not None and int(times) < 1:
            raise ValueError(f"times must be at least 1 or null, not {times}")
        method = spec.get("method")
        with self.lock:
            fault = {
                "id": self.next_fault_id,
                "kind": kind,
                "status": status,
                "method": method.upper() if method else None,
                "bucket": spec.get("bucket") or None,
                "prefix": spec.get("prefix") or "",
                "remaining": None if times is None else int(times),
                "after": bool(spec.get("after", False)),
                "fired": 0,
            }
            self.next_fault_id += 1
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, kind: str, targets: list[tuple[str | None, str | None]]) -> dict | None:
        with self.lock:
            for fault in self.faults:
                if fault["remaining"] == 0:
                    continue
                if fault["kind"] != "any" and fault["kind"] != kind:
                    continue
                if fault["method"] and fault["method"] != method:
                    continue
                if not any(
                    (fault["bucket"] is None or fault["bucket"] == bucket) and (name or "").startswith(fault["prefix"])
                    for bucket, name in targets
                ):
                    continue
                fault["fired"] += 1
                if fault["remaining"] is not None:
                    fault["remaining"] -= 1
                return fault
        return None

    def record(self, **entry: Any) -> None:
        with self.lock:
            self.journal.append(entry)


def _patch_emulator(state: _ServerState) -> None:
    """Wrap gcp-storage-emulator's handlers in place (see the module docstring)."""
    import http.server
    import logging
    import traceback
    from http import HTTPStatus
    from urllib.parse import parse_qs, urlparse

    from gcp_storage_emulator import server as srv
    from gcp_storage_emulator import storage as st
    from gcp_storage_emulator.handlers import buckets, objects

    log = logging.getLogger("gcs_emulator")
    http.server.HTTPServer.request_queue_size = 128  # Beam's workers open connections in bursts
    # the handlers as the route table holds them (some module attributes are replaced below)
    get, download, rewrite, insert = objects.get, objects.download, objects.rewrite, objects.insert

    # -- object resources as GCS writes them; preconditions on every write --

    create_file = st.Storage.create_file

    def stamped_create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
        if bucket_name in self.buckets:
            check_preconditions(self.objects.get(bucket_name, {}).get(file_name), state.query)
            generation, now = state.next_generation(), _now_rfc3339()
            file_obj.update(
                generation=str(generation),
                metageneration="1",
                id=f"{bucket_name}/{file_name}/{generation}",
                timeCreated=now,
                updated=now,
                timeStorageClassUpdated=now,
                size=str(len(content)),
                crc32c=objects._crc32c(content),
                md5Hash=objects._md5(content),
                etag=_etag(generation, 1),
            )
            if isinstance(file_obj.get("mediaLink"), str):
                file_obj["mediaLink"] = re.sub(r"generation=\d+", f"generation={generation}", file_obj["mediaLink"])
        return create_file(self, bucket_name, file_name, content, file_obj, file_id)

    st.Storage.create_file = stamped_create_file

    write_config = st.Storage._write_config_to_file

    def write_config_unless_in_memory(self):
        if not self._use_memory_fs:  # in memory nothing ever reads it back
            write_config(self)

    st.Storage._write_config_to_file = write_config_unless_in_memory

    def live(storage, bucket_name, object_id):
        return storage.objects.get(bucket_name, {}).get(object_id)

    delete = objects._delete

    def checked_delete(storage, bucket_name, object_id):
        obj = live(storage, bucket_name, object_id)
        try:
            _check_generation(obj, state.query)
        except _NotLive:
            return False  # 404, as for a missing object
        if obj is not None:
            check_preconditions(obj, state.query)
        return delete(storage, bucket_name, object_id)

    objects._delete = checked_delete

    patch = objects._patch

    def checked_patch(storage, bucket_name, object_id, metadata):
        obj = live(storage, bucket_name, object_id)
        try:
            _check_generation(obj, state.query)
        except _NotLive:
            return None  # 404
        if obj is not None:
            check_preconditions(obj, state.query)
        patched = patch(storage, bucket_name, object_id, metadata)
        if patched:
            patched["updated"] = _now_rfc3339()
            patched["etag"] = _etag(int(patched["generation"]), int(patched["metageneration"]))
        return patched

    objects._patch = checked_patch

    copy = objects._copy

    def checked_copy(base_url, storage, bucket_name, object_id, dest_bucket_name, dest_object_id):
        source = live(storage, bucket_name, object_id)
        if source is not None:
            try:
                _check_generation(source, state.query, "sourceGeneration")
            except _NotLive:
                raise objects.NotFound() from None
            check_preconditions(source, state.query, source=True)
        return copy(base_url, storage, bucket_name, object_id, dest_bucket_name, dest_object_id)

    objects._copy = checked_copy

    def reading(handler, source=False):
        """Check preconditions of the object a handler reads before it runs."""

        def checked(request, response, storage, *args, **kwargs):
            soft_deleted = (_first(request.query, "softDeleted") or "").lower() in ("1", "true", "yes")
            obj = live(storage, request.params["bucket_name"], request.params["object_id"])
            if obj is not None and not soft_deleted:
                try:
                    _check_generation(obj, request.query, "sourceGeneration" if source else "generation")
                except _NotLive:
                    response.status = HTTPStatus.NOT_FOUND
                    return None
                check_preconditions(obj, request.query, source=source)
            return handler(request, response, storage, *args, **kwargs)

        return checked

    checked_download = reading(download)
    objects.download = checked_download  # also what objects.get calls for alt=media

    # -- routes: faults, journal, precondition and error responses --

    def describe(handler, request, storage):
        """(kind, [(bucket, name), ...]) of a request, for faults and the journal."""
        params = request.params or {}
        bucket, name = params.get("bucket_name"), params.get("object_id")
        dest = (params.get("dest_bucket_name"), params.get("dest_object_id"))
        if handler is objects.ls:
            return "list", [(bucket, _first(request.query, "prefix") or "")]
        if handler in (get, download):
            return "get", [(bucket, name)]
        if handler in (insert, objects.upload_partial, objects.xml_upload):
            if name is None:
                name = _first(request.query, "name")
            upload_id = _first(request.query, "upload_id")
            if upload_id:
                session = storage.resumable.get(upload_id) or {}
                name = name or session.get("name")
            if name is None:
                with contextlib.suppress(Exception):
                    data = request.data
                    if isinstance(data, dict):
                        name = (data.get("meta") or data).get("name")
            return "upload", [(bucket, name)]
        if handler is objects.delete:
            return "delete", [(bucket, name)]
        if handler in (objects.copy, rewrite, objects.compose):
            return "copy", [(bucket, name), dest]
        if handler is objects.patch:
            return "patch", [(bucket, name)]
        if handler is objects.batch:
            return "batch", [(None, None)]
        if getattr(handler, "__module__", "") == buckets.__name__:
            if bucket is None and request.method == "POST":
                with contextlib.suppress(Exception):
                    bucket = request.data.get("name")
            return "bucket", [(bucket, None)]
        return "other", [(bucket, name)]

    def fault_response(response, fault):
        response._headers = {}
        response.status = HTTPStatus(fault["status"])
        message = f"injected fault {fault['id']} ({fault['kind']}, {fault['status']})"
        response.json(_error_body(fault["status"], _FAULT_REASONS.get(fault["status"], "injected"), message))

    def precondition_response(response, err):
        response.status = HTTPStatus(err.status)
        if err.status == 304:
            response._content = ""  # a 304 has no body
        else:
            response.json(_error_body(err.status, "conditionNotMet", str(err)))

    def route(original, handler):
        def handle(request, response, storage, *args, **kwargs):
            kind, targets = describe(original, request, storage)
            with contextlib.suppress(Exception):
                _ = request.data  # read the body even when answering without the handler
            fault = state.take_fault(request.method, kind, targets)
            state.local.query = request.query
            try:
                if fault and not fault["after"]:
                    fault_response(response, fault)
                else:
                    handler(request, response, storage, *args, **kwargs)
            except PreconditionFailed as err:
                precondition_response(response, err)
            except Exception as err:  # an emulator bug: answer, and not with a status clients retry
                log.error("%s %s failed:\n%s", request.method, request.full_url, traceback.format_exc())
                response.status = HTTPStatus.NOT_IMPLEMENTED
                response.json(_error_body(501, "emulatorError", f"{type(err).__name__}: {err}"))
            finally:
                state.local.query = None
            if fault and fault["after"]:  # it happened, but the client hears otherwise
                fault_response(response, fault)
            (bucket, name), dest = targets[0], (targets[1] if len(targets) > 1 else (None, None))
            state.record(
                method=request.method,
                kind=kind,
                bucket=bucket,
                name=name,
                dest_bucket=dest[0],
                dest=dest[1],
                status=int(response.status),
                batch=False,
                fault=fault["id"] if fault else None,
            )

        return handle

    checked = {
        get: reading(get),
        download: checked_download,
        rewrite: reading(rewrite, source=True),
    }
    for _, handlers in srv.HANDLERS:
        for method, original in list(handlers.items()):
            handlers[method] = route(original, checked.get(original, original))
    objects.insert = route(insert, insert)  # the router's fallback for POST .../o

    # -- batch items: their own query, faults, precondition answers --

    parse_batch_item = srv._parse_batch_item
    request_line = re.compile(r"^(?:GET|POST|PUT|PATCH|DELETE)\s+(\S+)")

    def parse_batch_item_with_query(item):
        params = parse_batch_item(item)
        for line in item.get_payload().splitlines():
            match = request_line.match(line)
            if match:
                params["query"] = parse_qs(urlparse(match.group(1)).query)
                break
        return params

    srv._parse_batch_item = parse_batch_item_with_query

    def batch_item(method, handler):
        def handle(request, item, storage, bucket_name, object_id, meta, response):
            kind = {"DELETE": "delete", "POST": "copy", "PATCH": "patch"}[method]
            if method == "DELETE" and not object_id:
                kind = "bucket"
            dest = (item.get("dest_bucket_name"), item.get("dest_object_id"))
            fault = state.take_fault(method, kind, [(bucket_name, object_id), dest])
            state.local.query = item.get("query") or {}
            status, mark = None, len(response._content)
            try:
                if not fault or fault["after"]:
                    handled = handler(request, item, storage, bucket_name, object_id, meta, response)
            except PreconditionFailed as err:
                status, handled = err.status, True
                line = f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}"
                if err.status == 304:
                    response.write(line + "\r\n\r\n")
                else:
                    objects._batch_write_json(response, line, _error_body(err.status, "conditionNotMet", str(err)))
            finally:
                state.local.query = None
            if fault:  # before the item ran, or after (its own answer dropped)
                response._content = response._content[:mark]
                status, handled = fault["status"], True
                phrase = HTTPStatus(status).phrase
                body = _error_body(status, _FAULT_REASONS.get(status, "injected"), f"injected fault {fault['id']}")
                objects._batch_write_json(response, f"HTTP/1.1 {status} {phrase}", body)
            if status is None:
                status = (204 if method == "DELETE" else 200) if handled else 404
            state.record(
                method=method,
                kind=kind,
                bucket=bucket_name,
                name=object_id,
                dest_bucket=dest[0],
                dest=dest[1],
                status=status,
                batch=True,
                fault=fault["id"] if fault else None,
            )
            return handled

        return handle

    for method, handler in list(objects._BATCH_METHOD_HANDLERS.items()):
        objects._BATCH_METHOD_HANDLERS[method] = batch_item(method, handler)

    # -- control endpoints (not journaled, never faulted) --

    def control_faults(request, response, storage):
        if request.method == "POST":
            try:
                response.json(state.add_fault(request.data or {}))
            except (TypeError, ValueError) as err:
                response.status = HTTPStatus.BAD_REQUEST
                response.json(_error_body(400, "invalid", str(err)))
            return
        if request.method == "DELETE":
            with state.lock:
                state.faults.clear()
        with state.lock:
            response.json({"faults": [dict(f) for f in state.faults]})

    def control_requests(request, response, storage):
        with state.lock:
            if request.method == "DELETE":
                state.journal.clear()
            response.json({"requests": list(state.journal)})

    srv.HANDLERS = (
        (r"^/_emulator/faults$", {"GET": control_faults, "POST": control_faults, "DELETE": control_faults}),
        (r"^/_emulator/requests$", {"GET": control_requests, "DELETE": control_requests}),
        *srv.HANDLERS,
    )


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the patched emulator in memory until stdin closes or SIGTERM; print the port first."""
    import logging
    import signal

    logging.basicConfig(level=logging.CRITICAL, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("gcs_emulator").setLevel(logging.ERROR)
    from gcp_storage_emulator.server import create_server

    _patch_emulator(_ServerState())
    server = create_server(host, port, in_memory=True)
    server._api.daemon = True  # nothing to save (in memory): exit without waiting for it
    server.start()
    print(json.dumps({"port": server._api._httpd.server_address[1], "pid": os.getpid()}), flush=True)

    def terminate(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    sys.stdin.buffer.read()  # returns when the parent closes our stdin or exits


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The tests' GCS emulator (prints its port, serves until stdin closes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.host, args.port)
