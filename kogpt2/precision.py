"""``--mixed-precision``: which Keras dtype policy a training job runs under.

``no`` keeps float32 (the default: on CPUs bfloat16 is emulated unless the CPU has
AVX512-BF16/AMX, and it is rarely faster for small models; pass ``bf16`` to try it).
``bf16`` computes in bfloat16 on CPUs and GPUs with float32 weights. ``fp16`` computes in
float16 with dynamic loss scaling, on GPUs only. The loss (and the softmax inside the
cross-entropy) is computed in float32 either way: :func:`kogpt2.trainer.token_stats`
casts the logits first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from kogpt2.tf_setup import import_keras, import_tf

log = logging.getLogger(__name__)

PRECISIONS = ("no", "bf16", "fp16")
#: The bare ``--mixed-precision`` of earlier releases: fp16 on GPUs, bf16 on CPUs.
AUTO = "auto"
POLICIES = {"no": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def normalize_precision(value: Any) -> str:
    """``no``/``bf16``/``fp16``/``auto``; ``True``/``False`` (the old boolean) map to ``auto``/``no``."""
    if value is True:
        return AUTO
    if value is False or value is None:
        return "no"
    if value not in (*PRECISIONS, AUTO):
        raise ValueError(f"--mixed-precision {value!r}: must be one of {', '.join(PRECISIONS)}")
    return str(value)


def resolve_policy(value: str, *, has_gpu: bool | None = None) -> str:
    """The Keras policy name for ``--mixed-precision value`` on this machine.

    Raises:
        ValueError: ``fp16`` without a GPU.
    """
    value = normalize_precision(value)
    if has_gpu is None:
        has_gpu = bool(import_tf().config.list_physical_devices("GPU"))
    if value == AUTO:
        value = "fp16" if has_gpu else "bf16"
        log.info("--mixed-precision without a value: %s on this machine (%s)", value, "GPU" if has_gpu else "no GPU")
    if value == "fp16" and not has_gpu:
        raise ValueError(
            "--mixed-precision fp16: float16 with loss scaling is for GPUs and no GPU is visible; "
            "use --mixed-precision bf16 on CPUs, or no"
        )
    if value == "no" and not has_gpu:
        log.info(
            "float32 compute: mixed precision is off by default on CPU (bfloat16 is emulated on most CPUs "
            "and rarely faster for small models); pass --mixed-precision bf16 to try it"
        )
    return POLICIES[value]


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Run under the global Keras dtype policy ``name``; restore the previous one after."""
    keras = import_keras()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
