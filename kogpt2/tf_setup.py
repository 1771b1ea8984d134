"""The one place that starts TensorFlow.

transformers 4.x TF models are built on tf-keras (Keras 2). TensorFlow binds
``tf.keras`` to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set *before*
TensorFlow is first imported; once Keras 3 is bound, ``model.compile`` on a
transformers model fails. Every entry point and Beam DoFn imports TensorFlow
through :func:`import_tf` (``import kogpt2`` already sets the variable).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On GPUs, take memory as needed rather than all of it at start: several Beam worker
# processes (or a shared model server and its clients) can then live on one GPU.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


class KerasBindingError(RuntimeError):
    """TensorFlow was imported with Keras 3 bound before kogpt2 could set it up."""


def _check_binding(tf: ModuleType) -> None:
    keras_mod = getattr(tf, "keras", None)
    version = getattr(keras_mod, "__version__", "2")
    if str(version).startswith("3"):
        raise KerasBindingError(
            "TensorFlow was imported before kogpt2 and bound tf.keras to Keras 3 "
            f"(keras {version}). Set TF_USE_LEGACY_KERAS=1 in the environment, or import "
            "kogpt2 before tensorflow."
        )


def import_tf() -> ModuleType:
    """Import TensorFlow with tf-keras (Keras 2) bound, and return the module.

    Returns:
        The ``tensorflow`` module.

    Raises:
        KerasBindingError: TensorFlow was already imported with Keras 3 bound.
    """
    already = "tensorflow" in sys.modules
    import tensorflow as tf

    if already:
        _check_binding(tf)
    return tf


def import_keras() -> ModuleType:
    """Return the tf-keras module that transformers' TF models are built on."""
    import_tf()
    import tf_keras

    return tf_keras
