"""``--strategy``: the ``tf.distribute`` strategy a training job runs under."""

from __future__ import annotations

import functools
from typing import Any

from kogpt2.tf_setup import import_tf

tf = import_tf()

STRATEGIES = ("auto", "mirrored", "default")


def make_strategy(name: str = "auto") -> Any:
    """A ``tf.distribute`` strategy: ``auto`` mirrors over several GPUs, else the default one.

    ``mirrored`` mirrors over all visible GPUs, or over all logical CPU devices when there
    is no GPU (tests split the CPU into two logical devices). One MirroredStrategy is
    shared per process: two instances would clash in their collective-op keys.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy {name!r}: must be one of {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return _mirrored(tuple(d.name for d in devices))


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> Any:
    return tf.distribute.MirroredStrategy(devices=list(devices))
