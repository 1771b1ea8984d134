"""Training: fine-tune (or train from scratch) a GPT-2 LM on preprocessing shards.

:func:`train` runs one job from a frozen :class:`TrainConfig`: ``tf.data`` over the
shards, masked cross-entropy (padding never counts), masked accuracy and perplexity
on train and validation every epoch, early stopping on validation loss with the best
weights kept, a resumable checkpoint each epoch, and a self-describing model folder
with ``history.json``, ``curves.png`` and TensorBoard logs beside it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kogpt2.dataset import ShardSet, check_tokenizer, make_dataset, open_shards
from kogpt2.evaluate import LMTrainer
from kogpt2.model import PRESETS, load_model, model_fingerprint, new_model, read_model_info, save_model
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.tokenizer import Tokenizer, TokenizerError, find_tokenizer_file, load_tokenizer

tf = import_tf()
keras = import_keras()
log = logging.getLogger(__name__)
# Base classes typed Any: mypy cannot see through the runtime-selected Keras module.
_Schedule: Any = keras.optimizers.schedules.LearningRateSchedule
_Callback: Any = keras.callbacks.Callback

BACKUP_DIR = "backup"
STATE_FILE = "state.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
LOGS_DIR = "logs"
#: Files a finished run writes into ``--output`` (removed by ``overwrite``).
OUTPUT_FILES = ("config.json", "generation_config.json", "tf_model.h5", "tokenizer.spiece", "tokenizer.json",
                "kogpt2.json", HISTORY_FILE, CURVES_FILE)  # fmt: skip
#: Test hook: ``os._exit`` right after this epoch's checkpoint is written (simulates preemption).
EXIT_AFTER_EPOCH_ENV = "KOGPT2_TEST_EXIT_AFTER_EPOCH"
STRATEGIES = ("auto", "mirrored", "default")
SCHEDULES = ("constant", "cosine")
#: Config fields that may change between a killed run and its ``resume``.
RESUMABLE_CHANGES = frozenset({"output", "resume", "overwrite", "max_seconds"})


@dataclass(frozen=True)
class TrainConfig:
    """One training job.

    Attributes:
        data: preprocessing output folder (``info.json``, shards, ``COMPLETED``).
        model: a model folder to fine-tune, or a preset (``tiny``, ``small``, ``base``) to train from scratch.
        output: folder for the model, ``history.json``, ``curves.png``, ``logs/``.
        epochs: maximum number of epochs.
        batch_size: global batch size (split across replicas).
        learning_rate: peak learning rate (Adam, as the notebook).
        warmup_steps: linear warmup steps.
        lr_schedule: after warmup, ``constant`` or ``cosine`` decay to 0 at the last step.
        weight_decay: decoupled weight decay (AdamW) when > 0; LayerNorm and biases excluded.
        clip_norm: clip gradients to this global norm.
        early_stopping_patience: stop after this many epochs without a better validation
            loss; ``0`` disables. The best epoch's weights are saved either way.
        seed: seeds weights of presets, dropout and the shuffle order.
        mixed_precision: float16 compute on GPUs (bfloat16 on CPUs), float32 weights.
        jit_compile: compile the train step with XLA.
        steps_per_execution: train steps per ``tf.function`` call.
        strategy: ``auto`` (MirroredStrategy when several GPUs are visible), ``mirrored``
            (all visible GPUs, or all logical CPUs without GPUs) or ``default``.
        shuffle_buffer: examples in the shuffle buffer.
        tokenizer: tokenizer file for preset training (default: the one in ``data``).
        resume: continue an interrupted run in ``output`` (or start one if there is none).
        overwrite: replace a run already in ``output``.
        max_seconds: time budget; training stops after the first epoch that ends past it.
    """

    data: str
    model: str
    output: str
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    clip_norm: float | None = None
    early_stopping_patience: int = 2
    seed: int = 0
    mixed_precision: bool = False
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: str = "auto"
    shuffle_buffer: int = 10_000
    tokenizer: str | None = None
    resume: bool = False
    overwrite: bool = False
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("data", "model", "output"):
            if not str(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name}: required")
        for name in ("epochs", "batch_size", "steps_per_execution", "shuffle_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}: must be a positive integer")
        for name in ("warmup_steps", "early_stopping_patience", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}: must be an integer >= 0")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate!r}: must be in (0, 1)")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay!r}: must be in [0, 1)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"TrainConfig.clip_norm={self.clip_norm!r}: must be > 0 (or None for no clipping)")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"TrainConfig.max_seconds={self.max_seconds!r}: must be > 0 (or None)")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TrainConfig.strategy={self.strategy!r}: must be one of {STRATEGIES}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule={self.lr_schedule!r}: must be one of {SCHEDULES}")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig.resume and TrainConfig.overwrite: choose one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output: the output folder (a model folder: ``load_model(output)`` works).
        history: the ``history.json`` document.
    """

    output: Path
    history: dict[str, Any]

    @property
    def best_epoch(self) -> int:
        return int(self.history["best_epoch"])

    @property
    def best_val_loss(self) -> float | None:
        return self.history["best_val_loss"]

    @property
    def best_val_perplexity(self) -> float | None:
        return self.history["best_val_perplexity"]

    def summary(self) -> str:
        """One line: best epoch, validation loss and perplexity, output folder."""
        h = self.history
        how = " (stopped early)" if h["stopped_early"] else " (time budget)" if h.get("stopped_by_time") else ""
        if h["best_val_loss"] is None:
            val = f"train loss {h['epochs'][-1]['loss']:.4f} (no validation split)"
        else:
            val = f"val loss {h['best_val_loss']:.4f}, perplexity {h['best_val_perplexity']:.2f}"
        return (
            f"best epoch {h['best_epoch']}/{h['epochs_run']}{how}: {val}, "
            f"{h['steps']} steps, {h['train_tokens']} train tokens -> {self.output}"
        )


# ----------------------------------------------------------------------------- optimizer, strategy


class WarmupSchedule(_Schedule):
    """Linear warmup to ``peak``, then constant or cosine decay to 0 at ``total_steps``."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, kind: str = "constant"):
        super().__init__()
        self.peak, self.warmup_steps, self.total_steps, self.kind = peak, warmup_steps, total_steps, kind

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        warm = self.peak * tf.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        if self.kind == "constant":
            return warm
        progress = tf.clip_by_value((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        cosine = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "kind": self.kind,
        }


def make_optimizer(config: TrainConfig, total_steps: int) -> Any:
    """Adam (AdamW with ``weight_decay``), warmup/schedule and global-norm clipping per ``config``."""
    lr: Any = config.learning_rate
    if config.warmup_steps or config.lr_schedule != "constant":
        lr = WarmupSchedule(config.learning_rate, config.warmup_steps, total_steps, config.lr_schedule)
    kwargs = {"learning_rate": lr, "epsilon": 1e-8, "global_clipnorm": config.clip_norm}
    if config.weight_decay:
        opt = keras.optimizers.AdamW(weight_decay=config.weight_decay, **kwargs)
        opt.exclude_from_weight_decay(var_names=["ln_", "bias"])  # LayerNorm scales/shifts, biases
    else:
        opt = keras.optimizers.Adam(**kwargs)
    if keras.mixed_precision.global_policy().compute_dtype == "float16":
        opt = keras.mixed_precision.LossScaleOptimizer(opt)
    return opt


def make_strategy(name: str = "auto") -> Any:
    """A ``tf.distribute`` strategy: ``auto`` mirrors over several GPUs, else the default one.

    ``mirrored`` mirrors over all visible GPUs, or over all logical CPU devices when there
    is no GPU (tests split the CPU into two logical devices). One MirroredStrategy is
    shared per process: two instances would clash in their collective-op keys.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}: must be one of {STRATEGIES}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return _mirrored(tuple(d.name for d in devices))


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> Any:
    return tf.distribute.MirroredStrategy(devices=list(devices))


def _set_precision(enabled: bool) -> Any:
    """Set the global Keras dtype policy; return the previous one."""
    previous = keras.mixed_precision.global_policy()
    if enabled:
        name = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        keras.mixed_precision.set_global_policy(name)
    return previous


# ----------------------------------------------------------------------------- model and tokenizer


def _preset_tokenizer(config: TrainConfig, shards: ShardSet) -> Tokenizer:
    """The tokenizer a preset is trained with: ``config.tokenizer``, else the one beside the shards."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    candidates: list[Path] = []
    folder = Path(shards.folder)
    if folder.is_dir():
        try:
            candidates.append(find_tokenizer_file(folder))
        except TokenizerError:
            pass
    for key in ("path", "file"):
        recorded = shards.tokenizer_info.get(key)
        if isinstance(recorded, str):
            candidates.append(Path(recorded) if Path(recorded).is_absolute() else folder / recorded)
    for path in candidates:
        if path.is_file():
            return load_tokenizer(path)
    raise ValueError(
        f"--model {config.model} trains from scratch and needs the shards' tokenizer, but {shards.folder} "
        "holds none: pass --tokenizer PATH (the file given to preprocessing)"
    )


def _load_tokenizer_for(config: TrainConfig, shards: ShardSet) -> tuple[Tokenizer, int | None]:
    """The model's tokenizer and embedding rows, read without loading weights."""
    if config.model in PRESETS and not Path(config.model).exists():
        return _preset_tokenizer(config, shards), None
    folder = Path(config.model)
    if config.tokenizer:
        log.warning("--tokenizer %s is ignored: %s brings its own tokenizer", config.tokenizer, config.model)
    if not folder.is_dir():
        raise ValueError(
            f"--model {config.model}: neither a model folder nor a preset ({', '.join(PRESETS)}); "
            "download hub models to a folder first"
        )
    vocab = None
    if (folder / "config.json").is_file():
        vocab = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    return load_tokenizer(folder), vocab


def _build_model(config: TrainConfig, tokenizer: Tokenizer) -> Any:
    if config.model in PRESETS and not Path(config.model).exists():
        return new_model(config.model, tokenizer, seed=config.seed)
    lm, _ = load_model(config.model)
    return lm


def _base_model_info(config: TrainConfig) -> dict[str, Any]:
    if config.model in PRESETS and not Path(config.model).exists():
        return {"preset": config.model}
    info: dict[str, Any] = {"folder": str(Path(config.model).resolve())}
    try:
        info["fingerprint"] = model_fingerprint(config.model)
    except ValueError:
        pass
    parent = read_model_info(config.model).get("info", {})
    if parent.get("data_fingerprint"):
        info["data_fingerprint"] = parent["data_fingerprint"]
    return info


# ----------------------------------------------------------------------------- run state (resume)


@dataclass
class RunState:
    """What survives preemption: epochs done, best epoch, early-stopping wait, checkpoints."""

    config: dict[str, Any]
    data_fingerprint: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float | None = None
    wait: int = 0
    stopped_early: bool = False
    stopped_by_time: bool = False
    checkpoint: str | None = None
    best_checkpoint: str | None = None
    starts: int = 0

    @classmethod
    def load(cls, path: Path) -> RunState:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a kill leaves the old state or the new one

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.stopped_by_time or len(self.epochs) >= int(self.config["epochs"])


def _config_changes(old: dict[str, Any], new: TrainConfig) -> list[str]:
    now = new.to_dict()
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in now.items() if k not in RESUMABLE_CHANGES and old.get(k) != v]


def _prepare_output(config: TrainConfig, shards: ShardSet) -> RunState | None:
    """Check ``output`` against ``resume``/``overwrite``; return the run state, or None if already done."""
    out = Path(config.output)
    backup = out / BACKUP_DIR
    state_path = backup / STATE_FILE
    if state_path.is_file():
        state = RunState.load(state_path)
        if config.resume:
            changes = _config_changes(state.config, config)
            if changes:
                raise ValueError(f"--resume: {out} holds a run with other settings ({'; '.join(changes)})")
            if state.data_fingerprint != shards.data_fingerprint:
                raise ValueError(f"--resume: the shards in {shards.folder} changed since the run in {out} started")
            return state
        if not config.overwrite:
            raise RuntimeError(
                f"{out} holds an interrupted run ({len(state.epochs)} of {state.config['epochs']} epochs "
                "checkpointed): pass --resume to continue it, or --overwrite to start again"
            )
    elif (out / HISTORY_FILE).is_file() and not config.overwrite:
        if config.resume:
            done = json.loads((out / HISTORY_FILE).read_text(encoding="utf-8"))
            changes = _config_changes(done.get("config", {}), config)
            if changes:
                raise ValueError(f"--resume: {out} holds a finished run with other settings ({'; '.join(changes)})")
            return None
        raise RuntimeError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output")
    elif not config.overwrite and any((out / name).exists() for name in OUTPUT_FILES):
        raise RuntimeError(f"{out} already holds a model folder: pass --overwrite to replace it, or another --output")
    if config.overwrite:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in (BACKUP_DIR, LOGS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    backup.mkdir(parents=True, exist_ok=True)
    state = RunState(config=config.to_dict(), data_fingerprint=shards.data_fingerprint)
    state.save(state_path)
    return state


class RunTracker(_Callback):
    """Per epoch: record metrics, track the best validation loss (early stopping), enforce the
    time budget, then checkpoint model + optimizer and the run state (a BackupAndRestore
    equivalent that also keeps the best weights and the history across restarts)."""

    def __init__(
        self, state: RunState, backup: Path, checkpoint: Any, weights: Any, config: TrainConfig, started: float
    ):
        super().__init__()
        self.state, self.backup, self.config, self.started = state, backup, config, started
        self.manager = tf.train.CheckpointManager(checkpoint, str(backup / "ckpt"), max_to_keep=2)
        self.weights = weights  # tf.train.Checkpoint of the LM alone (best weights)
        self._epoch_started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        s, n = self.state, epoch + 1
        entry: dict[str, Any] = {"epoch": n}
        for key in ("loss", "accuracy", "perplexity", "val_loss", "val_accuracy", "val_perplexity"):
            entry[key] = float(logs[key]) if key in logs else None
        entry["seconds"] = round(time.monotonic() - self._epoch_started, 3)
        entry["steps"] = int(self.model.optimizer.iterations.numpy())
        entry["train_tokens"] = int(self.model.train_tokens.numpy())
        s.epochs.append(entry)
        val = entry["val_loss"]
        if val is not None and math.isfinite(val) and (s.best_val_loss is None or val < s.best_val_loss):
            s.best_epoch, s.best_val_loss, s.wait = n, val, 0
            s.best_checkpoint = self.weights.write(str(self.backup / f"best-{n}"))
        elif val is not None:
            s.wait += 1
        patience = self.config.early_stopping_patience
        if patience and s.wait >= patience and n < self.config.epochs:
            s.stopped_early = True
            self.model.stop_training = True
            log.info(
                "early stopping after epoch %d: no better val_loss than epoch %d's for %d epochs",
                n,
                s.best_epoch,
                s.wait,
            )
        budget = self.config.max_seconds
        if budget and time.monotonic() - self.started > budget and n < self.config.epochs and not s.stopped_early:
            s.stopped_by_time = True
            self.model.stop_training = True
            log.info("time budget of %ss spent after epoch %d", budget, n)
        s.checkpoint = self.manager.save(checkpoint_number=n)
        s.save(self.backup / STATE_FILE)
        for old in self.backup.glob("best-*"):
            if s.best_checkpoint and not old.name.startswith(Path(s.best_checkpoint).name + "."):
                old.unlink(missing_ok=True)
        if os.environ.get(EXIT_AFTER_EPOCH_ENV) == str(n):
            os._exit(75)  # test hook: a preemption right after the checkpoint


class EpochSummaries(_Callback):
    """TensorBoard scalars per epoch (``logs/train``, ``logs/validation``: loss, accuracy,
    perplexity, learning rate), written with TensorFlow's own summary ops, so no
    ``tensorboard`` package is needed to write them."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = log_dir
        self._writers: dict[str, Any] = {}

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
        return self._writers[name]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from tensorflow.core.framework import summary_pb2

        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        step = epoch + 1
        scalars: dict[str, dict[str, float]] = {"train": {}, "validation": {}}
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            scalars[split][f"epoch_{name}"] = float(value)
        lr = self.model.optimizer.learning_rate
        lr = lr(self.model.optimizer.iterations) if callable(lr) else lr
        scalars["train"]["epoch_learning_rate"] = float(tf.convert_to_tensor(lr).numpy())
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


# ----------------------------------------------------------------------------- the job


def train(config: TrainConfig, *, progress: bool = True, callbacks: list[Any] | None = None) -> TrainResult:
    """Run one training job (see the module docstring); the entry point of ``kogpt2 train``.

    Args:
        config: the job.
        progress: print Keras progress (one line per epoch when stdout is not a terminal).
        callbacks: extra Keras callbacks.

    Returns:
        A :class:`TrainResult`; ``config.output`` holds the best epoch's model folder,
        ``history.json``, ``curves.png`` and ``logs/``.

    Raises:
        ShardError: unfinished or malformed shards.
        TokenizerMismatchError: shards made with another tokenizer than the model's.
        RuntimeError: ``output`` holds another run (see ``resume``/``overwrite``).
        ValueError: ``resume`` with changed settings or data; a preset without a tokenizer.
    """
    started = time.monotonic()
    out = Path(config.output)
    shards = open_shards(config.data)
    tokenizer, vocab_rows = _load_tokenizer_for(config, shards)
    check_tokenizer(shards, tokenizer, model_vocab_size=vocab_rows, model=f"--model {config.model}")
    if shards.num_examples("train") == 0:
        raise ValueError(f"{shards.folder}: no training examples")
    state = _prepare_output(config, shards)
    if state is None:
        log.info("%s: run already finished; nothing to resume", out)
        return TrainResult(out, json.loads((out / HISTORY_FILE).read_text(encoding="utf-8")))
    state.starts += 1
    backup = out / BACKUP_DIR
    previous_policy = _set_precision(config.mixed_precision)
    try:
        keras.utils.set_random_seed(config.seed)  # preset weights, dropout (the shuffle order is stateless)
        strategy = make_strategy(config.strategy)
        steps_per_epoch = shards.steps("train", config.batch_size)
        with strategy.scope():
            lm = _build_model(config, tokenizer)
            optimizer = make_optimizer(config, steps_per_epoch * config.epochs)
            trainer = LMTrainer(lm)
            trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile,
                            steps_per_execution=config.steps_per_execution)  # fmt: skip
            optimizer.build(lm.trainable_variables)
            checkpoint = tf.train.Checkpoint(lm=lm, optimizer=optimizer, train_tokens=trainer.train_tokens)
            weights = tf.train.Checkpoint(lm=lm)
            if state.checkpoint:
                checkpoint.read(state.checkpoint).assert_existing_objects_matched()
                log.info("resumed from %s after epoch %d", state.checkpoint, len(state.epochs))
        has_val = shards.num_examples("validation") > 0
        initial_epoch = len(state.epochs)
        if not state.finished:
            train_ds = make_dataset(shards, "train", config.batch_size, training=True, seed=config.seed,
                                    first_epoch=initial_epoch, epochs=config.epochs,
                                    shuffle_buffer=config.shuffle_buffer)  # fmt: skip
            val_ds = make_dataset(shards, "validation", config.batch_size) if has_val else None
            tracker = RunTracker(state, backup, checkpoint, weights, config, started)
            board = EpochSummaries(out / LOGS_DIR)
            verbose = (1 if sys.stdout.isatty() else 2) if progress else 0
            trainer.fit(
                train_ds,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                validation_data=val_ds,
                callbacks=[keras.callbacks.TerminateOnNaN(), board, tracker, *(callbacks or [])],
                verbose=verbose,
            )
        if not state.epochs:
            raise RuntimeError("training stopped before the first epoch ended (NaN loss?)")
        if state.best_checkpoint:
            weights.read(state.best_checkpoint).assert_existing_objects_matched()
        else:  # no validation split: the last epoch is the result
            state.best_epoch = len(state.epochs)
        history = _history(config, state, shards, strategy, time.monotonic() - started)
        info = {
            "data_fingerprint": shards.data_fingerprint,
            "data": shards.folder,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "steps": history["steps"],
            "epochs": history["epochs_run"],
            "best_epoch": history["best_epoch"],
            "best_val_loss": history["best_val_loss"],
            "best_val_perplexity": history["best_val_perplexity"],
            "train_tokens": history["train_tokens"],
            "base_model": _base_model_info(config),
            "config": config.to_dict(),
        }
        save_model(lm, tokenizer, out, info)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    write_history(out, history)
    shutil.rmtree(backup, ignore_errors=True)
    return TrainResult(out, history)


def _history(config: TrainConfig, state: RunState, shards: ShardSet, strategy: Any, seconds: float) -> dict[str, Any]:
    epochs = state.epochs
    best = epochs[state.best_epoch - 1]
    return {
        "epochs": epochs,
        "best_epoch": state.best_epoch,
        "best_val_loss": best["val_loss"],
        "best_val_perplexity": best["val_perplexity"],
        "epochs_run": len(epochs),
        "stopped_early": state.stopped_early,
        "stopped_by_time": state.stopped_by_time,
        "train_tokens": epochs[-1]["train_tokens"],
        "steps": epochs[-1]["steps"],
        "seconds": round(sum(e["seconds"] for e in epochs), 3),
        "wall_seconds_last_start": round(seconds, 3),
        "starts": state.starts,
        "replicas": int(strategy.num_replicas_in_sync),
        "data": shards.folder,
        "data_fingerprint": shards.data_fingerprint,
        "tokenizer_fingerprint": shards.tokenizer_info["fingerprint"],
        "config": config.to_dict(),
    }


def write_history(folder: str | Path, history: dict[str, Any]) -> None:
    """Write ``history.json`` and ``curves.png`` (loss and accuracy per epoch, train vs validation)."""
    folder = Path(folder)
    (folder / HISTORY_FILE).write_text(json.dumps(history, ensure_ascii=False, indent=2), encoding="utf-8")
    plot_curves(history, folder / CURVES_FILE)


def plot_curves(history: dict[str, Any], path: str | Path) -> None:
    """Plot train vs validation loss and accuracy per epoch, marking the best epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history["epochs"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "loss", "loss (nats/token)"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [e[key] for e in history["epochs"]], "o-", label="train")
        val = [e[f"val_{key}"] for e in history["epochs"]]
        if any(v is not None for v in val):
            ax.plot(epochs, [float("nan") if v is None else v for v in val], "s-", label="validation")
        ax.axvline(history["best_epoch"], color="grey", linestyle=":", label=f"best (epoch {history['best_epoch']})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
