"""Learning-rate schedules and the optimizer of a training job.

``constant``, ``linear`` (transformers' default: linear decay to 0 at the last step) and
``cosine`` (cosine decay to 0 at the last step), each after a linear warmup. The decays
are tf-keras' own ``PolynomialDecay(power=1)`` and ``CosineDecay``; :class:`WarmupSchedule`
adds the warmup in front. The schedule is a pure function of the optimizer step, so a
resumed run continues at the same position once ``optimizer.iterations`` is restored.
"""

from __future__ import annotations

from typing import Any

from kogpt2.tf_setup import import_keras, import_tf

tf = import_tf()
keras = import_keras()
# Base class typed Any: mypy cannot see through the runtime-selected Keras module.
_Schedule: Any = keras.optimizers.schedules.LearningRateSchedule

#: ``--lr-schedule`` choices; the default stays ``constant`` (the notebook's Adam 1e-4).
SCHEDULES = ("constant", "linear", "cosine")


def decay_schedule(kind: str, peak: float, decay_steps: int) -> Any:
    """The schedule after warmup: a float (``constant``) or a tf-keras schedule over ``decay_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"--lr-schedule {kind!r}: must be one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        return float(peak)
    steps = max(1, int(decay_steps))
    if kind == "linear":
        return keras.optimizers.schedules.PolynomialDecay(peak, steps, end_learning_rate=0.0, power=1.0)
    return keras.optimizers.schedules.CosineDecay(peak, steps, alpha=0.0)


class WarmupSchedule(_Schedule):
    """Linear warmup reaching ``peak`` at step ``warmup_steps - 1``, then ``kind`` decay to 0 at ``total_steps``.

    Step ``s < warmup_steps`` gets ``peak * (s + 1) / warmup_steps``; step ``s >= warmup_steps``
    gets the decay schedule at ``s - warmup_steps`` (constant: ``peak``).
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, kind: str = "constant"):
        super().__init__()
        self.peak, self.warmup_steps, self.total_steps, self.kind = (
            float(peak),
            int(warmup_steps),
            int(total_steps),
            kind,
        )
        self.decay = decay_schedule(kind, peak, total_steps - warmup_steps)

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        if isinstance(self.decay, float):
            return warm
        after = tf.cast(self.decay(tf.maximum(step - self.warmup_steps, 0.0)), tf.float32)
        return tf.where(step < self.warmup_steps, warm, after)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "kind": self.kind}  # fmt: skip


def learning_rate(peak: float, warmup_steps: int, total_steps: int, kind: str) -> Any:
    """A float for a constant rate without warmup, else a :class:`WarmupSchedule`."""
    if kind not in SCHEDULES:
        raise ValueError(f"--lr-schedule {kind!r}: must be one of {', '.join(SCHEDULES)}")
    if kind == "constant" and not warmup_steps:
        return float(peak)
    return WarmupSchedule(peak, warmup_steps, total_steps, kind)


def make_optimizer(
    peak: float,
    *,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> Any:
    """Adam (AdamW when ``weight_decay`` > 0, LayerNorm and biases excluded), the schedule, global-norm clipping.

    Under a ``mixed_float16`` policy the optimizer is wrapped in a ``LossScaleOptimizer``
    (dynamic loss scaling); bfloat16 needs none.
    """
    lr = learning_rate(peak, warmup_steps, total_steps, schedule)
    kwargs = {"learning_rate": lr, "epsilon": 1e-8, "global_clipnorm": clip_norm}
    if weight_decay:
        opt = keras.optimizers.AdamW(weight_decay=weight_decay, **kwargs)
        opt.exclude_from_weight_decay(var_names=["ln_", "bias"])  # LayerNorm scales/shifts, biases
    else:
        opt = keras.optimizers.Adam(**kwargs)
    if keras.mixed_precision.global_policy().compute_dtype == "float16":
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    return opt


def current_learning_rate(optimizer: Any) -> float:
    """The rate the optimizer applies at its current step."""
    lr = optimizer.learning_rate
    lr = lr(optimizer.iterations) if callable(lr) else lr
    return float(tf.convert_to_tensor(lr).numpy())
