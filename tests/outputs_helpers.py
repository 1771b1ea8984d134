"""What the output-protocol tests share (local disk and gs://): one run that writes files and commits them."""

from __future__ import annotations

from typing import Any

from kogpt2.outputs import ALREADY_COMPLETE, Lease, begin, commit
from kogpt2.storage import store_for

SIG = {"inputs": ["a.txt"], "max_len": 30}


def build(
    folder: str, sig: dict, files: dict[str, bytes], *, overwrite: bool = False, keep: int = 2, job: str = "test"
) -> Any:
    """One run that writes ``files`` and commits them; returns the manifest (or the run if already complete)."""
    with Lease(folder, job) as lease:
        run = begin(folder, job, sig, lease, overwrite=overwrite, keep_versions=keep)
        if run.action == ALREADY_COMPLETE:
            return run
        store = store_for(folder)
        for name, data in files.items():
            store.write(run.path(name), data)
        return commit(run, list(files), summary={"files": len(files)})
