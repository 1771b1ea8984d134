"""Keras callbacks of a training job: run tracking (checkpoints, early stopping, NaN) and TensorBoard scalars."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from kogpt2.checkpointing import STATE_FILE, RunState
from kogpt2.schedules import current_learning_rate
from kogpt2.storage import join
from kogpt2.tf_setup import import_keras, import_tf

tf = import_tf()
keras = import_keras()
log = logging.getLogger(__name__)
# Base class typed Any: mypy cannot see through the runtime-selected Keras module.
_Callback: Any = keras.callbacks.Callback

METRICS = ("loss", "accuracy", "perplexity")


class StoppedAtCheckpoint(Exception):
    """Raised out of ``fit`` when the time budget stops a run at a step checkpoint (caught by training)."""


def weights_finite(variables: list[Any]) -> bool:
    """True when every value of every variable is finite."""
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]).numpy())


class RunTracker(_Callback):
    """Records the run in a :class:`~kogpt2.checkpointing.RunState` and checkpoints it.

    Per batch: stops on a non-finite loss (the epoch is then neither recorded nor
    checkpointed); every ``save_steps`` batches writes a step checkpoint, every
    ``eval_steps`` batches scores the validation split. Per epoch: records the epoch's
    figures (over all its batches, also when it was resumed mid-way), tracks the best
    validation loss (early stopping), enforces the time budget, checkpoints model and
    optimizer. Weights are checked finite before any checkpoint.
    """

    def __init__(
        self,
        state: RunState,
        backup: str,
        checkpoint: Any,
        weights: Any,
        *,
        epochs: int,
        steps_per_epoch: int,
        patience: int = 0,
        max_seconds: float | None = None,
        started: float = 0.0,
        save_steps: int = 0,
        eval_steps: int = 0,
        scorer: Any = None,
        val_data: Any = None,
        val_steps: int | None = None,
    ):
        super().__init__()
        self.state, self.backup, self.weights = state, backup, weights
        self.epochs, self.steps_per_epoch, self.patience = epochs, steps_per_epoch, patience
        self.max_seconds, self.started = max_seconds, started or time.monotonic()
        self.save_steps, self.eval_steps, self.scorer, self.val_data = save_steps, eval_steps, scorer, val_data
        self.val_steps = val_steps
        self.manager = tf.train.CheckpointManager(checkpoint, join(backup, "ckpt"), max_to_keep=2)
        self._epoch = 0
        self._epoch_started = time.monotonic()
        self._base: dict[str, list[float]] = {}
        self._train_totals: dict[str, list[float]] = {}
        self._skipped = self._done = 0
        #: stopped by the time budget at a step checkpoint: the epoch in progress is not recorded
        self.stopped_mid_epoch = False

    # -- helpers

    def _save_state(self) -> None:
        self.state.save(join(self.backup, STATE_FILE))

    def _totals(self) -> dict[str, list[float]]:
        """``{metric: [total, count]}`` over the epoch's batches so far, including those before a resume."""
        out = {}
        for m in self.model.metrics:
            base = self._base.get(m.name, [0.0, 0.0])
            out[m.name] = [base[0] + float(m.total.numpy()), base[1] + float(m.count.numpy())]
        return out

    def _fail(self, reason: str) -> None:
        self.state.failure = reason
        self.model.stop_training = True
        self._save_state()
        log.error("training stopped: %s; the last good checkpoint is kept in %s", reason, self.backup)

    def _weights_ok(self, when: str) -> bool:
        if weights_finite(self.model.trainable_variables):
            return True
        self._fail(f"weights became non-finite {when}")
        return False

    # -- Keras hooks

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._epoch_started = epoch, time.monotonic()
        self._skipped = self.state.epoch_steps  # batches of this epoch already trained before a resume
        self._base = {k: list(v) for k, v in self.state.partial.items()}
        self._train_totals = {}
        self._done = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        before = self._epoch * self.steps_per_epoch + self._skipped + self._done  # global batch count
        self._done = batch + 1
        epoch_steps = self._skipped + self._done
        now = self._epoch * self.steps_per_epoch + epoch_steps
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._fail(f"non-finite training loss ({float(loss)}) in epoch {self._epoch + 1}, batch {epoch_steps}")
            return
        if epoch_steps >= self.steps_per_epoch:
            # Validation reuses the metric objects before on_epoch_end: keep the training sums now.
            self._train_totals = self._totals()
            return  # the epoch-end checkpoint and validation follow
        # Every N global batches (crossing a multiple, also with steps_per_execution > 1), as
        # transformers does: a resumed run keeps the schedule of an uninterrupted one.
        if self.eval_steps and self.val_data is not None and before // self.eval_steps != now // self.eval_steps:
            self._evaluate(epoch_steps)
        if self.save_steps and before // self.save_steps != now // self.save_steps:
            self._save_step(epoch_steps)

    def _evaluate(self, epoch_steps: int) -> None:
        scores = self.scorer.evaluate(self.val_data, steps=self.val_steps, verbose=0, return_dict=True)
        entry: dict[str, Any] = {
            "epoch": self._epoch + 1,
            "epoch_step": epoch_steps,
            "step": int(self.model.optimizer.iterations.numpy()),
        }
        entry.update({f"val_{k}": float(scores[k]) for k in METRICS})
        self.state.evaluations.append(entry)
        log.info("epoch %d, batch %d: val_loss %.4f", self._epoch + 1, epoch_steps, entry["val_loss"])

    def _save_step(self, epoch_steps: int) -> None:
        if not self._weights_ok(f"in epoch {self._epoch + 1} before batch {epoch_steps}'s checkpoint"):
            return
        s = self.state
        s.partial = self._totals()
        s.partial_seconds += time.monotonic() - self._epoch_started
        self._epoch_started = time.monotonic()
        s.epoch_steps = epoch_steps
        s.checkpoint = self.manager.save(checkpoint_number=self._epoch * self.steps_per_epoch + epoch_steps)
        s.step = int(self.model.optimizer.iterations.numpy())
        if self._out_of_time():  # stop here: --resume continues from this very batch
            s.stopped_by_time = True
            self.stopped_mid_epoch = True
            self.model.stop_training = True
            log.info("time budget of %ss spent: stopped at the checkpoint after batch %d of epoch %d",
                     self.max_seconds, epoch_steps, self._epoch + 1)  # fmt: skip
        self._save_state()
        if self.stopped_mid_epoch:
            raise StoppedAtCheckpoint(epoch_steps)  # out of fit now: Keras would validate the partial epoch first

    def _out_of_time(self) -> bool:
        return bool(self.max_seconds) and time.monotonic() - self.started > float(self.max_seconds or 0)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        s, n = self.state, epoch + 1
        if self.stopped_mid_epoch:
            return  # the epoch is not over: its step checkpoint holds it
        if s.failure or not self._weights_ok(f"in epoch {n}"):
            return  # a failed epoch is neither recorded nor checkpointed
        logs = dict(logs or {})
        entry: dict[str, Any] = {"epoch": n}
        for name, (total, count) in (self._train_totals or self._totals()).items():
            mean = total / count if count else float("nan")
            entry[name] = math.exp(mean) if name == "perplexity" else mean
        for key in ("val_loss", "val_accuracy", "val_perplexity"):
            entry[key] = float(logs[key]) if key in logs else None
        entry["seconds"] = round(s.partial_seconds + time.monotonic() - self._epoch_started, 3)
        entry["steps"] = int(self.model.optimizer.iterations.numpy())
        entry["train_tokens"] = int(self.model.train_tokens.numpy())
        s.epochs.append(entry)
        s.epoch_steps, s.partial, s.partial_seconds = 0, {}, 0.0
        val = entry["val_loss"]
        if val is not None and math.isfinite(val) and (s.best_val_loss is None or val < s.best_val_loss):
            s.best_epoch, s.best_val_loss, s.wait = n, val, 0
            s.best_checkpoint = self.weights.write(join(self.backup, f"best-{n}"))
        elif val is not None:
            s.wait += 1
        if self.patience and s.wait >= self.patience and n < self.epochs:
            s.stopped_early = True
            self.model.stop_training = True
            log.info("early stopping after epoch %d: no better val_loss than epoch %d's for %d epochs",
                     n, s.best_epoch, s.wait)  # fmt: skip
        budget = self.max_seconds
        if self._out_of_time() and n < self.epochs and not s.stopped_early:
            s.stopped_by_time = True
            self.model.stop_training = True
            log.info("time budget of %ss spent after epoch %d", budget, n)
        s.checkpoint = self.manager.save(checkpoint_number=n * self.steps_per_epoch)
        s.step = entry["steps"]
        self._save_state()
        for old in tf.io.gfile.glob(join(self.backup, "best-*")):
            if s.best_checkpoint and not old.startswith(s.best_checkpoint + "."):
                tf.io.gfile.remove(old)


class EpochSummaries(_Callback):
    """TensorBoard scalars per epoch (``logs/train``, ``logs/validation``: loss, accuracy,
    perplexity, learning rate), written with TensorFlow's own summary ops, so no
    ``tensorboard`` package is needed to write them."""

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(join(self.log_dir, name))
        return self._writers[name]

    def __init__(self, log_dir: str, tracker: RunTracker | None = None):
        super().__init__()
        self.log_dir = log_dir
        self.tracker = tracker
        self._writers: dict[str, Any] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from tensorflow.core.framework import summary_pb2

        if self.tracker is not None and self.tracker.stopped_mid_epoch:
            return  # a partial epoch's figures are not the epoch's

        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        step = epoch + 1
        scalars: dict[str, dict[str, float]] = {"train": {}, "validation": {}}
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            scalars[split][f"epoch_{name}"] = float(value)
        scalars["train"]["epoch_learning_rate"] = current_learning_rate(self.model.optimizer)
        for split, values in scalars.items():
            if not values:
                continue
            with self._writer(split).as_default():
                for tag, value in values.items():
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=meta)
            self._writers[split].flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
