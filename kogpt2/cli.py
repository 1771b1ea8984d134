"""The ``kogpt2`` command: one subcommand per module in :mod:`kogpt2.commands`.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; its one-line
help lives in :data:`COMMANDS`. Failures become the exit statuses of :mod:`kogpt2.jobs`. Modules are imported only when their command runs, so
``kogpt2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kogpt2 import __version__
from kogpt2 import tf_setup as _tf_setup  # noqa: F401  (TF_USE_LEGACY_KERAS first)

COMMANDS: dict[str, tuple[str, str]] = {
    "train-tokenizer": ("kogpt2.commands.train_tokenizer", "train a SentencePiece tokenizer on a corpus"),
    "train": ("kogpt2.commands.train", "fine-tune or train GPT-2 from preprocessed shards"),
    "evaluate": ("kogpt2.commands.evaluate", "loss and perplexity of a model on a shard split"),
    "generate": ("kogpt2.commands.generate", "continue seed words with a model"),
    "report": ("kogpt2.commands.report", "build report.html for a run folder, or summarize a generation folder"),
    "export": ("kogpt2.commands.export", "add Hugging Face tokenizer files to a model folder (AutoTokenizer opens it)"),
    "status": (
        "kogpt2.commands.status",
        "whether an output folder is complete: its version, files, run in progress, lock",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to add its flags."""
    parser = argparse.ArgumentParser(prog="kogpt2", description="Korean GPT-2 pipeline tools.")
    parser.add_argument("--version", action="version", version=f"kogpt2-pipeline {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, TensorFlow start-up and library messages"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kogpt2 COMMAND ...``; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.verbose:
        _tf_setup.set_verbose(True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    module = importlib.import_module(args._module)
    from kogpt2.jobs import run_main

    return run_main(f"kogpt2 {args.command}", lambda: int(module.run(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
