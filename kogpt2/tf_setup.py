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
import tempfile
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On GPUs, take memory as needed rather than all of it at start: several Beam worker
# processes (or a shared model server and its clients) can then live on one GPU.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
# transformers' load reports ("All model checkpoint layers were used ...") and its TF
# deprecation notice are not for our users; `--verbose` (KOGPT2_VERBOSE=1) shows them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: Set to "1" (``--verbose``) to see TensorFlow's start-up lines and library chatter.
VERBOSE_ENV = "KOGPT2_VERBOSE"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_verbose(verbose: bool) -> None:
    """Show (or hide) library chatter: TensorFlow start-up lines, transformers' reports."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_error()


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def _quiet_stderr(load: Callable[[], T]) -> T:
    """Run ``load`` with file descriptor 2 captured: TensorFlow's C++ start-up lines (absl's
    "All log messages before absl::InitializeLog()", oneDNN, "Could not find cuda drivers",
    cuInit) ignore TF_CPP_MIN_LOG_LEVEL. What was captured is replayed if ``load`` raises."""
    if _verbose():
        return load()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no usable fd 2
        return load()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return load()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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
    if already:
        import tensorflow as tf

        _check_binding(tf)
        return tf

    def load() -> ModuleType:
        import tensorflow as tf

        tf.config.list_physical_devices()  # device start-up (and its log lines) happens here
        return tf

    return _quiet_stderr(load)


def import_keras() -> ModuleType:
    """Return the tf-keras module that transformers' TF models are built on."""
    import_tf()
    import tf_keras

    return tf_keras
