"""What every job answers a scheduler: distinct, documented exit statuses.

=====  ================  =================================================================
 0     done              the output is committed, or was already complete ("nothing to do")
 1     data failed       the data blocks completion: an empty split, a corrupt input, rows
                         that failed; nothing was committed, the previous version is kept
 2     usage / refused   bad flags or inputs, an output folder that holds another run, a
                         resume with other settings: fix the command (nothing was written)
 3     locked            another live run writes into the output folder: retry later (a
                         crashed run's lock expires within about a minute)
 4     diverged          training's loss became NaN/inf: the last good checkpoint is kept;
                         rerun with a lower learning rate or clipping
 5     failed            anything else (storage or runner errors, a lost lock, a bug): nothing
                         was committed; rerunning the same command is safe
=====  ================  =================================================================
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum
from typing import TextIO

log = logging.getLogger(__name__)


class ExitStatus(IntEnum):
    DONE = 0
    DATA_FAILED = 1
    USAGE = 2
    LOCKED = 3
    DIVERGED = 4
    FAILED = 5


class DataFailedError(RuntimeError):
    """The run's data blocks completion (exit status 1): nothing was committed."""


class DivergedError(RuntimeError):
    """Training stopped on a non-finite loss or weights (exit status 4)."""


def exit_status(exc: BaseException) -> ExitStatus:
    """The exit status a job's exception maps to (see the module docstring)."""
    from kogpt2.outputs import OutputLockedError

    if isinstance(exc, OutputLockedError):
        return ExitStatus.LOCKED
    if isinstance(exc, DataFailedError):
        return ExitStatus.DATA_FAILED
    if isinstance(exc, DivergedError):
        return ExitStatus.DIVERGED
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError)):
        return ExitStatus.USAGE
    return ExitStatus.FAILED


def report_failure(prog: str, exc: BaseException, stream: TextIO | None = None) -> ExitStatus:
    """Print why a job stopped, one line (a traceback too for unexpected failures); return its exit status."""
    stream = stream or sys.stderr
    status = exit_status(exc)
    if status == ExitStatus.FAILED:
        traceback.print_exception(exc, file=stream)
        print(f"{prog}: error: {type(exc).__name__}: {exc} (nothing was committed; rerunning is safe)", file=stream)
    else:
        print(f"{prog}: error: {exc}", file=stream)
    return status


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body; map its exceptions to exit statuses (KeyboardInterrupt passes through)."""
    try:
        return int(body())
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a documented exit status
        return int(report_failure(prog, exc))
