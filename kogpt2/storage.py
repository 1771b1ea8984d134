"""Objects on any storage the jobs write to: a local disk, Cloud Storage, or another filesystem.

The output protocol (:mod:`kogpt2.outputs`) needs four things that plain file APIs do not give
on object storage, and this module gives them the same way everywhere:

- **atomic single-object writes**: a reader sees the old object or the whole new one. Locally a
  write goes to a temporary name, is fsynced, renamed into place and the folder fsynced; on
  ``gs://`` one upload is one object generation.
- **conditional writes** (compare-and-swap): ``write(path, data, if_generation=g)`` succeeds only
  if the object is still at generation ``g``; ``if_generation=ABSENT`` only if it does not exist.
  On ``gs://`` these are Cloud Storage's ``ifGenerationMatch`` preconditions (``0`` = absent);
  locally a ``flock`` held around read-compare-write (works across processes and containers that
  share the disk). On other filesystems (``ram://``, ``s3://`` through Beam, ...) the check is a
  read before the write: advisory only, said so in :attr:`Store.atomic_cas`.
- **checksums**: size and CRC32C of an object, from Cloud Storage's metadata without a download,
  or by reading a local file once.
- **errors are errors**: a listing or read that fails raises; nothing reports "empty" for
  "unknown". Cloud Storage calls go through google-cloud-storage, which retries transient
  errors (429, 5xx, connection resets) with backoff before raising.

Nothing here imports TensorFlow unless a path needs it (``ram://``), so preprocessing workers
stay light.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

#: ``if_generation`` value meaning "only if the object does not exist" (Cloud Storage's ``0``).
ABSENT = "0"
#: Bytes read at a time when checksumming a local file.
_CHUNK = 4 << 20


class PreconditionFailed(Exception):
    """A conditional write or delete found the object at another generation (someone else changed it)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What storage says about one object.

    Attributes:
        path: its full path (``/abs/file`` or ``gs://bucket/name``).
        size: bytes.
        generation: an opaque token that changes with every write (Cloud Storage's generation;
            locally inode, modification time and size), for :meth:`Store.write` preconditions.
        updated: when it was last written, seconds since the epoch, by the storage's clock.
        crc32c: CRC32C of the content as 8 hex digits when storage knows it without a read
            (Cloud Storage), else None (see :meth:`Store.checksum`).
    """

    path: str
    size: int
    generation: str
    updated: float
    crc32c: str | None = None


def scheme(path: str) -> str:
    """``gs``, ``ram``, ... or ``""`` for a local path (``file://`` URLs are local paths)."""
    head, sep, _ = str(path).partition("://")
    head = head.lower() if sep else ""
    return "" if head == "file" else head


def local_path(path: str) -> str:
    """A ``file://`` URL as a plain absolute path; other paths unchanged."""
    path = str(path)
    if path.lower().startswith("file://"):
        return os.path.abspath(path[len("file://") :] or "/")
    return path


def join(folder: str, *names: str) -> str:
    """``folder/name/...`` for local paths and URLs alike (no normalization of ``..``)."""
    out = str(folder)
    for name in names:
        out = out.rstrip("/") + "/" + name.lstrip("/") if out else name
    return out


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def crc32c_hex(data: bytes, value: int = 0) -> str:
    """CRC32C of ``data`` (continuing ``value``) as 8 hex digits."""
    import google_crc32c

    return f"{google_crc32c.extend(value, data):08x}"


class Store:
    """Operations on objects under one scheme. Use :func:`store_for` to get one for a path."""

    #: True when :meth:`write` / :meth:`delete` preconditions are checked atomically by the storage.
    atomic_cas = True

    def info(self, path: str) -> ObjectInfo | None:
        """The object's metadata, or None if it does not exist."""
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        """The object's content. Raises FileNotFoundError when it does not exist."""
        raise NotImplementedError

    def read_with_info(self, path: str) -> tuple[bytes, ObjectInfo] | None:
        """Content and metadata of one generation of the object (for read-modify-write), or None."""
        raise NotImplementedError

    def write(self, path: str, data: bytes, *, if_generation: str | None = None) -> ObjectInfo:
        """Write ``data`` as the whole object, atomically.

        Args:
            path: the object.
            data: its new content.
            if_generation: only if the object is at this generation; :data:`ABSENT`: only if
                it does not exist. None: unconditionally.

        Raises:
            PreconditionFailed: the precondition did not hold; nothing was written.
        """
        raise NotImplementedError

    def delete(self, path: str, *, if_generation: str | None = None) -> None:
        """Delete one object; a missing object is fine unless ``if_generation`` is given.

        Raises:
            PreconditionFailed: ``if_generation`` given and the object is not at it (or missing).
        """
        raise NotImplementedError

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose path starts with ``prefix`` (recursively), sorted by path.

        A prefix ending in ``/`` lists a folder. Raises on any error: an empty result means empty.
        """
        raise NotImplementedError

    def children(self, folder: str) -> list[str]:
        """Names directly in ``folder``: files as they are, sub-folders ending in ``/``; sorted. Errors raise."""
        base = join(folder, "")
        names = {
            i.path[len(base) :].split("/", 1)[0] + ("/" if "/" in i.path[len(base) :] else "")
            for i in self.list_objects(base)
        }
        return sorted(names)

    def checksum(self, path: str) -> tuple[int, str]:
        """``(size, CRC32C hex)`` of the object (from metadata where storage keeps it, else by reading it)."""
        info = self.info(path)
        if info is None:
            raise FileNotFoundError(path)
        if info.crc32c is not None:
            return info.size, info.crc32c
        value, size = 0, 0
        import google_crc32c

        with self.open_read(path) as f:
            while chunk := f.read(_CHUNK):
                value = google_crc32c.extend(value, chunk)
                size += len(chunk)
        return size, f"{value:08x}"

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file to read the object from."""
        yield io.BytesIO(self.read(path))

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file whose content becomes the object when the block ends without an error.

        A failed or killed writer leaves the object as it was.
        """
        buffer = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 - closed below
        try:
            yield buffer  # type: ignore[misc]
            buffer.seek(0)
            self.write(path, buffer.read())
        finally:
            buffer.close()

    def exists(self, path: str) -> bool:
        return self.info(path) is not None

    def makedirs(self, folder: str) -> None:
        """Create ``folder`` where folders exist (local disks); a no-op on object stores."""

    def delete_tree(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a folder: end it with ``/``); returns how many."""
        items = self.list_objects(prefix)
        for item in items:
            self.delete(item.path)
        return len(items)


# --------------------------------------------------------------------------- local disks


class LocalStore(Store):
    """A local (or network-mounted) disk: ``os`` calls, fsync before every rename, ``flock`` for CAS."""

    #: The file each folder's compare-and-swap holds a ``flock`` on (never deleted: removing a
    #: lock file while another process waits on it would break mutual exclusion).
    MUTEX_FILE = ".kogpt2-cas"

    def info(self, path: str) -> ObjectInfo | None:
        path = local_path(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if not os.path.isfile(path):
            return None
        return ObjectInfo(path, st.st_size, _local_generation(st), st.st_mtime)

    def read(self, path: str) -> bytes:
        with open(local_path(path), "rb") as f:
            return f.read()

    def read_with_info(self, path: str) -> tuple[bytes, ObjectInfo] | None:
        path = local_path(path)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        return data, ObjectInfo(path, st.st_size, _local_generation(st), st.st_mtime)

    @contextlib.contextmanager
    def _mutex(self, path: str) -> Iterator[None]:
        import fcntl

        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, self.MUTEX_FILE), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _check(self, path: str, if_generation: str) -> None:
        current = self.info(path)
        if if_generation == ABSENT:
            if current is not None:
                raise PreconditionFailed(f"{path} exists (generation {current.generation})")
        elif current is None or current.generation != if_generation:
            raise PreconditionFailed(
                f"{path} is at generation {current.generation if current else 'absent'}, not {if_generation}"
            )

    def write(self, path: str, data: bytes, *, if_generation: str | None = None) -> ObjectInfo:
        path = local_path(path)
        if if_generation is None:
            _write_local_atomic(path, data)
        else:
            with self._mutex(path):
                self._check(path, if_generation)
                _write_local_atomic(path, data)
        info = self.info(path)
        assert info is not None
        return info

    def delete(self, path: str, *, if_generation: str | None = None) -> None:
        path = local_path(path)
        if if_generation is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return
        with self._mutex(path):
            self._check(path, if_generation)
            os.remove(path)
            _fsync_folder(os.path.dirname(path))

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        prefix = local_path(prefix)
        if prefix.endswith("/"):
            top, name_prefix = prefix.rstrip("/") or "/", ""
        else:
            top, name_prefix = os.path.dirname(prefix) or ".", os.path.basename(prefix)
        if not os.path.isdir(top):
            if os.path.exists(top):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", top)
            return []
        out: list[ObjectInfo] = []

        def fail(exc: OSError) -> None:
            raise exc

        for entry in sorted(os.listdir(top)):
            if not entry.startswith(name_prefix) or entry == self.MUTEX_FILE:
                continue
            full = os.path.join(top, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                for root, dirs, files in os.walk(full, onerror=fail):
                    dirs.sort()
                    for name in sorted(files):
                        if name != self.MUTEX_FILE:
                            item = self.info(os.path.join(root, name))
                            if item is not None:
                                out.append(item)
            else:
                item = self.info(full)
                if item is not None:
                    out.append(item)
        return sorted(out, key=lambda i: i.path)

    def children(self, folder: str) -> list[str]:
        folder = local_path(folder)
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", folder)
            return []
        return sorted(
            n + ("/" if os.path.isdir(os.path.join(folder, n)) else "")
            for n in os.listdir(folder)
            if n != self.MUTEX_FILE
        )

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[IO[bytes]]:
        with open(local_path(path), "rb") as f:
            yield f

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        path = local_path(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}.{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_folder(folder)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def makedirs(self, folder: str) -> None:
        os.makedirs(local_path(folder), exist_ok=True)

    def delete_tree(self, prefix: str) -> int:
        import shutil

        prefix = local_path(prefix)
        if prefix.endswith("/") and os.path.isdir(prefix):
            n = sum(len(files) for _, _, files in os.walk(prefix))
            shutil.rmtree(prefix)
            return n
        return super().delete_tree(prefix)


def _local_generation(st: os.stat_result) -> str:
    # Every write is a new file renamed into place: a new inode and a new change time.
    return f"{st.st_ino}.{st.st_ctime_ns}.{st.st_mtime_ns}.{st.st_size}"


def _fsync_folder(folder: str) -> None:
    """Make a rename or delete in ``folder`` durable (a crash after it cannot undo it)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_folder(folder)


# --------------------------------------------------------------------------- Cloud Storage


_GCS_CLIENT: dict[int, Any] = {}
_GCS_LOCK = threading.Lock()


def gcs_client() -> Any:
    """One google-cloud-storage client per process (honours ``STORAGE_EMULATOR_HOST``).

    Raises:
        ImportError: google-cloud-storage is missing (install ``kogpt2-pipeline[dataflow]``).
    """
    pid = os.getpid()
    with _GCS_LOCK:
        if pid not in _GCS_CLIENT:
            try:
                from google.cloud import storage  # type: ignore[attr-defined]
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "gs:// outputs need google-cloud-storage: pip install 'kogpt2-pipeline[dataflow]' "
                    "(apache-beam[gcp])"
                ) from exc
            _GCS_CLIENT.clear()  # a forked child must not reuse its parent's connections
            _GCS_CLIENT[pid] = storage.Client()
        return _GCS_CLIENT[pid]


def split_gcs(path: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> ``(bucket, name)``."""
    rest = str(path)[len("gs://") :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ValueError(f"{path}: not a gs://bucket/object path")
    return bucket, name


class GcsStore(Store):
    """Cloud Storage through google-cloud-storage: generation preconditions, CRC32C from metadata."""

    def _blob(self, path: str, generation: int | None = None) -> Any:
        bucket, name = split_gcs(path)
        return gcs_client().bucket(bucket).blob(name, generation=generation)

    @staticmethod
    def _info(blob: Any) -> ObjectInfo:
        crc = base64.b64decode(blob.crc32c).hex() if blob.crc32c else None
        updated = blob.updated.timestamp() if blob.updated is not None else time.time()
        return ObjectInfo(
            f"gs://{blob.bucket.name}/{blob.name}", int(blob.size or 0), str(blob.generation), updated, crc
        )

    def info(self, path: str) -> ObjectInfo | None:
        bucket, name = split_gcs(path)
        blob = gcs_client().bucket(bucket).get_blob(name)
        return None if blob is None else self._info(blob)

    def read(self, path: str) -> bytes:
        from google.api_core import exceptions

        try:
            return bytes(self._blob(path).download_as_bytes())
        except exceptions.NotFound:
            raise FileNotFoundError(path) from None

    def read_with_info(self, path: str) -> tuple[bytes, ObjectInfo] | None:
        from google.api_core import exceptions

        info = self.info(path)
        if info is None:
            return None
        try:  # that very generation, even if the object changes in between
            data = bytes(self._blob(path, generation=int(info.generation)).download_as_bytes())
        except exceptions.NotFound:
            return self.read_with_info(path)  # replaced between the two calls: read the new one
        return data, info

    def write(self, path: str, data: bytes, *, if_generation: str | None = None) -> ObjectInfo:
        from google.api_core import exceptions

        blob = self._blob(path)
        kwargs = {} if if_generation is None else {"if_generation_match": int(if_generation)}
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", **kwargs)
        except exceptions.PreconditionFailed as exc:
            raise PreconditionFailed(f"{path}: {exc}") from None
        return self._info(blob)

    def delete(self, path: str, *, if_generation: str | None = None) -> None:
        from google.api_core import exceptions

        blob = self._blob(path)
        try:
            if if_generation is None:
                blob.delete()
            else:
                blob.delete(if_generation_match=int(if_generation))
        except exceptions.NotFound:
            if if_generation is not None:
                raise PreconditionFailed(f"{path}: gone") from None
        except exceptions.PreconditionFailed as exc:
            raise PreconditionFailed(f"{path}: {exc}") from None

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        bucket, name = split_gcs(prefix)
        blobs = gcs_client().list_blobs(bucket, prefix=name)
        return sorted((self._info(b) for b in blobs if not b.name.endswith("/")), key=lambda i: i.path)

    def children(self, folder: str) -> list[str]:
        bucket, name = split_gcs(join(folder, ""))
        pages = gcs_client().list_blobs(bucket, prefix=name, delimiter="/")
        files = [b.name[len(name) :] for b in pages if b.name != name]  # iterating fills .prefixes
        folders = [p[len(name) :] for p in pages.prefixes]
        return sorted(set(files) | set(folders))

    @contextlib.contextmanager
    def open_read(self, path: str) -> Iterator[IO[bytes]]:
        from google.api_core import exceptions

        try:
            with self._blob(path).open("rb") as f:
                yield f
        except exceptions.NotFound:
            raise FileNotFoundError(path) from None

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryFile() as buffer:
            yield buffer  # type: ignore[misc]
            buffer.seek(0)
            self._blob(path).upload_from_file(buffer, content_type="application/octet-stream")


# --------------------------------------------------------------------------- other filesystems


class FileSystemsStore(Store):
    """Any other filesystem Beam knows (``s3://``, ``hdfs://``, ``azfs://``): conditions are advisory."""

    atomic_cas = False

    def info(self, path: str) -> ObjectInfo | None:
        from apache_beam.io.filesystems import FileSystems

        found = FileSystems.match([path])[0].metadata_list
        for m in found:
            if m.path == path:
                mtime = float(getattr(m, "last_updated_in_seconds", 0) or 0)
                return ObjectInfo(path, int(m.size_in_bytes), f"{mtime}.{m.size_in_bytes}", mtime)
        return None

    def read(self, path: str) -> bytes:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        if self.info(path) is None:
            raise FileNotFoundError(path)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return bytes(f.read())

    def read_with_info(self, path: str) -> tuple[bytes, ObjectInfo] | None:
        info = self.info(path)
        if info is None:
            return None
        return self.read(path), info

    def write(self, path: str, data: bytes, *, if_generation: str | None = None) -> ObjectInfo:
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        if if_generation is not None:
            _advisory_check(self, path, if_generation)
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        info = self.info(path)
        assert info is not None
        return info

    def delete(self, path: str, *, if_generation: str | None = None) -> None:
        from apache_beam.io.filesystems import FileSystems

        if if_generation is not None:
            _advisory_check(self, path, if_generation)
        if self.info(path) is not None:
            FileSystems.delete([path])

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        from apache_beam.io.filesystems import FileSystems

        pattern = prefix + "**" if prefix.endswith("/") else prefix + "*"
        found = FileSystems.match([pattern])[0].metadata_list
        return sorted(
            (
                ObjectInfo(m.path, int(m.size_in_bytes), "", float(getattr(m, "last_updated_in_seconds", 0) or 0))
                for m in found
                if not m.path.endswith("/")
            ),
            key=lambda i: i.path,
        )


class GfileStore(Store):
    """Filesystems only TensorFlow knows (``ram://`` in tests): conditions are advisory."""

    atomic_cas = False

    @staticmethod
    def _gfile() -> Any:
        from kogpt2.tf_setup import import_tf

        return import_tf().io.gfile

    def info(self, path: str) -> ObjectInfo | None:
        gfile = self._gfile()
        if not gfile.exists(path) or gfile.isdir(path):
            return None
        st = gfile.stat(path)
        mtime = float(st.mtime_nsec) / 1e9 if st.mtime_nsec else time.time()
        data = self.read(path)  # small objects only use generations; ram:// has no better token
        return ObjectInfo(path, int(st.length), f"{st.length}.{crc32c_hex(data)}.{st.mtime_nsec}", mtime)

    def read(self, path: str) -> bytes:
        gfile = self._gfile()
        if not gfile.exists(path):
            raise FileNotFoundError(path)
        with gfile.GFile(path, "rb") as f:
            return bytes(f.read())

    def read_with_info(self, path: str) -> tuple[bytes, ObjectInfo] | None:
        info = self.info(path)
        return None if info is None else (self.read(path), info)

    def write(self, path: str, data: bytes, *, if_generation: str | None = None) -> ObjectInfo:
        gfile = self._gfile()
        if if_generation is not None:
            _advisory_check(self, path, if_generation)
        folder = path.rsplit("/", 1)[0]
        gfile.makedirs(folder)
        tmp = f"{folder}/.tmp-{basename(path)}.{uuid.uuid4().hex[:12]}"
        with gfile.GFile(tmp, "wb") as f:
            f.write(data)
        gfile.rename(tmp, path, overwrite=True)
        info = self.info(path)
        assert info is not None
        return info

    def delete(self, path: str, *, if_generation: str | None = None) -> None:
        gfile = self._gfile()
        if if_generation is not None:
            _advisory_check(self, path, if_generation)
        if gfile.exists(path):
            gfile.remove(path)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        gfile = self._gfile()
        top = prefix.rstrip("/") if prefix.endswith("/") else prefix.rsplit("/", 1)[0]
        if not gfile.exists(top):
            return []
        out = []
        for root, _, files in gfile.walk(top):
            for name in files:
                full = join(root, name)
                if full.startswith(prefix):
                    item = self.info(full)
                    if item is not None:
                        out.append(item)
        return sorted(out, key=lambda i: i.path)

    def makedirs(self, folder: str) -> None:
        self._gfile().makedirs(folder)

    def delete_tree(self, prefix: str) -> int:
        gfile = self._gfile()
        if prefix.endswith("/") and gfile.isdir(prefix.rstrip("/")):
            n = len(self.list_objects(prefix))
            gfile.rmtree(prefix.rstrip("/"))  # folders too: ram:// keeps empty ones
            return n
        return super().delete_tree(prefix)


def _advisory_check(store: Store, path: str, if_generation: str) -> None:
    current = store.info(path)
    if if_generation == ABSENT:
        if current is not None:
            raise PreconditionFailed(f"{path} exists")
    elif current is None or current.generation != if_generation:
        raise PreconditionFailed(f"{path} changed")


_STORES: dict[str, Store] = {}


def store_for(path: str) -> Store:
    """The :class:`Store` for ``path``'s scheme: local disk, ``gs://``, TensorFlow-only (``ram://``), or Beam's."""
    kind = scheme(path)
    if kind not in _STORES:
        if kind == "":
            _STORES[kind] = LocalStore()
        elif kind == "gs":
            _STORES[kind] = GcsStore()
        elif kind == "ram":
            _STORES[kind] = GfileStore()
        else:
            _STORES[kind] = FileSystemsStore()
    return _STORES[kind]
