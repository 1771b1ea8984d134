"""``kogpt2 status FOLDER``: is an output folder complete? Reads only; for people and schedulers.

Exit status: 0 a committed version exists; 1 nothing committed (no run yet, or the last one
failed or was stopped); 3 nothing committed and a live run holds the folder (poll again later);
2 not an output folder of this protocol.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder", metavar="FOLDER", help="an output folder of preprocess, train or generate (local or gs://)"
    )
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument("--path", action="store_true", help="print only the current version's folder (exit 1 if none)")


def run(args: argparse.Namespace) -> int:
    from kogpt2.jobs import ExitStatus
    from kogpt2.outputs import format_status, status

    s = status(args.folder)
    if args.path:
        if s["current"]:
            print(s["current"]["path"])
        return ExitStatus.DONE if s["complete"] else ExitStatus.DATA_FAILED
    print(json.dumps(s, ensure_ascii=False, indent=2) if args.json else format_status(s))
    if s["complete"]:
        return ExitStatus.DONE
    if s["lock"] and not s["lock"]["expired"]:
        return ExitStatus.LOCKED
    return ExitStatus.DATA_FAILED
