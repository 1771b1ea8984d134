"""What every pipeline shares: Beam options and runner choice, argument checks, small files.

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
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from kogpt2 import storage

log = logging.getLogger(__name__)

DIRECT_RUNNERS = {None, "", "DirectRunner", "direct", "FnApiRunner"}


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


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file atomically: a reader sees the old file or the whole new one (:mod:`kogpt2.storage`)."""
    storage.store_for(path).write(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    """Read a UTF-8 text file (any filesystem)."""
    return storage.store_for(path).read(path).decode("utf-8")


def copy_file(source: str, destination: str) -> None:
    """Copy one (small) file between any filesystems, atomically at the destination."""
    storage.store_for(destination).write(destination, storage.store_for(source).read(source))


_LOCAL_COPIES: dict[str, str] = {}


def local_copy(path: str) -> str:
    """A local path holding ``path``: itself when local, else a copy made once per process.

    Remote files (``gs://.../tokenizer.spiece``) and folders (``gs://.../model``: the files
    directly in it, or in its committed version when it is an output folder of these jobs)
    are copied into a temporary folder, because tokenizers and TensorFlow models are read
    from local files.
    """
    if not storage.scheme(path):
        return storage.local_path(path)
    if path not in _LOCAL_COPIES:
        import os
        import tempfile

        from kogpt2.outputs import version_root

        store = storage.store_for(path)
        root = version_root(path.rstrip("/"))
        target = tempfile.mkdtemp(prefix="kogpt2-")
        inside = [n for n in store.children(root) if not n.endswith("/")]
        if inside:  # a folder
            for name in inside:
                copy_file(storage.join(root, name), os.path.join(target, name))
            _LOCAL_COPIES[path] = target
        else:
            local = os.path.join(target, storage.basename(path))
            copy_file(path, local)
            _LOCAL_COPIES[path] = local
        log.info("copied %s to %s", path, _LOCAL_COPIES[path])
    return _LOCAL_COPIES[path]


def write_json(path: str, data: Any) -> None:
    """Write pretty, key-sorted UTF-8 JSON, atomically."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def file_sizes(paths: Sequence[str]) -> dict[str, list[int]]:
    """``path -> [size in bytes, last modified (s)]`` per file: what changes when a file is edited."""
    out: dict[str, list[int]] = {}
    for m in FileSystems.match(list(paths)):
        for meta in m.metadata_list:
            out[meta.path] = [int(meta.size_in_bytes), int(getattr(meta, "last_updated_in_seconds", 0) or 0)]
    return out


def check_beam_args(beam_args: Sequence[str], ours: Sequence[str]) -> None:
    """Refuse every leftover argument that Beam would not use (Beam drops them with a mere warning).

    What our parser left over must be Beam options, parsed as Beam parses them. Anything else is
    refused, never dropped: an unknown ``--option`` (with the closest of ours), a single-dash
    option, or a stray value, which is how a second file after ``--input a.txt`` used to vanish
    (and how an unquoted shell glob expands).

    Args:
        beam_args: what our parser did not consume.
        ours: our option strings, for "did you mean".

    Raises:
        ValueError: naming each argument that is neither ours nor Beam's.
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    from kogpt2.flags import refuse_lookalikes

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # type: ignore[attr-defined]  # what Beam itself does
    _, unknown = parser.parse_known_args(list(beam_args))
    refuse_lookalikes([a for a in unknown if a.startswith("--")], ours)
    dashed = [a for a in unknown if a.startswith("-") and not a.startswith("--") and a != "-"]
    if dashed:
        raise ValueError(f"unknown option {dashed[0]}: options are spelled --name (see --help)")
    stray = [a for a in unknown if not a.startswith("-")]
    if stray:
        shown = " ".join(stray[:5]) + (" ..." if len(stray) > 5 else "")
        raise ValueError(
            f"unexpected argument(s): {shown}. Give several files after one flag (--input a.txt b.txt) or "
            "quote a glob (--input 'corpus/*.txt') so the shell does not expand it"
        )


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
