"""kogpt2.schedules: learning-rate schedules with warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import pytest

from kogpt2.tf_setup import import_keras, import_tf

tf = import_tf()
keras = import_keras()


def test_lr_schedules_warm_up_then_decay_to_zero() -> None:
    from kogpt2.schedules import WarmupSchedule, learning_rate

    assert learning_rate(1e-3, 0, 100, "constant") == 1e-3  # the default: a plain constant rate
    lr = {kind: learning_rate(1.0, 4, 20, kind) for kind in ("constant", "linear", "cosine")}
    at = {kind: [float(s(step)) for step in (0, 3, 4, 12, 20, 25)] for kind, s in lr.items()}
    assert at["constant"] == pytest.approx([0.25, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert at["linear"] == pytest.approx(
        [0.25, 1.0, 1.0, 0.5, 0.0, 0.0]
    )  # transformers' (total - s) / (total - warmup)
    assert at["cosine"] == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-6)
    assert isinstance(lr["linear"], WarmupSchedule)
    assert isinstance(lr["linear"].decay, keras.optimizers.schedules.PolynomialDecay)  # tf-keras' own decays
    assert isinstance(lr["cosine"].decay, keras.optimizers.schedules.CosineDecay)
    with pytest.raises(ValueError, match=r"--lr-schedule 'step': must be one of constant, linear, cosine"):
        learning_rate(1.0, 0, 10, "step")
