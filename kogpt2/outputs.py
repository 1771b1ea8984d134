"""The output protocol of every job: immutable versions committed by one manifest written last.

An output folder (``--output``) of preprocessing, training or bulk generation, local or
``gs://``, holds::

    OUT/COMPLETED               the manifest of the current version: written last, it IS the commit
    OUT/v-20261203T074512Z-1a2b3c/   a committed version: its files and MANIFEST.json (a copy)
    OUT/v-.../                  older versions kept by --keep-versions, or the run in progress
    OUT/.pending                the run in progress: its work folder and signature (for resume)
    OUT/.lock                   the lease of the run that writes now

- **A run writes where no reader looks**: a work folder of its own (a new ``v-...`` folder;
  training keeps its checkpoints in a ``w-...`` folder and publishes each model into a new
  ``v-...``). Nothing a reader uses is touched until the commit.
- **One small object written last commits it**: ``COMPLETED`` names the version folder and lists
  every file with its size and CRC32C, and is written with a precondition on the generation the
  run started from (compare-and-swap): two runs can never both commit over the same version.
- **Readers trust the manifest, never a listing** (:func:`open_committed`): training, generation,
  reports and the next run read ``COMPLETED``, then only the files it names, checking sizes (and
  CRC32C where storage has it for free, or when asked).
- **The last good version stays readable until a newer one commits.** A failed, empty,
  corrupt-input or killed run never replaces it; ``--overwrite`` means "build a new version".
  After a commit, versions beyond ``--keep-versions`` and abandoned work folders are removed.
- **A lease lock** (:class:`Lease`): ``.lock`` is created only if absent, owned by a random token,
  renewed by a heartbeat, taken over only once its lease (60 s) has expired and only by
  compare-and-swap, and released only by its owner. No process ids: a restarted container is not
  mistaken for the old run.
- **Units** (:func:`commit_unit`, :func:`read_unit`): a long job (bulk generation) commits its work
  units one by one inside its work folder, each by a small record written after its files, with
  their sizes and CRC32C; a rerun trusts a unit only if its files still match.

Storage operations (atomic writes, preconditions, checksums, errors that are never "empty")
are in :mod:`kogpt2.storage`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kogpt2.storage import ABSENT, PreconditionFailed, Store, basename, join, local_path, scheme, store_for

log = logging.getLogger(__name__)

PROTOCOL = "kogpt2-output/1"
#: The current version's manifest, at the top of the output folder: written last, it is the commit.
COMPLETED_FILE = "COMPLETED"
#: A copy of the manifest inside its version folder (so the version folder alone can be checked).
MANIFEST_FILE = "MANIFEST.json"
#: The run in progress (its work folder and signature), so a rerun finds what to resume.
PENDING_FILE = ".pending"
#: The lease of the run writing now.
LOCK_FILE = ".lock"
#: What a job's output holds (counts, provenance); shards and generations have one.
INFO_FILE = "info.json"
#: A model folder's provenance (data and tokenizer fingerprints, steps, versions).
MODEL_INFO_FILE = "kogpt2.json"
#: Unit records of a job that commits work units (bulk generation), inside its work folder.
UNITS_DIR = "_units"
VERSION_PREFIX = "v-"
WORK_PREFIX = "w-"
#: A lock not renewed for this long is expired: the next run takes it over.
DEFAULT_LEASE_SECONDS = 60.0
#: Committed versions kept after a commit (the new one included).
DEFAULT_KEEP_VERSIONS = 2


# --------------------------------------------------------------------------- errors


class OutputConflictError(ValueError):
    """The output folder holds another run's version or work, and ``--overwrite`` was not given."""


class OutputLockedError(RuntimeError):
    """Another run holds the output folder's lease now (exit status 3: retry later)."""


class LockLostError(RuntimeError):
    """This run's lease was taken over (it was not renewed in time): it must not commit."""


class CommitConflictError(RuntimeError):
    """Another run committed a version after this one started: nothing was replaced."""


class NotCommittedError(ValueError):
    """A folder has no committed version (no ``COMPLETED`` manifest), or it does not match its files."""


# --------------------------------------------------------------------------- small helpers


def _now() -> float:
    return time.time()


def utc_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _norm(doc: Any) -> Any:
    """``doc`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(doc, ensure_ascii=False, sort_keys=True))


def signature_hash(signature: dict[str, Any]) -> str:
    """A short stable hash of a run's signature (what shapes its output)."""
    canon = json.dumps(_norm(signature), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (nested keys dotted), sorted."""
    old, new = _norm(old), _norm(new)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_folder_name(prefix: str = VERSION_PREFIX, t: float | None = None) -> str:
    """``v-20261203T074512Z-1a2b3c``: sortable by creation time, unique per run."""
    stamp = _dt.datetime.fromtimestamp(t or _now(), _dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}{stamp}-{secrets.token_hex(3)}"


def _read_json(store: Store, path: str) -> tuple[Any, str] | None:
    """``(document, generation)`` of a JSON object, or None if absent.

    Raises:
        ValueError: the object is not JSON (named).
    """
    got = store.read_with_info(path)
    if got is None:
        return None
    data, info = got
    try:
        return json.loads(data.decode("utf-8")), info.generation
    except (UnicodeDecodeError, ValueError):
        return _NOT_JSON, info.generation


_NOT_JSON = object()


# --------------------------------------------------------------------------- overlap of inputs and outputs


def _normalize(path: str) -> str:
    """A comparable form: local paths (``file://`` too) absolute with symlinks resolved; URIs without a trailing slash."""
    path = local_path(str(path))
    if scheme(path):
        return path.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(child: str, parent: str) -> bool:
    if child == parent:
        return True
    sep = "/" if scheme(parent) else os.sep
    return child.startswith(parent.rstrip(sep) + sep)


def refuse_output_over_inputs(output: str, inputs: Iterable[str], *, flag: str = "--output") -> None:
    """Refuse an output folder that is, contains or lies inside any input (before anything is written).

    Raises:
        OutputConflictError: naming the output and the input it overlaps.
    """
    out = _normalize(output)
    for item in inputs:
        if not item:
            continue
        inp = _normalize(item)
        if scheme(inp) != scheme(out):
            continue
        if _within(inp, out):
            what = "is" if inp == out else "contains"
        elif _within(out, inp):
            what = "lies inside"
        else:
            continue
        raise OutputConflictError(
            f"{flag} {output} {what} an input of this job ({item}); writing there could destroy it. "
            "Choose an output folder outside every input."
        )


# --------------------------------------------------------------------------- the lease lock


@dataclass(frozen=True)
class LeaseRef:
    """What a pipeline worker needs to renew or check the launcher's lease (picklable)."""

    folder: str
    token: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS


class Lease:
    """An exclusive, expiring lock on an output folder (``OUT/.lock``), local or ``gs://``.

    ``acquire`` creates the lock object only if it is absent (``O_EXCL``-like: a precondition on
    Cloud Storage, a ``flock``-guarded check locally). A lock whose holder stopped renewing it for
    ``lease_seconds`` (by the storage's clock) is taken over by compare-and-swap, so two runs can
    never both take over the same stale lock. ``renew`` and ``release`` act only while the lock
    still holds this run's random token.

    Args:
        folder: the output folder.
        job: what holds it (shown to the runs it refuses).
        lease_seconds: how long the lock lives without a renewal.
    """

    def __init__(self, folder: str, job: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.folder = str(folder).rstrip("/") or "/"
        self.path = join(self.folder, LOCK_FILE)
        self.job = job
        self.lease_seconds = float(lease_seconds)
        self.token = secrets.token_hex(16)
        self.store = store_for(self.folder)
        self.took_over: dict[str, Any] | None = None
        self.held = False
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost: str | None = None
        self.acquired_at = 0.0

    @classmethod
    def from_ref(cls, ref: LeaseRef) -> Lease:
        lease = cls(ref.folder, "", lease_seconds=ref.lease_seconds)
        lease.token, lease.held = ref.token, True
        return lease

    def ref(self) -> LeaseRef:
        return LeaseRef(self.folder, self.token, self.lease_seconds)

    def _doc(self, acquired: float) -> bytes:
        return _json_bytes(
            {
                "protocol": PROTOCOL,
                "token": self.token,
                "job": self.job,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": utc_iso(acquired),
                "renewed": utc_iso(_now()),
                "lease_seconds": self.lease_seconds,
            }
        )

    def acquire(self) -> Lease:
        """Take the lock, or take over an expired one.

        Raises:
            OutputLockedError: a live lease is held by another run (the message names it, its age
                and when it would expire).
        """
        self.store.makedirs(self.folder)
        started = _now()
        for _ in range(8):
            try:
                self.store.write(self.path, self._doc(started), if_generation=ABSENT)
                self.held, self.acquired_at = True, started
                return self
            except PreconditionFailed:
                pass
            got = self.store.read_with_info(self.path)
            if got is None:
                continue  # released in between: try again
            data, info = got
            try:
                holder = dict(json.loads(data.decode("utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError):
                holder = {}
            if holder.get("token") == self.token:  # our own write, whose response was lost and retried
                self.held, self.acquired_at = True, started
                return self
            lease = float(holder.get("lease_seconds") or DEFAULT_LEASE_SECONDS)
            age = max(0.0, _now() - info.updated)
            if age <= lease:
                raise OutputLockedError(lock_message(self.folder, holder, age, lease))
            try:
                self.store.write(self.path, self._doc(started), if_generation=info.generation)
            except PreconditionFailed:
                continue  # renewed or taken over by someone else meanwhile: look again
            self.took_over = {**holder, "expired_seconds_ago": round(age - lease, 1)}
            self.held, self.acquired_at = True, started
            log.warning(
                "took over the expired lock of %s (%s on %s, not renewed for %.0f s)",
                self.folder,
                holder.get("job") or "a run",
                holder.get("host") or "?",
                age,
            )
            return self
        raise OutputLockedError(f"{self.folder}: could not take the lock {self.path} (it keeps changing)")

    def _mine(self) -> tuple[dict[str, Any], str] | None:
        got = _read_json(self.store, self.path)
        if got is None or not isinstance(got[0], dict) or got[0].get("token") != self.token:
            return None
        return got[0], got[1]

    def renew(self) -> None:
        """Extend the lease.

        Raises:
            LockLostError: the lock no longer holds this run's token (it expired and was taken over).
        """
        for _ in range(8):
            mine = self._mine()
            if mine is None:
                self.held = False
                raise LockLostError(
                    f"{self.folder}: this run's lock was taken over by another run (it was not renewed within "
                    f"{self.lease_seconds:.0f} s); this run stops without committing"
                )
            doc, generation = mine
            doc["renewed"] = utc_iso(_now())
            try:
                self.store.write(self.path, _json_bytes(doc), if_generation=generation)
                return
            except PreconditionFailed:
                continue  # renewed by another process of this run (a worker) meanwhile
        raise LockLostError(f"{self.folder}: could not renew the lock")

    def check(self) -> None:
        """Raise :class:`LockLostError` unless the lock still holds this run's token."""
        if self._mine() is None:
            self.held = False
            raise LockLostError(f"{self.folder}: this run's lock was taken over by another run; no commit")

    def release(self) -> None:
        """Remove the lock if it is still this run's (never a successor's)."""
        self.stop_heartbeat()
        if not self.held:
            return
        self.held = False
        for _ in range(8):
            mine = self._mine()
            if mine is None:
                return
            try:
                self.store.delete(self.path, if_generation=mine[1])
                return
            except PreconditionFailed:
                continue
            except OSError as exc:  # the run's outcome stands; the lease expires by itself
                log.warning(
                    "could not remove the lock %s (%s); it expires in %.0f s", self.path, exc, self.lease_seconds
                )
                return

    def start_heartbeat(self, interval: float | None = None) -> None:
        """Renew the lease every ``interval`` seconds (a quarter of the lease) on a daemon thread."""
        if self._heartbeat is not None:
            return
        every = interval or self.lease_seconds / 4
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    self.renew()
                except LockLostError as exc:
                    self.lost = str(exc)
                    log.error("%s", exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat retries
                    log.warning("lock renewal of %s failed (%s); retrying", self.folder, exc)

        self._heartbeat = threading.Thread(target=beat, name=f"lease:{self.folder}", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join(timeout=5)
            self._heartbeat = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_message(folder: str, holder: dict[str, Any], age: float, lease: float) -> str:
    """Why a run is refused: who holds ``folder`` and when its lease would expire."""
    who = holder.get("job") or "another run"
    where = f" on host {holder['host']}" if holder.get("host") else ""
    pid = f" (pid {holder['pid']})" if holder.get("pid") else ""
    return (
        f"{folder} is in use by {who}{where}{pid}, lock renewed {age:.0f} s ago. Wait for it to finish, or "
        f"choose another output folder. If that run died, its lock expires {max(0.0, lease - age):.0f} s from now "
        f"(lease {lease:.0f} s) and the next run takes it over: rerun then."
    )


_LAST_RENEWAL: dict[str, float] = {}


def renew_if_due(ref: LeaseRef | None) -> None:
    """Renew the launcher's lease from a pipeline worker, at most every quarter lease per process.

    A worker doing long work keeps the lease alive even if the launcher is gone (a detached
    Dataflow job). A lost lease raises :class:`LockLostError` (the unit fails; nothing commits).
    """
    if ref is None:
        return
    now = time.monotonic()
    if now - _LAST_RENEWAL.get(ref.token, -1e9) < ref.lease_seconds / 4:
        return
    Lease.from_ref(ref).renew()
    _LAST_RENEWAL[ref.token] = now


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: str


@dataclass(frozen=True)
class Manifest:
    """A committed version: ``COMPLETED`` (and its copy ``MANIFEST.json`` in the version folder).

    Attributes:
        job: ``preprocess``, ``train`` or ``generate``.
        version: 1, 2, ... (one more than the version it replaced).
        folder: the version folder's name inside the output folder.
        committed: UTC time of the commit (ISO 8601).
        run_id: the committing run.
        signature: what shaped the output (inputs, settings, fingerprints).
        files: every file of the version (path relative to the version folder) with size and CRC32C.
        summary: the job's headline figures (counts), for ``kogpt2 status``.
        versions: the committed versions kept, newest first (``{version, folder, committed}``).
    """

    job: str
    version: int
    folder: str
    committed: str
    run_id: str
    signature: dict[str, Any]
    files: dict[str, FileEntry]
    summary: dict[str, Any] = field(default_factory=dict)
    versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def signature_hash(self) -> str:
        return signature_hash(self.signature)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "job": self.job,
            "version": self.version,
            "folder": self.folder,
            "committed": self.committed,
            "run_id": self.run_id,
            "signature": self.signature,
            "signature_hash": self.signature_hash,
            "files": {name: {"size": f.size, "crc32c": f.crc32c} for name, f in sorted(self.files.items())},
            "summary": self.summary,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Manifest:
        """Raises NotCommittedError naming ``where`` when ``doc`` is not one of our manifests."""
        if not isinstance(doc, dict) or doc.get("protocol") != PROTOCOL:
            raise NotCommittedError(
                f"{where} is not a manifest of this protocol ({PROTOCOL}); the folder was written by an older "
                "release or by something else. Rebuild it into a new folder (or the same one with --overwrite)."
            )
        try:
            files = {str(k): FileEntry(int(v["size"]), str(v["crc32c"])) for k, v in doc["files"].items()}
            return cls(
                str(doc["job"]),
                int(doc["version"]),
                str(doc["folder"]),
                str(doc["committed"]),
                str(doc["run_id"]),
                dict(doc["signature"]),
                files,
                dict(doc.get("summary") or {}),
                list(doc.get("versions") or []),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NotCommittedError(f"{where}: malformed manifest ({exc})") from None


def read_manifest(folder: str) -> tuple[Manifest, str] | None:
    """The current version's manifest of an output folder and its generation, or None if nothing is committed.

    Raises:
        NotCommittedError: ``COMPLETED`` exists but is not one of our manifests.
        OSError: storage errors (never taken for "nothing committed").
    """
    store = store_for(folder)
    got = _read_json(store, join(folder, COMPLETED_FILE))
    if got is None:
        return None
    doc, generation = got
    return Manifest.from_json(doc, join(folder, COMPLETED_FILE)), generation


@dataclass(frozen=True)
class Pending:
    """The run in progress in an output folder (``.pending``)."""

    job: str
    work: str  # the work folder's name
    signature: dict[str, Any]
    started: str
    run_id: str
    generation: str = ""

    @property
    def signature_hash(self) -> str:
        return signature_hash(self.signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "job": self.job,
            "work": self.work,
            "signature": self.signature,
            "signature_hash": self.signature_hash,
            "started": self.started,
            "run_id": self.run_id,
        }


def read_pending(folder: str) -> Pending | None:
    store = store_for(folder)
    got = _read_json(store, join(folder, PENDING_FILE))
    if got is None or not isinstance(got[0], dict) or got[0].get("protocol") != PROTOCOL:
        return None
    doc, generation = got
    try:
        return Pending(
            str(doc["job"]),
            str(doc["work"]),
            dict(doc["signature"]),
            str(doc["started"]),
            str(doc["run_id"]),
            generation,
        )
    except (KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Committed:
    """A committed version, as a reader sees it: where its files are and what they should be."""

    folder: str  # the output folder (or the version folder) as given
    root: str  # the version folder holding the files
    manifest: Manifest

    def path(self, name: str) -> str:
        return join(self.root, name)

    def names(self, prefix: str = "", suffix: str = "") -> list[str]:
        """The manifest's file names (relative) starting with ``prefix`` and ending with ``suffix``, sorted."""
        return sorted(n for n in self.manifest.files if n.startswith(prefix) and n.endswith(suffix))

    def read(self, name: str) -> bytes:
        """A file of the version, checked against the manifest (size and CRC32C).

        Raises:
            NotCommittedError: not in the manifest, or it does not match.
        """
        entry = self.manifest.files.get(name)
        if entry is None:
            raise NotCommittedError(f"{self.root}: {name} is not a file of this version")
        data = store_for(self.root).read(self.path(name))
        from kogpt2.storage import crc32c_hex

        if len(data) != entry.size or crc32c_hex(data) != entry.crc32c:
            raise NotCommittedError(
                f"{self.path(name)} does not match the manifest (size or CRC32C): damaged or replaced"
            )
        return data

    def read_json(self, name: str) -> Any:
        return json.loads(self.read(name).decode("utf-8"))


def open_committed(folder: str, *, job: str | None = None, verify: str = "size") -> Committed:
    """The committed version of an output folder (its ``COMPLETED``), or a version folder (its ``MANIFEST.json``).

    Args:
        folder: an output folder, or one of its ``v-...`` folders.
        job: the job that must have written it (``preprocess``, ``train``, ``generate``), or None.
        verify: ``none``; ``size`` (every file's size, and its CRC32C where storage keeps it, as
            Cloud Storage does, at no extra read); ``full`` (read every file and check its CRC32C).

    Raises:
        NotCommittedError: nothing committed (the message says whether a run is in progress or
            failed), another job's output, or files that do not match the manifest.
        OSError: storage errors.
    """
    folder = str(folder).rstrip("/") or "/"
    store = store_for(folder)
    got = read_manifest(folder)
    if got is not None:
        manifest = got[0]
        root = join(folder, manifest.folder)
    else:
        inner = _read_json(store, join(folder, MANIFEST_FILE))
        if inner is None:
            raise NotCommittedError(not_committed_message(folder))
        manifest = Manifest.from_json(inner[0], join(folder, MANIFEST_FILE))
        root = folder  # a version folder (perhaps copied elsewhere): its files are checked below
    if job is not None and manifest.job != job:
        raise NotCommittedError(f"{folder} holds the output of {manifest.job!r}, not of {job!r}")
    if verify != "none":
        problems = verify_files(root, manifest.files, full=verify == "full")
        if problems:
            raise NotCommittedError(
                f"{folder}: version {manifest.version} ({manifest.folder}) does not match its manifest: "
                + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )
    return Committed(folder, root, manifest)


def version_root(folder: str, *, job: str | None = None) -> str:
    """Where a folder's files are: the committed version of an output folder, else the folder itself.

    For readers that accept both outputs of these jobs and plain folders (a pretrained model
    folder, a tokenizer folder). Sizes are checked as in :func:`open_committed`.

    Raises:
        NotCommittedError: the folder has a manifest that does not hold (or is another job's).
    """
    store = store_for(folder)
    if store.exists(join(folder, COMPLETED_FILE)) or store.exists(join(folder, MANIFEST_FILE)):
        return open_committed(folder, job=job).root
    return str(folder)


def verify_files(root: str, files: dict[str, FileEntry], *, full: bool = False) -> list[str]:
    """What differs between ``files`` (name -> size, CRC32C) and storage under ``root``; [] when all match.

    Sizes come from one listing of ``root`` (one request on Cloud Storage, whose listing also
    carries CRC32C); with ``full``, files without a stored CRC32C are read and checksummed.
    """
    store = store_for(root)
    listed = {item.path: item for item in store.list_objects(join(root, ""))}
    problems = []
    for name, entry in sorted(files.items()):
        item = listed.get(join(root, name))
        if item is None:
            problems.append(f"{name} is missing")
            continue
        if item.size != entry.size:
            problems.append(f"{name} has {item.size} bytes, the manifest says {entry.size}")
            continue
        crc = item.crc32c
        if crc is None and full:
            crc = store.checksum(item.path)[1]
        if crc is not None and crc != entry.crc32c:
            problems.append(f"{name} has CRC32C {crc}, the manifest says {entry.crc32c}")
    return problems


def not_committed_message(folder: str) -> str:
    """Why ``folder`` has nothing committed: missing, a run in progress or one that stopped."""
    try:
        pending = read_pending(folder)
    except OSError:
        pending = None
    if pending is not None:
        return (
            f"{folder} has no committed version yet: a {pending.job} run started {pending.started} has not "
            f"committed (it is still running, or it failed or was stopped: see `kogpt2 status {folder}`)"
        )
    store = store_for(folder)
    try:
        anything = store.list_objects(join(folder, ""))
    except OSError:
        anything = []
    if not anything:
        return f"{folder}: no such output folder (nothing there)"
    if any(basename(i.path) == COMPLETED_FILE for i in anything):
        return f"{folder}: its {COMPLETED_FILE} is not a manifest (written by an older release?)"
    return f"{folder} has no {COMPLETED_FILE} manifest: no run committed a version there"


# --------------------------------------------------------------------------- writers


#: What :func:`begin` decided.
NEW, RESUME, ALREADY_COMPLETE = "new", "resume", "already complete"


@dataclass(frozen=True)
class OutputRun:
    """A run's claim on its output folder: where it writes, what it replaces. Picklable for workers.

    Attributes:
        folder: the output folder.
        job: the job's name (``preprocess``, ``train``, ``generate``).
        work: the full path of the folder the run writes into (its future version, or training's
            checkpoint folder).
        signature: what shapes the output.
        action: :data:`NEW`, :data:`RESUME` (an unfinished run with this signature is continued
            in its work folder) or :data:`ALREADY_COMPLETE` (nothing to do).
        base: the generation of ``COMPLETED`` the run started from (:data:`~kogpt2.storage.ABSENT`
            if none): the commit succeeds only if it is still current.
        base_version: that version's number (0 if none).
        base_versions: the versions kept before this run (newest first).
        lease: the run's lease (None for ALREADY_COMPLETE).
        keep_versions: committed versions kept after the commit.
        run_id: this run's id.
        current: the manifest of the committed version (ALREADY_COMPLETE's answer).
    """

    folder: str
    job: str
    work: str
    signature: dict[str, Any]
    action: str
    base: str
    base_version: int
    base_versions: tuple[dict[str, Any], ...] = ()
    lease: LeaseRef | None = None
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    run_id: str = ""
    current: Manifest | None = None

    def path(self, name: str) -> str:
        """A file in the work folder."""
        return join(self.work, name)


def begin(
    folder: str,
    job: str,
    signature: dict[str, Any],
    lease: Lease,
    *,
    overwrite: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    work_prefix: str = VERSION_PREFIX,
    note: str = "",
) -> OutputRun:
    """Decide what a run does with its output folder (holding ``lease``); nothing committed is touched.

    - a run in progress (``.pending``) with the same signature: :data:`RESUME` in its work
      folder (the job decides what it keeps there), unless ``overwrite``;
    - a committed version with the same signature and no ``overwrite``: :data:`ALREADY_COMPLETE`;
    - otherwise a committed version or a run in progress with another signature is refused
      (naming each difference) unless ``overwrite``; then :data:`NEW`: a new work folder, and
      ``.pending`` names it. The previous version stays current until this run commits.

    Raises:
        OutputConflictError: the folder holds another run and ``overwrite`` is off, or files this
            protocol did not write.
        OSError: storage errors.
    """
    folder = str(folder).rstrip("/") or "/"
    store = store_for(folder)
    sig = _norm(signature)
    sig_hash = signature_hash(sig)
    got = _read_json(store, join(folder, COMPLETED_FILE))
    current: Manifest | None = None
    base = ABSENT
    if got is not None:
        base = got[1]
        try:
            current = Manifest.from_json(got[0], join(folder, COMPLETED_FILE))
        except NotCommittedError as exc:
            if not overwrite:
                raise OutputConflictError(f"{exc}{note}") from None
            current = None  # an older layout's marker: replaced (compare-and-swap) at the commit
    pending = read_pending(folder)
    if pending is not None and current is not None and pending.work == current.folder:
        # a run that committed and died before it could forget its .pending: nothing is in progress
        drop_pending(folder, pending)
        pending = None
    lease_ref = lease.ref()
    kept = tuple(current.versions) if current else ()
    common = {
        "folder": folder,
        "job": job,
        "signature": sig,
        "base": base,
        "base_version": current.version if current else 0,
        "base_versions": kept,
        "lease": lease_ref,
        "keep_versions": keep_versions,
        "run_id": lease.token[:12],
        "current": current,
    }
    if pending is not None and pending.signature_hash == sig_hash and pending.job == job and not overwrite:
        return OutputRun(work=join(folder, pending.work), action=RESUME, **common)  # type: ignore[arg-type]
    if current is not None and current.signature_hash == sig_hash and current.job == job and not overwrite:
        return OutputRun(work=join(folder, current.folder), action=ALREADY_COMPLETE, **common)  # type: ignore[arg-type]
    if not overwrite:
        if current is not None:
            diff = differences(current.signature, sig) if current.job == job else [f"job: {current.job} -> {job}"]
            raise OutputConflictError(
                f"output folder {folder} holds version {current.version} of a different run "
                f"({'; '.join(diff[:8])}). Choose another --output, or pass --overwrite to build a new version "
                f"(the current one stays readable until the new one commits){note}."
            )
        if pending is not None:
            diff = differences(pending.signature, sig) if pending.job == job else [f"job: {pending.job} -> {job}"]
            raise OutputConflictError(
                f"output folder {folder} holds an unfinished {pending.job} run started {pending.started} with other "
                f"settings ({'; '.join(diff[:8])}). Rerun that run's command to finish it, or pass --overwrite to "
                f"start this one (the unfinished one is removed when this one commits){note}."
            )
        foreign = [
            i.path
            for i in store.list_objects(join(folder, ""))
            if basename(i.path) not in (LOCK_FILE, store_mutex_name()) and not _is_ours(folder, i.path)
        ]
        if foreign:
            raise OutputConflictError(
                f"output folder {folder} holds {len(foreign)} files this protocol did not write (e.g. "
                f"{foreign[0]}). Choose another --output, or pass --overwrite to build a new version beside them "
                f"(they are left as they are){note}."
            )
    work = new_folder_name(work_prefix)
    started = _now()
    store.write(
        join(folder, PENDING_FILE),
        _json_bytes(Pending(job, work, sig, utc_iso(started), lease.token[:12]).to_json()),
    )
    store.makedirs(join(folder, work))
    return OutputRun(work=join(folder, work), action=NEW, **common)  # type: ignore[arg-type]


def store_mutex_name() -> str:
    from kogpt2.storage import LocalStore

    return LocalStore.MUTEX_FILE


def _is_ours(folder: str, path: str) -> bool:
    rel = path[len(folder.rstrip("/")) + 1 :]
    top = rel.split("/", 1)[0]
    return top in (COMPLETED_FILE, PENDING_FILE, LOCK_FILE) or top.startswith((VERSION_PREFIX, WORK_PREFIX))


def commit(
    run: OutputRun,
    files: Sequence[str],
    *,
    summary: dict[str, Any] | None = None,
    version_folder: str | None = None,
    keep_pending: bool = False,
    remove_strays: bool = True,
) -> Manifest:
    """Commit a run's files as the output folder's new current version.

    Steps: check the lease is still this run's; checksum every file (one listing; CRC32C from
    Cloud Storage's metadata, or by reading local files); write ``MANIFEST.json`` into the
    version folder; write ``COMPLETED`` with a precondition on the generation the run started
    from (the commit); forget ``.pending``; then remove versions beyond ``keep_versions`` and
    abandoned work folders. A retried commit of the same run returns the committed manifest.

    Args:
        run: from :func:`begin`.
        files: the version's files, relative to the version folder (the job lists what it
            wrote; no listing decides what belongs to a version).
        summary: headline figures for ``kogpt2 status``.
        version_folder: the version folder's name when it is not the work folder (training).
        keep_pending: keep ``.pending`` (training stopped by its time budget can be resumed).
        remove_strays: delete files in the version folder that are not in ``files`` (leftovers of
            killed attempts), before checksumming, so the version holds exactly its manifest.

    Raises:
        LockLostError: the lease was taken over: nothing is committed.
        CommitConflictError: another run committed after this one started: nothing is replaced.
        FileNotFoundError: a listed file is missing.
    """
    store = store_for(run.folder)
    name = version_folder or basename(run.work)
    root = join(run.folder, name)
    completed = join(run.folder, COMPLETED_FILE)
    if run.lease is not None:
        Lease.from_ref(run.lease).check()
    now_at = store.info(completed)
    if (now_at.generation if now_at else ABSENT) != run.base:
        got = read_manifest(run.folder)
        if got is not None and got[0].run_id == run.run_id and got[0].folder == name:
            return got[0]  # this very commit, retried
        raise _conflict(run, got, root)
    wanted = sorted(set(files) - {MANIFEST_FILE})
    listed = {i.path: i for i in store.list_objects(join(root, ""))}
    if remove_strays:
        keep = {join(root, n) for n in wanted}
        for path in sorted(set(listed) - keep):
            if basename(path) != store_mutex_name():
                store.delete(path)
    entries: dict[str, FileEntry] = {}
    for rel in wanted:
        item = listed.get(join(root, rel))
        if item is None:
            raise FileNotFoundError(f"{join(root, rel)}: listed for the commit but missing; nothing was committed")
        size, crc = (item.size, item.crc32c) if item.crc32c else store.checksum(item.path)
        entries[rel] = FileEntry(size, crc)
    now = _now()
    entry = {"version": run.base_version + 1, "folder": name, "committed": utc_iso(now)}
    history = [entry, *[v for v in run.base_versions if v.get("folder") != name]][: max(1, run.keep_versions)]
    manifest = Manifest(
        run.job, run.base_version + 1, name, utc_iso(now), run.run_id, run.signature, entries, summary or {}, history
    )
    store.write(join(root, MANIFEST_FILE), _json_bytes(manifest.to_json()))
    try:
        store.write(completed, _json_bytes(manifest.to_json()), if_generation=run.base)
    except PreconditionFailed:
        got = read_manifest(run.folder)
        if got is not None and got[0].run_id == run.run_id and got[0].folder == name:
            return got[0]  # this very commit, retried
        raise _conflict(run, got, root) from None
    log.info("committed %s version %d: %s (%d files)", run.folder, manifest.version, name, len(entries))
    if not keep_pending:
        _forget_pending(store, run)
    try:
        removed = collect_garbage(run.folder, keep={v["folder"] for v in history}, keep_pending=keep_pending)
        if removed:
            log.info("removed %d old or abandoned folders from %s: %s", len(removed), run.folder, ", ".join(removed))
    except Exception as exc:  # noqa: BLE001 - the commit stands; the next commit retries the cleanup
        log.warning(
            "the commit stands, but old versions of %s were not removed (%s); the next commit retries", run.folder, exc
        )
    return manifest


def _conflict(run: OutputRun, got: tuple[Manifest, str] | None, root: str) -> CommitConflictError:
    other = f"version {got[0].version} ({got[0].folder}, {got[0].committed})" if got else "another run's change"
    return CommitConflictError(
        f"{run.folder}: {other} was committed after this run started; this run's output ({root}) is not "
        "committed and the current version is untouched. Rerun to build on the new version."
    )


def _forget_pending(store: Store, run: OutputRun) -> None:
    pending = read_pending(run.folder)
    if pending is not None and join(run.folder, pending.work) == run.work:
        drop_pending(run.folder, pending)


def drop_pending(folder: str, pending: Pending) -> None:
    """Forget ``.pending`` (holding the folder's lease): its run committed, or is abandoned for good."""
    with contextlib.suppress(PreconditionFailed):
        store_for(folder).delete(join(folder, PENDING_FILE), if_generation=pending.generation)


def collect_garbage(folder: str, *, keep: set[str], keep_pending: bool = True) -> list[str]:
    """Remove the version and work folders of ``folder`` that are neither in ``keep`` nor pending.

    Call it only holding the folder's lease, after a commit. A listing error raises (nothing is
    deleted on a guess).

    Returns:
        The names of the folders removed.
    """
    store = store_for(folder)
    pending = read_pending(folder)
    live = set(keep)
    if pending is not None and keep_pending:
        live.add(pending.work)
    names = sorted(
        {
            i.path[len(folder.rstrip("/")) + 1 :].split("/", 1)[0]
            for i in store.list_objects(join(folder, ""))
            if "/" in i.path[len(folder.rstrip("/")) + 1 :]
        }
    )
    removed = []
    for name in names:
        if name.startswith((VERSION_PREFIX, WORK_PREFIX)) and name not in live:
            store.delete_tree(join(folder, name, ""))
            removed.append(name)
    return removed


# --------------------------------------------------------------------------- units of long jobs


def unit_record_path(work: str, unit: str) -> str:
    return join(work, UNITS_DIR, f"{unit}.json")


def commit_unit(
    work: str, unit: str, files: Sequence[str], meta: dict[str, Any], lease: LeaseRef | None = None
) -> None:
    """Commit one work unit: its files (relative to ``work``) are written; record their sizes and CRC32C last.

    Raises:
        LockLostError: the lease was taken over (the record is not written).
    """
    store = store_for(work)
    renew_if_due(lease)
    entries = {}
    for rel in files:
        size, crc = store.checksum(join(work, rel))
        entries[rel] = {"size": size, "crc32c": crc}
    store.write(unit_record_path(work, unit), _json_bytes({"protocol": PROTOCOL, "files": entries, "meta": meta}))


def read_unit(work: str, unit: str) -> dict[str, Any] | None:
    """A committed unit's ``meta``, or None when it is not committed or its files no longer match.

    A unit whose record exists but whose files differ (damaged, or a half-finished rewrite) is
    logged and treated as not committed: the rerun generates it again.
    """
    store = store_for(work)
    got = _read_json(store, unit_record_path(work, unit))
    if got is None:
        return None
    doc = got[0]
    if not isinstance(doc, dict) or doc.get("protocol") != PROTOCOL:
        log.warning("unit %s: unreadable record; generating it again", unit)
        return None
    for rel, entry in dict(doc.get("files") or {}).items():
        path = join(work, rel)
        try:
            size, crc = store.checksum(path)
        except FileNotFoundError:
            log.warning("unit %s: %s is missing; generating the unit again", unit, rel)
            return None
        if size != entry["size"] or crc != entry["crc32c"]:
            log.warning("unit %s: %s does not match its record (size or CRC32C); generating the unit again", unit, rel)
            return None
    return dict(doc.get("meta") or {})


def unit_files(work: str, units: Iterable[str]) -> list[str]:
    """Every file the committed ``units`` recorded (relative to ``work``), plus their records."""
    store = store_for(work)
    out = []
    for unit in units:
        got = _read_json(store, unit_record_path(work, unit))
        if got is None or not isinstance(got[0], dict):
            raise NotCommittedError(f"{work}: unit {unit} has no record")
        out += list(dict(got[0].get("files") or {}))
        out.append(f"{UNITS_DIR}/{unit}.json")
    return out


def expand_folders(patterns: Sequence[str], *, flag: str) -> list[str]:
    """The folders some pattern names: a folder as it is, or a glob over the last path part (``gs://b/data/span-*``).

    Raises:
        FileNotFoundError: a pattern matches no folder (named with the flag).
    """
    import fnmatch

    out: list[str] = []
    for pattern in patterns:
        pattern = local_path(str(pattern)).rstrip("/")
        parent, _, last = pattern.rpartition("/")
        if not any(ch in last for ch in "*?["):
            out.append(pattern)
            continue
        if any(ch in parent for ch in "*?["):
            raise ValueError(f"{flag} {pattern!r}: only the last part of a folder path may be a glob")
        names = [n.rstrip("/") for n in store_for(parent or ".").children(parent or ".") if n.endswith("/")]
        matched = [join(parent, n) for n in sorted(names) if fnmatch.fnmatchcase(n, last)]
        if not matched:
            raise FileNotFoundError(f"{flag} {pattern!r} matches no folder")
        out += matched
    return sorted(dict.fromkeys(out))


# --------------------------------------------------------------------------- status


def status(folder: str) -> dict[str, Any]:
    """What a scheduler needs to know about an output folder; reads only, never writes.

    Returns:
        ``complete`` (a committed version exists), ``current`` (its version, folder, path, job,
        committed time, files, bytes, summary), ``versions`` kept, ``pending`` (a run in
        progress: job, work folder, started), ``lock`` (holder, age, lease, expired).
    """
    folder = str(folder).rstrip("/") or "/"
    store = store_for(folder)
    out: dict[str, Any] = {"folder": folder, "complete": False, "current": None, "pending": None, "lock": None}
    got = read_manifest(folder)
    if got is not None:
        m = got[0]
        out["complete"] = True
        out["current"] = {
            "version": m.version,
            "folder": m.folder,
            "path": join(folder, m.folder),
            "job": m.job,
            "committed": m.committed,
            "files": len(m.files),
            "bytes": m.total_bytes,
            "summary": m.summary,
            "signature_hash": m.signature_hash,
        }
        out["versions"] = m.versions
    pending = read_pending(folder)
    if pending is not None:
        out["pending"] = {
            "job": pending.job,
            "work": pending.work,
            "started": pending.started,
            "run_id": pending.run_id,
        }
    lock = store.read_with_info(join(folder, LOCK_FILE))
    if lock is not None:
        data, info = lock
        try:
            holder = dict(json.loads(data.decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError):
            holder = {}
        age = max(0.0, _now() - info.updated)
        lease = float(holder.get("lease_seconds") or DEFAULT_LEASE_SECONDS)
        out["lock"] = {
            "job": holder.get("job"),
            "host": holder.get("host"),
            "pid": holder.get("pid"),
            "acquired": holder.get("acquired"),
            "age_seconds": round(age, 1),
            "lease_seconds": lease,
            "expired": age > lease,
        }
    return out


def format_status(s: dict[str, Any]) -> str:
    """``kogpt2 status`` as lines a person reads."""
    lines = []
    cur = s["current"]
    if cur:
        lines.append(
            f"{s['folder']}: complete, version {cur['version']} ({cur['job']}, committed {cur['committed']}): "
            f"{cur['files']} files, {cur['bytes']:,} bytes in {cur['path']}"
        )
        if cur["summary"]:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in cur["summary"].items()))
        older = [v for v in s.get("versions") or [] if v.get("folder") != cur["folder"]]
        if older:
            lines.append("  older versions kept: " + ", ".join(f"{v['version']} ({v['folder']})" for v in older))
    else:
        lines.append(f"{s['folder']}: not complete (no committed version)")
    p = s["pending"]
    if p:
        lines.append(f"  run in progress or stopped: {p['job']} started {p['started']} in {p['work']}")
    lk = s["lock"]
    if lk:
        state = (
            f"expired {lk['age_seconds'] - lk['lease_seconds']:.0f} s ago (the next run takes it over)"
            if lk["expired"]
            else f"renewed {lk['age_seconds']:.0f} s ago (lease {lk['lease_seconds']:.0f} s)"
        )
        lines.append(f"  lock: {lk['job'] or '?'} on {lk['host'] or '?'} (pid {lk['pid'] or '?'}), {state}")
    else:
        lines.append("  lock: free")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one run, start to commit


@contextlib.contextmanager
def claimed(
    folder: str,
    job: str,
    signature: dict[str, Any],
    *,
    overwrite: bool = False,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    work_prefix: str = VERSION_PREFIX,
    note: str = "",
    heartbeat: bool = True,
) -> Iterator[OutputRun]:
    """Hold ``folder``'s lease (renewed on a heartbeat) for a run; :func:`begin` inside it; release at the end.

    Raises:
        OutputLockedError: another live run holds the folder (nothing was touched).
        OutputConflictError: see :func:`begin`.
    """
    lease = Lease(folder, job, lease_seconds=lease_seconds)
    lease.acquire()
    try:
        if heartbeat:
            lease.start_heartbeat()
        yield begin(folder, job, signature, lease, overwrite=overwrite, keep_versions=keep_versions,
                    work_prefix=work_prefix, note=note)  # fmt: skip
        if lease.lost:
            raise LockLostError(lease.lost)
    finally:
        lease.release()


def check_keep_versions(value: Any, owner: str) -> None:
    from kogpt2.validate import check_int

    check_int(owner, "keep_versions", value, low=1, note="committed versions kept, the new one included")
