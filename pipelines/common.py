"""What every pipeline shares: Beam options and runner choice, output folders, JSON files.

Beam's DirectRunner first tries the Prism runner, which downloads a binary on first
use; on an offline machine that stalls before falling back. :func:`create_pipeline`
runs "direct" pipelines on Beam's FnApiRunner (what DirectRunner falls back to),
which honours ``--direct_num_workers`` and ``--direct_running_mode``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

log = logging.getLogger(__name__)

COMPLETED = "COMPLETED"
RUN_FILE = "run.json"
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


def join(folder: str, name: str) -> str:
    """Join a path in any Beam filesystem (local, ``gs://``, ...)."""
    return FileSystems.join(folder, name)


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file through Beam filesystems."""
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))


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


def prepare_output(folder: str, signature: dict[str, Any], *, overwrite: bool = False) -> None:
    """Make ``folder`` ready for a run with ``signature``; never mix two runs' files.

    - empty or missing: created; ``run.json`` records the signature.
    - holding a run with the same signature (complete or not): its files are removed,
      so the rerun rewrites them (reruns reproduce).
    - holding anything else: :class:`OutputConflictError`, unless ``overwrite``.

    Args:
        folder: output folder (any Beam filesystem).
        signature: JSON-able description of inputs and flags that define the run.
        overwrite: remove whatever the folder holds.

    Raises:
        OutputConflictError: the folder holds a different run's files.
    """
    existing = list_folder(folder)
    if existing and not overwrite:
        run_path = join(folder, RUN_FILE)
        previous = None
        if run_path in existing or FileSystems.exists(run_path):
            try:
                previous = json.loads(read_text(run_path))
            except (OSError, ValueError):
                previous = None
        if previous != json.loads(json.dumps(signature)):
            what = "a different run" if previous is not None else "files not written by this pipeline"
            raise OutputConflictError(
                f"output folder {folder} already holds {what} ({len(existing)} files). "
                "Choose another --output, or pass --overwrite to replace its contents."
            )
    if existing:
        log.info("clearing %d files of the previous run in %s", len(existing), folder)
        FileSystems.delete(existing)
    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    write_json(join(folder, RUN_FILE), signature)


def mark_completed(folder: str) -> None:
    """Write the ``COMPLETED`` marker; call it last, after every other output."""
    write_text(join(folder, COMPLETED), "")


def is_completed(folder: str) -> bool:
    """True when ``folder`` holds a ``COMPLETED`` marker."""
    return bool(FileSystems.exists(join(folder, COMPLETED)))


def expand_globs(patterns: Sequence[str]) -> list[str]:
    """Expand file globs through Beam filesystems, sorted and de-duplicated.

    Raises:
        FileNotFoundError: a pattern matches no file (names the pattern).
    """
    found: set[str] = set()
    for pattern in patterns:
        matches = FileSystems.match([pattern])[0].metadata_list
        files = [m.path for m in matches if not m.path.endswith("/")]
        if not files:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        found.update(files)
    return sorted(found)
