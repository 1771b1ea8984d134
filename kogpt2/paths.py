"""Output-folder safety shared by every command: never write over what a job reads.

Pure path logic plus a small lock file; no TensorFlow, no Beam, so both the library
and the pipelines use it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

LOCK_FILE = ".lock"


def _scheme(path: str) -> str:
    head, sep, _ = path.partition("://")
    return head.lower() if sep else ""


def _normalize(path: str) -> str:
    """A comparable form: local paths made absolute with symlinks resolved, URIs without a trailing slash."""
    if _scheme(path):
        return path.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies inside it (both normalized)."""
    if child == parent:
        return True
    sep = "/" if _scheme(parent) else os.sep
    return child.startswith(parent.rstrip(sep) + sep)


def refuse_output_over_inputs(output: str, inputs: Iterable[str], *, flag: str = "--output") -> None:
    """Refuse an output folder that is, contains or lies inside any input.

    A job may delete or rewrite files in its output folder (``--overwrite``, a rerun), so an
    output that overlaps an input (corpus files, tokenizer, model folder, seed files) could
    destroy what the job reads. Checked before anything is deleted.

    Args:
        output: the output folder.
        inputs: input files and folders (already expanded from globs).
        flag: the flag name shown in the error.

    Raises:
        ValueError: naming the output and the input it overlaps.
    """
    out = _normalize(output)
    for item in inputs:
        if not item:
            continue
        inp = _normalize(item)
        if _scheme(inp) != _scheme(out):
            continue
        if _within(inp, out):
            what = "is" if inp == out else "contains"
            raise ValueError(
                f"{flag} {output} {what} an input of this job ({item}); writing there could destroy it. "
                f"Choose an output folder outside every input."
            )
        if _within(out, inp):
            raise ValueError(
                f"{flag} {output} lies inside an input of this job ({item}); writing there could destroy it. "
                f"Choose an output folder outside every input."
            )


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on a local output folder: ``.lock`` created with ``O_EXCL``.

    The file records the holder's pid, host and start time. A lock left by a dead
    process on this host is taken over (with a note in the returned ``took_over``); a
    lock held by a live process, or by another host, is refused with both named.

    Use as a context manager; the lock file is removed on exit.
    """

    def __init__(self, folder: str, *, job: str = "") -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.job = job
        self.took_over: dict[str, Any] | None = None
        self._held = False

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return dict(json.load(f))
        except (OSError, ValueError, TypeError):
            return {}

    def acquire(self) -> FolderLock:
        """Take the lock.

        Raises:
            OutputLockedError: a live run (on this host or another) holds it.
        """
        os.makedirs(self.folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "job": self.job}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == me["host"]
                pid = holder.get("pid")
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    self.took_over = holder
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                if not holder:  # being written by its holder right now, or unreadable
                    time.sleep(0.2)
                    holder = self._holder()
                raise OutputLockedError(
                    f"{self.folder} is in use by another run ({holder.get('job') or 'a job'}, pid "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, lock file {self.path}). "
                    "Wait for it to finish, or choose another output folder. If that run is dead and on "
                    "another host, delete the lock file."
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise OutputLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
