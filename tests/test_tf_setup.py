"""TensorFlow start-up: tf-keras bound before TensorFlow, whatever module is imported first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_importing_every_public_module_then_compile_works() -> None:
    proc = _run(
        """
        import importlib, pkgutil
        import kogpt2, pipelines
        for pkg in (kogpt2, pipelines):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(m.name)
        import tensorflow as tf
        from transformers import GPT2Config, TFGPT2LMHeadModel
        model = TFGPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = tf.constant([[1, 2, 3, 4]])
        model.fit(x[:, :-1], x[:, 1:], epochs=1, verbose=0)
        print("keras module", tf.keras.__name__)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keras module tf_keras" in proc.stdout


def test_keras3_bound_first_is_reported_clearly() -> None:
    proc = _run(
        """
        import tensorflow as tf
        tf.keras.layers  # binds Keras 3
        from kogpt2.tf_setup import import_tf, KerasBindingError
        try:
            import_tf()
        except KerasBindingError as e:
            print("ERR", e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERR" in proc.stdout and "TF_USE_LEGACY_KERAS=1" in proc.stdout


def test_commands_start_quietly_and_verbose_shows_the_chatter(tiny_model_dir):
    """TensorFlow's C++ start-up lines and transformers' load reports are hidden unless --verbose."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KOGPT2_VERBOSE")}
    cmd = [
        sys.executable,
        "-m",
        "kogpt2.cli",
        "generate",
        "--model",
        str(tiny_model_dir),
        "이때",
        "--max-new-tokens",
        "3",
    ]
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert quiet.stderr == "" and quiet.stdout.startswith("이때")
    loud = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], env=env, capture_output=True, text=True, check=True)
    assert "All model checkpoint layers were used" in loud.stderr or "oneDNN" in loud.stderr
    beam = subprocess.run(
        [sys.executable, "-m", "pipelines.generate", "--help"], env=env, capture_output=True, text=True
    )
    assert beam.returncode == 0 and "apitools" not in beam.stderr and beam.stderr == ""
