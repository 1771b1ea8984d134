"""``kogpt2 train``: fine-tune a model folder, or train a preset, on preprocessing shards.

Every flag comes from a :class:`~kogpt2.training.TrainConfig` field (its default, help and
validation live there). ``--config FILE`` reads settings from a JSON file (a flat object of
field names, or a run's ``history.json``, which records its resolved config); flags override it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kogpt2.training import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kogpt2.flags import add_config_arguments, add_underscore_spellings
    from kogpt2.training import TrainConfig

    p.add_argument("--config", metavar="FILE", help="settings from a JSON file (e.g. a run's history.json)")
    add_config_arguments(p, TrainConfig, unset=True)
    p.add_argument("--quiet", action="store_true", help="no Keras progress output")
    add_underscore_spellings(p)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~kogpt2.training.TrainConfig` of parsed arguments (and their ``--config`` file)."""
    from kogpt2.flags import config_file_settings, config_from_args
    from kogpt2.training import TrainConfig

    base = config_file_settings(args.config, TrainConfig)
    config: TrainConfig = config_from_args(TrainConfig, args, base=base)
    return config


def run(args: argparse.Namespace) -> int:
    import logging

    from kogpt2.training import train

    if not getattr(args, "verbose", False):  # absl logs a line per checkpoint shard at INFO
        logging.getLogger("absl").setLevel(logging.WARNING)

    config = config_from_args(args)
    result = train(config, progress=not args.quiet)
    print(result.summary(), flush=True)
    return 0
