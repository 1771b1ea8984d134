"""``kogpt2 train``: fine-tune a model folder, or train a preset, on preprocessing shards.

Every flag comes from a :class:`~kogpt2.train_config.TrainConfig` field (its default, help and
validation live there). ``--config FILE`` reads settings from a JSON file (a flat object of
field names, or a run's ``history.json``, which records its resolved config); flags override it.

The job's two entry points, as every job has: :func:`kogpt2.training.run_config`
``(TrainConfig) -> TrainResult`` does the work; :func:`run` ``(argv) -> int`` is the command line
(parse, run, print the summary, exit status of :mod:`kogpt2.jobs`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kogpt2.train_config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``kogpt2 train``'s flags to ``p`` (the ``kogpt2`` CLI's subcommand parser, or :func:`make_parser`'s)."""
    from kogpt2.flags import add_config_arguments, add_underscore_spellings
    from kogpt2.train_config import TrainConfig

    p.add_argument("--config", metavar="FILE", help="settings from a JSON file (e.g. a run's history.json)")
    add_config_arguments(p, TrainConfig, unset=True)
    p.add_argument("--quiet", action="store_true", help="no Keras progress output")
    add_underscore_spellings(p)


def make_parser() -> argparse.ArgumentParser:
    """A parser of ``kogpt2 train``'s flags on their own (what :func:`run` parses a list of arguments with)."""
    p = argparse.ArgumentParser(prog="kogpt2 train", description="fine-tune or train GPT-2 from preprocessed shards")
    add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~kogpt2.train_config.TrainConfig` of parsed arguments (and their ``--config`` file)."""
    from kogpt2.flags import config_file_settings, config_from_args
    from kogpt2.train_config import TrainConfig

    base = config_file_settings(args.config, TrainConfig)
    config: TrainConfig = config_from_args(TrainConfig, args, base=base)
    return config


def run(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``kogpt2 train``: resolve the config, :func:`kogpt2.training.run_config`, print the summary.

    Args:
        args: the arguments after ``train`` (``run(["--data", "runs/data", ...])``; None: the
            process's), or the ``kogpt2`` CLI's parse of them (:func:`add_arguments`).

    Returns:
        The exit status: 0 when the model is committed (or was already); failures are printed
        and mapped by :mod:`kogpt2.jobs` (2 refused settings, 3 locked, 4 diverged, 5 anything else).
    """
    import logging

    from kogpt2.jobs import ExitStatus, run_main

    def body() -> int:
        from kogpt2.training import run_config

        parsed = args if isinstance(args, argparse.Namespace) else make_parser().parse_args(args)
        if not getattr(parsed, "verbose", False):  # absl logs a line per checkpoint shard at INFO
            logging.getLogger("absl").setLevel(logging.WARNING)
        result = run_config(config_from_args(parsed), progress=not parsed.quiet)
        print(result.summary(), flush=True)
        return ExitStatus.DONE

    return run_main("kogpt2 train", body)
