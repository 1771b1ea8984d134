"""What every pipeline shares: Beam options and runner choice, output folders, JSON files.

Beam's DirectRunner first tries the Prism runner, which downloads a binary on first
use; on an offline machine that stalls before falling back. :func:`create_pipeline`
runs "direct" pipelines on Beam's FnApiRunner (what DirectRunner falls back to),
which honours ``--direct_num_workers`` and ``--direct_running_mode``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from kogpt2.folders import COMPLETED_FILE, RUN_FILE

log = logging.getLogger(__name__)

DIRECT_RUNNERS = {None, "", "DirectRunner", "direct", "FnApiRunner"}


class OutputConflictError(RuntimeError):
    """The output folder holds files of a different run."""


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options from the arguments our parser did not consume.

    ``save_main_session`` is off: DoFns import what they need, so workers never unpickle
    the launcher's globals.
    """
    options = PipelineOptions(list(beam_args))
    options.view_as(SetupOptions).save_main_session = False
    return options


def is_direct(options: PipelineOptions) -> bool:
    """True when the pipeline runs locally (no runner named, or the DirectRunner)."""
    return options.view_as(StandardOptions).runner in DIRECT_RUNNERS


def create_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A ``beam.Pipeline`` that never waits on a Prism download for local runs."""
    if is_direct(options):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


#: Container allocations (net) between two young-generation collections while a job runs (Python's
#: default is 700). The hot path holds numpy arrays and bytes, which the collector does not track.
GC_YOUNG_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Put every object alive now out of the cyclic garbage collector's reach, and collect less often.

    A Beam job imports hundreds of thousands of long-lived objects (Beam, numpy, pyarrow, the
    pipeline graph): without :func:`gc.freeze`, every full collection during the run walks them
    all again, and the interpreter walks them once more at exit. Measured on preprocessing the
    review corpus (``docs/BENCHMARKS.md``): collections took 1.25 s of a 14 s run and 0.6 s more at
    exit; frozen, with :data:`GC_YOUNG_THRESHOLD`, 0.3 s. For a worker process
    (:func:`freeze_worker_heap`) and a command's exit; around a pipeline run in a process that
    goes on, use :func:`frozen_heap`.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


#: The module Beam's worker processes run (multi-process DirectRunner, Dataflow's SDK container).
SDK_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"


def freeze_worker_heap() -> None:
    """:func:`freeze_heap` in a Beam SDK worker process (a DoFn's ``setup``); nothing elsewhere.

    A worker process lives for its DoFns, so what it has loaded by then stays. In the process
    that runs the pipeline in memory, :func:`frozen_heap` around the run does it instead (and
    gives the collector back afterwards).
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == SDK_WORKER_MAIN:
        freeze_heap()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """:func:`freeze_heap` for the duration of the block, then the collector as it was.

    The pipeline's objects frozen here become garbage when it ends: unfrozen, they are collected.
    """
    threshold = gc.get_threshold()
    freeze_heap()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def join(folder: str, name: str) -> str:
    """Join a path in any Beam filesystem (local, ``gs://``, ...)."""
    return FileSystems.join(folder, name)


TEMP_PREFIX = ".tmp-"


def temp_path(path: str) -> str:
    """A unique temporary name beside ``path`` (``.tmp-<name>.<random>``), never matched by output globs."""
    import uuid

    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    return f"{folder}/{TEMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}" if folder else f"{TEMP_PREFIX}{name}"


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place.

    A reader (or a rerun) sees the old file or the whole new one, never a part.
    """
    tmp = temp_path(path)
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    commit_temp(tmp, path)


def commit_temp(tmp: str, path: str) -> None:
    """Rename a finished temporary file into place (replacing ``path`` if it exists)."""
    if FileSystems.get_scheme(path) in (None, "file"):
        import os

        os.replace(tmp, path)  # atomic on POSIX, replaces
        return
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file through Beam filesystems, atomically."""
    write_atomic(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    """Read a UTF-8 text file through Beam filesystems."""
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def copy_file(source: str, destination: str) -> None:
    """Copy one file between any Beam filesystems (local, ``gs://``, ...)."""
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src:
        data = src.read()
    with FileSystems.create(destination, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        dst.write(data)


_LOCAL_COPIES: dict[str, str] = {}


def local_copy(path: str) -> str:
    """A local path holding ``path``: itself when local, else a copy made once per process.

    Remote files (``gs://.../tokenizer.spiece``) and folders (``gs://.../model``: the files
    directly in it) are copied into a temporary folder, because tokenizers and TensorFlow
    models are read from local files.
    """
    if FileSystems.get_scheme(path) in (None, "file"):
        return path
    if path not in _LOCAL_COPIES:
        import os
        import tempfile

        target = tempfile.mkdtemp(prefix="kogpt2-")
        inside = [p for p in list_folder(path.rstrip("/")) if not p.endswith("/")]
        if inside:  # a folder
            for remote in inside:
                copy_file(remote, os.path.join(target, remote.rstrip("/").rsplit("/", 1)[-1]))
            _LOCAL_COPIES[path] = target
        else:
            local = os.path.join(target, path.rstrip("/").rsplit("/", 1)[-1])
            copy_file(path, local)
            _LOCAL_COPIES[path] = local
        log.info("copied %s to %s", path, _LOCAL_COPIES[path])
    return _LOCAL_COPIES[path]


def write_json(path: str, data: Any) -> None:
    """Write pretty, key-sorted UTF-8 JSON through Beam filesystems."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def list_folder(folder: str) -> list[str]:
    """Paths of the files directly in ``folder`` (empty if it does not exist)."""
    pattern = join(folder, "*")
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # a missing local folder raises on some filesystems
        return []
    return sorted(m.path for m in result.metadata_list)


def same_run(
    folder: str, existing: Sequence[str], signature: dict[str, Any], *, overwrite: bool, note: str = ""
) -> bool:
    """Whether the non-empty ``folder`` (holding ``existing``) holds a run with ``signature`` (its ``run.json``).

    Raises:
        OutputConflictError: it holds another run's (or unknown) files and ``overwrite`` is off;
            the message names what differs, then ``note``.
    """
    run_path = join(folder, RUN_FILE)
    previous = None
    if run_path in existing or FileSystems.exists(run_path):
        try:
            previous = json.loads(read_text(run_path))
        except (OSError, ValueError):
            previous = None
    same = previous == json.loads(json.dumps(signature))
    if not same and not overwrite:
        what = "a different run" if previous is not None else "files not written by this pipeline"
        differ = ""
        if isinstance(previous, dict):
            keys = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
            differ = f"; it differs in {', '.join(keys)}"
        raise OutputConflictError(
            f"output folder {folder} already holds {what} ({len(existing)} files{differ}). "
            f"Choose another --output, or pass --overwrite to replace its contents{note}."
        )
    return same


def prepare_output(folder: str, signature: dict[str, Any], *, overwrite: bool = False, resume: bool = False) -> str:
    """Make ``folder`` ready for a run with ``signature``; never mix two runs' files.

    - empty or missing: created; ``run.json`` records the signature.
    - holding a run with the same signature: with ``resume``, its committed files are
      kept (the run skips them) and only leftover temporary files are removed; without,
      its files are removed, so the rerun rewrites them (reruns reproduce).
    - holding anything else: :class:`OutputConflictError`, unless ``overwrite``.

    A lock file (``.lock``) is never counted as the folder's content.

    Args:
        folder: output folder (any Beam filesystem).
        signature: JSON-able description of inputs and flags that define the run.
        overwrite: remove whatever the folder holds.
        resume: keep a same-signature run's files.

    Returns:
        ``"new"``, ``"resume"`` (a same-signature run's files kept) or ``"replace"``.

    Raises:
        OutputConflictError: the folder holds a different run's files.
    """
    from kogpt2.paths import LOCK_FILE

    existing = [p for p in list_folder(folder) if p.rstrip("/").rsplit("/", 1)[-1] != LOCK_FILE]
    same = False
    if existing:
        same = same_run(folder, existing, signature, overwrite=overwrite)
    if existing and same and resume:
        leftovers = [p for p in existing if p.rstrip("/").rsplit("/", 1)[-1].startswith(TEMP_PREFIX)]
        if leftovers:
            FileSystems.delete(leftovers)
        return "resume"
    if existing:
        log.info("clearing %d files of the previous run in %s", len(existing), folder)
        FileSystems.delete(existing)
    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    write_json(join(folder, RUN_FILE), signature)
    return "replace" if existing else "new"


def file_sizes(paths: Sequence[str]) -> dict[str, list[int]]:
    """``path -> [size in bytes, last modified (s)]`` per file: what changes when a file is edited."""
    out: dict[str, list[int]] = {}
    for m in FileSystems.match(list(paths)):
        for meta in m.metadata_list:
            out[meta.path] = [int(meta.size_in_bytes), int(getattr(meta, "last_updated_in_seconds", 0) or 0)]
    return out


def check_beam_args(beam_args: Sequence[str], ours: Sequence[str]) -> None:
    """Refuse leftover arguments that Beam does not know either (Beam would drop them with a warning).

    Args:
        beam_args: what our parser did not consume.
        ours: our option strings, for "did you mean".

    Raises:
        ValueError: naming each unknown option (and the closest of ours).
    """
    from kogpt2.flags import refuse_lookalikes

    options = PipelineOptions(list(beam_args))
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    flagged = [a for a in beam_args if a.startswith("--") and a.split("=", 1)[0][2:].replace("-", "_") in unknown]
    refuse_lookalikes(flagged, ours)


def mark_completed(folder: str) -> None:
    """Write the ``COMPLETED`` marker; call it last, after every other output."""
    write_text(join(folder, COMPLETED_FILE), "")


def is_completed(folder: str) -> bool:
    """True when ``folder`` holds a ``COMPLETED`` marker."""
    return bool(FileSystems.exists(join(folder, COMPLETED_FILE)))


def match_globs(patterns: Sequence[str], *, flag: str = "--input") -> dict[str, tuple[int, int]]:
    """The files (any Beam filesystem) some glob matches: ``path -> (size in bytes, modified, s)``.

    The one place globs are expanded (preprocessing inputs, generation seeds).

    Raises:
        FileNotFoundError: a pattern matches no file (names the flag and the pattern).
    """
    found: dict[str, tuple[int, int]] = {}
    for pattern in patterns:
        matches = [m for m in FileSystems.match([pattern])[0].metadata_list if not m.path.endswith("/")]
        if not matches:
            raise FileNotFoundError(f"{flag} {pattern!r} matches no file")
        for m in matches:
            found[m.path] = (int(m.size_in_bytes), int(getattr(m, "last_updated_in_seconds", 0) or 0))
    return dict(sorted(found.items()))


def expand_globs(patterns: Sequence[str], *, flag: str = "--input") -> list[str]:
    """The files some glob matches, sorted and de-duplicated (see :func:`match_globs`)."""
    return list(match_globs(patterns, flag=flag))


STAGING_PREFIX = ".tmp-staging-"


def staging_folder(folder: str, run_id: str) -> str:
    """Where a run that must not disturb ``folder`` builds its files: ``folder/.tmp-staging-RUNID``.

    Inside ``folder`` (same filesystem, so the final moves are renames) and hidden from output
    globs, which never match a file in a subfolder or a ``.tmp-`` name.
    """
    return join(folder, f"{STAGING_PREFIX}{run_id}")


def remove_folder(folder: str) -> None:
    """Delete a folder and what it holds (any Beam filesystem); a missing folder is fine."""
    if FileSystems.get_scheme(folder) in (None, "file"):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        return
    files = [m.path for m in FileSystems.match([join(folder, "**")])[0].metadata_list]
    if files:
        FileSystems.delete(files)


def remove_stale_staging(folder: str) -> list[str]:
    """Remove the staging folders (:func:`staging_folder`) left in ``folder`` by runs that died.

    Call it only while holding the folder's lock. Returns the folders removed.
    """
    if FileSystems.get_scheme(folder) in (None, "file"):
        import os

        if not os.path.isdir(folder):
            return []
        stale = [join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(STAGING_PREFIX)]
    else:
        found = FileSystems.match([join(folder, STAGING_PREFIX + "*/**")])[0].metadata_list
        stale = sorted({m.path[: m.path.index("/", len(folder.rstrip("/")) + 1)] for m in found})
    for path in stale:
        remove_folder(path)
    return stale


def commit_staged(staging: str, folder: str, *, keep: Sequence[str] = ()) -> list[str]:
    """Swap a finished run's files from ``staging`` into ``folder``, then remove ``staging``.

    Until this is called the previous run's files stay whole and in place. The swap:
    ``COMPLETED`` is removed from ``folder`` first (a reader never sees the marker beside a
    mix of two runs), every staged file is renamed over its namesake (atomic per file
    locally), the previous run's files the new run did not write are deleted (except the
    names in ``keep``), and the staged ``COMPLETED``, if any, moves in last.

    Returns:
        The names of the previous run's files that were deleted.
    """
    staged = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in list_folder(staging)}
    marker = join(folder, COMPLETED_FILE)
    if FileSystems.exists(marker):
        FileSystems.delete([marker])
    for name, path in sorted(staged.items()):
        if name != COMPLETED_FILE:
            commit_temp(path, join(folder, name))
    stale = [
        p
        for p in list_folder(folder)
        if (name := p.rstrip("/").rsplit("/", 1)[-1]) not in staged and name not in keep and name != COMPLETED_FILE
    ]
    if stale:
        FileSystems.delete(stale)
    if COMPLETED_FILE in staged:
        commit_temp(staged[COMPLETED_FILE], marker)
    remove_folder(staging)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in stale)
