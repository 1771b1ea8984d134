"""Training's model: :class:`LMTrainer` wraps a GPT-2 LM for Keras ``fit`` and ``evaluate`` with a masked loss.

The loss is cross-entropy summed over real (non-pad) targets and divided by their count; accuracy
and perplexity are masked the same way (:func:`token_stats`, :class:`TokenMean`). Under a
distribution strategy each replica divides by the global count, so the summed gradients are
those of the global masked mean. :mod:`kogpt2.training` trains with it, :mod:`kogpt2.evaluate`
scores with it.
"""

from __future__ import annotations

from typing import Any

from kogpt2.dataset import IGNORE_ID
from kogpt2.tf_setup import import_keras, import_tf

tf = import_tf()
keras = import_keras()
# Base classes typed Any: mypy cannot see through the runtime-selected Keras module.
_Metric: Any = keras.metrics.Metric
_Model: Any = keras.Model


def token_stats(targets: Any, logits: Any) -> tuple[Any, Any, Any]:
    """Sums over real targets: negative log-likelihood, correct argmax predictions, count.

    Args:
        targets: ``(B, T)`` int ids, :data:`~kogpt2.dataset.IGNORE_ID` at padding.
        logits: ``(B, T, V)``.

    Returns:
        ``(nll_sum, correct, count)``, float32 scalars.
    """
    mask = tf.not_equal(targets, IGNORE_ID)  # (B, T)
    maskf = tf.cast(mask, tf.float32)
    logits = tf.cast(logits, tf.float32)  # (B, T, V); float32 even under mixed precision
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(mask, targets, 0), logits=logits)  # (B, T)
    pred = tf.argmax(logits, axis=-1, output_type=targets.dtype)  # (B, T)
    correct = tf.cast(tf.equal(pred, targets), tf.float32) * maskf
    return tf.reduce_sum(nll * maskf), tf.reduce_sum(correct), tf.reduce_sum(maskf)


class TokenMean(_Metric):
    """A per-token mean (``total / count``), or its ``exp`` (perplexity), summed across replicas."""

    def __init__(self, name: str, *, exp: bool = False, **kwargs: Any):
        super().__init__(name=name, dtype="float64", **kwargs)
        self.exp = exp
        self.total = self.add_weight(name="total", initializer="zeros", dtype="float64")
        self.count = self.add_weight(name="count", initializer="zeros", dtype="float64")

    def update_state(self, total: Any, count: Any) -> None:  # type: ignore[override]
        self.total.assign_add(tf.cast(total, tf.float64))
        self.count.assign_add(tf.cast(count, tf.float64))

    def value_of(self, total: Any, count: Any) -> Any:
        mean = tf.math.divide_no_nan(total, count)
        return tf.exp(mean) if self.exp else mean

    def result(self) -> Any:
        return self.value_of(self.total, self.count)


class LMTrainer(_Model):
    """Wraps a TF GPT-2 LM for ``fit``/``evaluate`` with masked loss and token metrics.

    The data are ``(inputs (B, T), targets (B, T))`` from :mod:`kogpt2.dataset`. Under a
    distribution strategy each replica divides its loss sum by the *global* count of
    real targets, so the summed gradients are those of the global masked mean.
    """

    def __init__(self, lm: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.lm = lm
        self.loss_metric = TokenMean("loss")
        self.accuracy_metric = TokenMean("accuracy")
        self.perplexity_metric = TokenMean("perplexity", exp=True)
        self.train_tokens = tf.Variable(
            0.0,
            dtype=tf.float64,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
            name="train_tokens",
        )
        self.distribute_reduction_method = "first"  # step results are already global (see _results)

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_metric, self.accuracy_metric, self.perplexity_metric]

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.lm(input_ids=inputs, training=training, use_cache=False, return_dict=True).logits  # (B, T, V)

    def _update(self, nll_sum: Any, correct: Any, count: Any) -> dict[str, Any]:
        self.loss_metric.update_state(nll_sum, count)
        self.perplexity_metric.update_state(nll_sum, count)
        self.accuracy_metric.update_state(correct, count)
        return self._results()

    def _results(self) -> dict[str, Any]:
        # Metric variables are per replica inside a step: all-reduce them so every replica
        # (and the progress bar) sees the global figures.
        ctx = tf.distribute.get_replica_context()
        out = {}
        for m in self.metrics:
            total, count = m.total.read_value(), m.count.read_value()
            if ctx is not None:
                total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
            out[m.name] = m.value_of(total, count)
        return out

    def train_step(self, data: Any) -> dict[str, Any]:
        inputs, targets = data  # (B, T), (B, T)
        with tf.GradientTape() as tape:
            logits = self(inputs, training=True)  # (B, T, V)
            nll_sum, correct, count = token_stats(targets, logits)
            global_count = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, count)
            loss = nll_sum / tf.maximum(global_count, 1.0)
        self.optimizer.minimize(loss, self.lm.trainable_variables, tape=tape)
        self.train_tokens.assign_add(tf.cast(count, tf.float64))
        return self._update(nll_sum, correct, count)

    def test_step(self, data: Any) -> dict[str, Any]:
        inputs, targets = data
        logits = self(inputs, training=False)
        return self._update(*token_stats(targets, logits))

    def tokens_evaluated(self) -> int:
        """Real targets counted by the last ``evaluate`` (or epoch)."""
        return int(self.loss_metric.count.numpy())
