"""Training: fine-tune (or train from scratch) a GPT-2 LM on preprocessing shards.

:func:`train` runs one job from a frozen :class:`TrainConfig`: ``tf.data`` over the
shards, masked cross-entropy (padding never counts), masked accuracy and perplexity
on train and validation every epoch, early stopping on validation loss with the best
weights kept, resumable checkpoints at every epoch end (and every ``save_steps``
batches), and a self-describing model folder with ``history.json``, ``curves.png`` and
TensorBoard logs beside it. The pieces live in their own modules: :mod:`kogpt2.schedules`
(learning rate, optimizer), :mod:`kogpt2.precision`, :mod:`kogpt2.distribute`,
:mod:`kogpt2.checkpointing` (resume state), :mod:`kogpt2.callbacks`, :mod:`kogpt2.curves`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kogpt2 import outputs
from kogpt2.callbacks import EXIT_AFTER_EPOCH_ENV, STEP_SLEEP_ENV, EpochSummaries, RunTracker, StoppedAtCheckpoint
from kogpt2.checkpointing import (
    BACKUP_DIR,
    HISTORY_FILE,
    LOGS_DIR,
    STATE_FILE,
    RunState,
    TrainingFailed,
    join,
    publish,
)
from kogpt2.curves import plot_curves, write_history
from kogpt2.dataset import ShardSet, check_tokenizer, make_dataset, open_shards
from kogpt2.distribute import DISTRIBUTION_STRATEGIES, InputPlan, Worker, make_strategy, plan_input, worker_of
from kogpt2.evaluate import LMTrainer
from kogpt2.flags import flag
from kogpt2.model import PRESETS, load_model, model_fingerprint, new_model, read_model_info, save_model
from kogpt2.outputs import (
    ALREADY_COMPLETE,
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_LEASE_SECONDS,
    RESUME,
    WORK_PREFIX,
    OutputConflictError,
    OutputRun,
    refuse_output_over_inputs,
)
from kogpt2.precision import AUTO, PRECISIONS, dtype_policy, normalize_precision, resolve_policy
from kogpt2.schedules import SCHEDULES, WarmupSchedule, make_optimizer
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.tokenizer import Tokenizer, TokenizerError, find_tokenizer_file, load_tokenizer
from kogpt2.validate import check_bool, check_choice, check_int, check_number

tf = import_tf()
keras = import_keras()
log = logging.getLogger(__name__)

#: The job's name in manifests and locks.
JOB = "train"

__all__ = [
    "EXIT_AFTER_EPOCH_ENV", "STEP_SLEEP_ENV", "PRECISIONS", "SCHEDULES", "DISTRIBUTION_STRATEGIES", "TrainConfig", "TrainResult",
    "TrainingFailed", "WarmupSchedule", "make_optimizer", "make_strategy", "plot_curves", "train", "write_history",
]  # fmt: skip


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
        lr_schedule: after warmup, ``constant`` (default), ``linear`` (transformers' default)
            or ``cosine`` decay to 0 at the last step.
        weight_decay: decoupled weight decay (AdamW) when > 0; LayerNorm and biases excluded.
        clip_norm: clip gradients to this global norm.
        early_stopping_patience: stop after this many epochs without a better validation
            loss; ``0`` disables. The best epoch's weights are saved either way.
        seed: seeds weights of presets, dropout and the shuffle order.
        mixed_precision: ``no`` (float32), ``bf16`` (CPUs and GPUs) or ``fp16`` (GPUs, loss
            scaling); ``auto`` (the old boolean flag): fp16 on GPUs, bf16 on CPUs.
        jit_compile: compile the train step with XLA.
        steps_per_execution: train steps per ``tf.function`` call.
        strategy: ``auto`` (MirroredStrategy when several GPUs are visible), ``mirrored``
            (all visible GPUs, or all logical CPUs without GPUs) or ``default``.
        shuffle_buffer: examples in the shuffle buffer.
        tokenizer: tokenizer file for preset training (default: the one in ``data``).
        resume: continue an interrupted run in ``output`` (or start one if there is none).
        overwrite: replace a run already in ``output``.
        max_seconds: time budget; training stops after the first epoch that ends past it.
        save_steps: also checkpoint every this many batches within an epoch (0: epoch ends only).
        eval_steps: also score the validation split every this many batches (0: epoch ends only).
    """

    data: tuple[str, ...] = field(
        metadata=flag(
            "preprocessing outputs: one folder, several, or a glob of them (daily spans) with the same tokenizer "
            "and example format",
            metavar="DIR",
            required=True,
        )
    )
    model: str = field(
        metadata=flag(
            "model folder to fine-tune, or a preset to train from scratch: tiny, small, base", metavar="PATH_OR_PRESET"
        )
    )
    output: str = field(metadata=flag("output model folder (+ history.json, curves.png, logs/)", metavar="DIR"))
    epochs: int = field(default=10, metadata=flag("maximum epochs", metavar="N"))
    batch_size: int = field(default=16, metadata=flag("global batch size", metavar="N"))
    learning_rate: float = field(
        default=1e-4, metadata=flag("peak learning rate, Adam", metavar="LR", aliases=("--lr",))
    )
    warmup_steps: int = field(default=0, metadata=flag("linear warmup steps", metavar="N"))
    lr_schedule: str = field(
        default="constant",
        metadata=flag(
            "after warmup: constant, linear decay to 0 (transformers' default) or cosine decay to 0", choices=SCHEDULES
        ),
    )
    weight_decay: float = field(default=0.0, metadata=flag("AdamW decoupled weight decay (0: Adam)", metavar="W"))
    clip_norm: float | None = field(default=None, metadata=flag("clip gradients to this global norm", metavar="C"))
    early_stopping_patience: int = field(
        default=2,
        metadata=flag(
            "stop after N epochs without a better validation loss; 0 = off. The best epoch is saved", metavar="N"
        ),
    )
    seed: int = field(default=0, metadata=flag("seed of preset weights, dropout and shuffling", metavar="S"))
    mixed_precision: str = field(
        default="no",
        metadata=flag(
            "compute dtype: no = float32 (on CPU bf16 is emulated on most chips), bf16 (CPUs, GPUs), fp16 with loss "
            "scaling (GPUs only); the bare flag, as in earlier releases, is fp16 on GPUs, bf16 on CPUs",
            choices=(*PRECISIONS, AUTO),
            metavar="{no,bf16,fp16}",
            nargs="?",
            const=AUTO,
        ),
    )
    jit_compile: bool = field(default=False, metadata=flag("compile the train step with XLA", aliases=("--xla",)))
    steps_per_execution: int = field(default=1, metadata=flag("train steps per tf.function call", metavar="N"))
    strategy: str = field(
        default="auto",
        metadata=flag(
            "tf.distribute strategy; multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG "
            "(run the same command on every worker; the chief writes --output)",
            choices=DISTRIBUTION_STRATEGIES,
        ),
    )
    shuffle_buffer: int = field(default=10_000, metadata=flag("examples in the shuffle buffer", metavar="N"))
    tokenizer: str | None = field(
        default=None, metadata=flag("tokenizer of the shards, for preset training", metavar="PATH")
    )
    resume: bool = field(
        default=False, metadata=flag("continue an interrupted or time-stopped run in --output", per_run=True)
    )
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "start a new run even if --output holds another one (its version stays readable until this one commits)",
            per_run=True,
        ),
    )
    max_seconds: float | None = field(
        default=None,
        metadata=flag(
            "time budget: stop at the first checkpoint (epoch end, or --save-steps) past it; --resume continues",
            metavar="S",
        ),
    )
    keep_versions: int = field(
        default=DEFAULT_KEEP_VERSIONS,
        metadata=flag("committed model versions kept after a commit, the new one included", metavar="N"),
    )
    lease_seconds: float = field(
        default=DEFAULT_LEASE_SECONDS, metadata=flag("the output lock's lease", metavar="S", hidden=True)
    )
    save_steps: int = field(
        default=0,
        metadata=flag("also checkpoint every N batches within an epoch, so --resume continues mid-epoch", metavar="N"),
    )
    eval_steps: int = field(
        default=0,
        metadata=flag("also score the validation split every N batches (history.json 'evaluations')", metavar="N"),
    )

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        data = (self.data,) if isinstance(self.data, str) else tuple(self.data)
        object.__setattr__(self, "data", tuple(outputs.local_path(str(d)) for d in data))
        if not self.data or not all(self.data):
            raise ValueError(f"{owner}.data={self.data!r}: required (one or more shard folders)")
        object.__setattr__(
            self, "output", outputs.local_path(self.output) if isinstance(self.output, str) else self.output
        )
        for name in ("model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r}: required (a path)")
        for name in ("epochs", "batch_size", "steps_per_execution", "shuffle_buffer"):
            check_int(owner, name, getattr(self, name), low=1)
        for name in ("warmup_steps", "early_stopping_patience", "seed", "save_steps", "eval_steps"):
            check_int(owner, name, getattr(self, name), low=0)
        check_int(owner, "keep_versions", self.keep_versions, low=1, note="the new version included")
        check_number(owner, "lease_seconds", self.lease_seconds, gt=0)
        check_number(owner, "learning_rate", self.learning_rate, gt=0, lt=1)
        check_number(owner, "weight_decay", self.weight_decay, ge=0, lt=1)
        if self.clip_norm is not None:
            check_number(owner, "clip_norm", self.clip_norm, gt=0, note="or None for no clipping")
        if self.max_seconds is not None:
            check_number(owner, "max_seconds", self.max_seconds, gt=0, note="or None")
        check_choice(owner, "strategy", self.strategy, DISTRIBUTION_STRATEGIES)
        check_choice(owner, "lr_schedule", self.lr_schedule, SCHEDULES)
        for name in ("jit_compile", "resume", "overwrite"):
            check_bool(owner, name, getattr(self, name))
        try:  # the old boolean is accepted: True -> auto, False -> no
            object.__setattr__(self, "mixed_precision", normalize_precision(self.mixed_precision))
        except ValueError:
            raise ValueError(
                f"TrainConfig.mixed_precision={self.mixed_precision!r}: must be one of {(*PRECISIONS, AUTO)}"
            ) from None
        for name in ("save_steps", "eval_steps"):
            value = getattr(self, name)
            if value and value % self.steps_per_execution:
                raise ValueError(
                    f"TrainConfig.{name}={value}: must be a multiple of steps_per_execution={self.steps_per_execution}"
                )
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig.resume and TrainConfig.overwrite: choose one")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = list(self.data)
        return out


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output: the output folder (a model folder: ``load_model(output)`` works): a ``Path``,
            or the URL string of a remote folder.
        history: the ``history.json`` document.
    """

    output: Path | str
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
        if not h["epochs"]:
            part = h.get("partial_epoch") or {}
            return (
                f"stopped by the time budget {part.get('epoch_steps', 0)} batches into epoch 1 (no epoch finished "
                f"yet; --resume continues): {h['steps']} steps -> {self.output}"
            )
        if h["best_val_loss"] is None:
            val = f"train loss {h['epochs'][-1]['loss']:.4f} (no validation split)"
        else:
            val = f"val loss {h['best_val_loss']:.4f}, perplexity {h['best_val_perplexity']:.2f}"
        return (
            f"best epoch {h['best_epoch']}/{h['epochs_run']}{how}: {val}, "
            f"{h['steps']} steps, {h['train_tokens']} train tokens -> {self.output}"
        )


# ----------------------------------------------------------------------------- model and tokenizer


def _preset_tokenizer(config: TrainConfig, shards: ShardSet) -> Tokenizer:
    """The tokenizer a preset is trained with: ``config.tokenizer``, else the one beside the shards."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    candidates: list[Path] = []
    folder = Path(shards.roots[0]) if shards.roots else Path(shards.folder)  # the committed version's files
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
        ValueError: ``output`` is, contains or lies inside an input; ``resume`` with changed
            settings or data; a preset without a tokenizer; ``fp16`` without a GPU.
        TrainingFailed: the loss or the weights became non-finite; ``history.json`` says so,
            no model is saved and the last good checkpoint stays in ``output/backup``.
    """
    started = time.monotonic()
    # MultiWorkerMirroredStrategy configures collectives: before any other TensorFlow work.
    strategy = make_strategy(config.strategy) if config.strategy == "multi_worker" else None
    out = config.output.rstrip("/") or "/"  # a local path or a URL (gs://, ram://)
    refuse_output_over_inputs(config.output, _inputs_of(config))  # before anything is written
    shards = open_shards(config.data)
    tokenizer, vocab_rows = _load_tokenizer_for(config, shards)
    check_tokenizer(shards, tokenizer, model_vocab_size=vocab_rows, model=f"--model {config.model}")
    if shards.num_examples("train") == 0:
        raise ValueError(f"{shards.folder}: no training examples")
    policy = resolve_policy(config.mixed_precision)
    strategy = strategy or make_strategy(config.strategy)
    worker = worker_of(strategy)
    sig = signature(config, shards, tokenizer)
    if not worker.chief:  # writes nothing that could clash with the chief's: a scratch folder, deleted at the end
        state, scratch = _worker_scratch(config, shards, worker, sig)
        if state is None:
            return TrainResult(_result_path(out), {})
        try:
            return _run(config, state, None, scratch, shards, tokenizer, strategy, worker, policy, started, progress,
                        callbacks)  # fmt: skip
        finally:
            tf.io.gfile.rmtree(scratch)
    with outputs.claimed(out, JOB, sig, overwrite=config.overwrite, keep_versions=config.keep_versions,
                         lease_seconds=config.lease_seconds, work_prefix=WORK_PREFIX) as claim:  # fmt: skip
        state = _claimed_state(config, claim, shards)
        if state is None:
            done = outputs.open_committed(out, job=JOB)
            return TrainResult(_result_path(out), done.read_json(HISTORY_FILE))
        return _run(config, state, claim, claim.work, shards, tokenizer, strategy, worker, policy, started, progress,
                    callbacks)  # fmt: skip


#: Settings that do not shape the model (where it goes, how it is kept, when this start stops).
PER_RUN_SETTINGS = ("output", "resume", "overwrite", "max_seconds", "keep_versions", "lease_seconds")


def signature(config: TrainConfig, shards: ShardSet, tokenizer: Tokenizer) -> dict[str, Any]:
    """What shapes a run's model: the settings, the data's and tokenizer's contents, the base weights' contents.

    Paths are left out (a moved data folder is the same data); contents are hashed.
    """
    settings = {k: v for k, v in config.to_dict().items() if k not in PER_RUN_SETTINGS}
    settings.pop("data")
    settings.pop("tokenizer")
    base = _base_model_info(config)
    settings["model"] = base.get("preset") or base.get("fingerprint") or config.model
    return {
        "job": JOB,
        "settings": settings,
        "data_fingerprint": shards.data_fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }


def _claimed_state(config: TrainConfig, claim: OutputRun, shards: ShardSet) -> RunState | None:
    """The run state to train from in the claimed output folder, or None when there is nothing to do.

    Raises:
        OutputConflictError: an interrupted run with these settings and no ``--resume``.
    """
    state_path = join(claim.work, BACKUP_DIR, STATE_FILE)
    if claim.action == ALREADY_COMPLETE:
        log.info("%s already holds this run's model (version %d): nothing to do", claim.folder,
                 claim.current.version if claim.current else 0)  # fmt: skip
        return None
    if claim.action == RESUME and tf.io.gfile.exists(state_path):
        state = RunState.load(state_path)
        committed = claim.current is not None and claim.current.signature_hash == outputs.signature_hash(
            claim.signature
        )
        if committed and state.finished and not (state.stopped_by_time and len(state.epochs) < config.epochs):
            pending = outputs.read_pending(claim.folder)  # it committed, then died before forgetting its work
            if pending is not None:
                outputs.drop_pending(claim.folder, pending)
            log.info("%s already holds this run's model: nothing to do", claim.folder)
            return None
        if not config.resume:
            if committed and state.stopped_by_time:
                log.info(
                    "%s: this run stopped at its time budget and its model is committed (version %d); pass --resume "
                    "to train on",
                    claim.folder,
                    claim.current.version if claim.current else 0,
                )
                return None
            where = f", {state.epoch_steps} batches into epoch {len(state.epochs) + 1}" if state.epoch_steps else ""
            why = f" (it stopped with: {state.failure})" if state.failure else ""
            raise OutputConflictError(
                f"{claim.folder} holds an interrupted run of these settings ({len(state.epochs)} of "
                f"{state.config['epochs']} epochs checkpointed{where}){why}: pass --resume to continue it, or "
                "--overwrite to start a new one"
            )
        if state.failure:
            log.warning("resuming a run that stopped with: %s", state.failure)
            state.failure = None
        if state.stopped_by_time:
            state.stopped_by_time = False  # this start has a budget of its own
            log.info("continuing the run stopped by its time budget (%d epochs done)", len(state.epochs))
        state.config = config.to_dict()
        return state
    tf.io.gfile.makedirs(join(claim.work, BACKUP_DIR))
    state = RunState(config=config.to_dict(), data_fingerprint=shards.data_fingerprint)
    state.save(state_path)
    return state


def _run(
    config: TrainConfig,
    state: RunState,
    claim: OutputRun | None,
    out: str,
    shards: ShardSet,
    tokenizer: Tokenizer,
    strategy: Any,
    worker: Worker,
    policy: str,
    started: float,
    progress: bool,
    callbacks: list[Any] | None,
) -> TrainResult:
    """Build, restore, fit, commit: the body of :func:`train` once its work folder ``out`` is claimed.

    ``claim`` is the chief's claim on the output folder (None on other workers).
    """
    state.starts += 1
    backup = join(out, BACKUP_DIR)
    multi = config.strategy == "multi_worker"
    train_plan = plan_input(shards, "train", config.batch_size, worker) if multi else None
    has_val = shards.num_examples("validation") > 0
    if config.eval_steps and not has_val:
        log.warning(
            "--eval-steps %d: %s has no validation split; nothing to evaluate", config.eval_steps, shards.folder
        )
    val_plan = plan_input(shards, "validation", config.batch_size, worker) if multi and has_val else None
    with dtype_policy(policy):
        keras.utils.set_random_seed(config.seed)  # preset weights, dropout (the shuffle order is stateless)
        steps_per_epoch = train_plan.steps if train_plan else shards.steps("train", config.batch_size)
        with strategy.scope():
            lm = _build_model(config, tokenizer)
            optimizer = make_optimizer(
                config.learning_rate,
                warmup_steps=config.warmup_steps,
                total_steps=steps_per_epoch * config.epochs,
                schedule=config.lr_schedule,
                weight_decay=config.weight_decay,
                clip_norm=config.clip_norm,
            )
            trainer = LMTrainer(lm)
            trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile,
                            steps_per_execution=config.steps_per_execution)  # fmt: skip
            optimizer.build(lm.trainable_variables)
            scorer = LMTrainer(lm) if config.eval_steps else None  # its own metrics: the epoch's stay intact
            if scorer is not None:
                scorer.compile()
            checkpoint = tf.train.Checkpoint(lm=lm, optimizer=optimizer, train_tokens=trainer.train_tokens)
            weights = tf.train.Checkpoint(lm=lm)
            if state.checkpoint:
                _restore(checkpoint, optimizer, state)
        if not state.finished:
            val_ds = _input(strategy, worker, val_plan, shards, "validation", config) if has_val else None
            val_steps = val_plan.steps if val_plan else None
            tracker = RunTracker(
                state, backup, checkpoint, weights, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                patience=config.early_stopping_patience, max_seconds=config.max_seconds, started=started,
                save_steps=config.save_steps, eval_steps=config.eval_steps, scorer=scorer, val_data=val_ds,
                val_steps=val_steps,
            )  # fmt: skip
            fit_callbacks = [tracker, EpochSummaries(join(out, LOGS_DIR), tracker), *(callbacks or [])]
            verbose = (1 if sys.stdout.isatty() else 2) if progress else 0
            for first, last, skip in _segments(state, config.epochs):
                train_ds = _input(strategy, worker, train_plan, shards, "train", config, first, last, skip)
                try:
                    trainer.fit(train_ds, epochs=last, initial_epoch=first, steps_per_epoch=steps_per_epoch - skip,
                                validation_data=val_ds, validation_steps=val_steps, callbacks=fit_callbacks,
                                verbose=verbose)  # fmt: skip
                except StoppedAtCheckpoint:
                    break  # the time budget, at a step checkpoint: state.stopped_by_time
                if state.failure or state.finished:
                    break
        if state.failure:
            _record_failure(out, config, state, shards, strategy, started)
        if not state.epochs and not state.stopped_by_time:
            raise RuntimeError("training stopped before the first epoch ended")
        if not worker.chief or claim is None:
            return TrainResult(_result_path(config.output), _history(config, state, shards, strategy, 0.0))
        if state.best_checkpoint:
            weights.read(state.best_checkpoint).assert_existing_objects_matched()
        elif state.epochs:  # no validation split: the last epoch is the result
            state.best_epoch = len(state.epochs)
        # else: stopped by the time budget inside the first epoch: the weights as they are now
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
        resumable = state.stopped_by_time and len(state.epochs) < config.epochs
        history["resumable"] = resumable
        with tempfile.TemporaryDirectory(prefix="kogpt2-train-") as staging:
            # Written locally, then copied into a new version folder and committed by its manifest:
            # a run preempted while copying commits nothing (and keeps its backup to resume from).
            save_model(lm, tokenizer, staging, info)
            write_history(staging, history)
            version = outputs.new_folder_name()
            root = join(claim.folder, version)
            names = publish(Path(staging), root) + _copy_logs(join(out, LOGS_DIR), join(root, LOGS_DIR))
            manifest = outputs.commit(claim, names, summary=_status_summary(history), version_folder=version,
                                      keep_pending=resumable)  # fmt: skip
        log.info("committed %s version %d: %s", claim.folder, manifest.version, root)
    return TrainResult(_result_path(claim.folder), history)


def _copy_logs(source: str, target: str) -> list[str]:
    """Copy the TensorBoard logs of the work folder into the version; their names relative to the version."""
    gfile = tf.io.gfile
    names: list[str] = []
    if not gfile.exists(source):
        return names
    for root, _, files in gfile.walk(source):
        for name in files:
            src = join(root, name)
            rel = src[len(source.rstrip("/")) + 1 :]
            gfile.makedirs(join(target, *rel.split("/")[:-1]))
            gfile.copy(src, join(target, rel), overwrite=True)
            names.append(f"{LOGS_DIR}/{rel}")
    return sorted(names)


def _status_summary(history: dict[str, Any]) -> dict[str, Any]:
    return {
        "epochs": history["epochs_run"],
        "best_epoch": history["best_epoch"],
        "best_val_loss": history["best_val_loss"],
        "steps": history["steps"],
        "stopped_by_time": history["stopped_by_time"],
        "resumable": history.get("resumable", False),
    }


def _worker_scratch(
    config: TrainConfig, shards: ShardSet, worker: Worker, sig: dict[str, Any]
) -> tuple[RunState | None, str]:
    """A non-chief worker's run state and scratch folder (tf.distribute's advice: write to a
    temporary folder, deleted after). With ``--resume`` it starts from the chief's state and
    checkpoint (the run in progress, named by ``.pending``), which must then be on storage every
    worker reads (``gs://``)."""
    gfile = tf.io.gfile
    pending = outputs.read_pending(config.output) if config.resume else None
    chief_state = join(config.output, pending.work, BACKUP_DIR, STATE_FILE) if pending else ""
    if pending is not None and gfile.exists(chief_state):
        if pending.signature_hash != outputs.signature_hash(sig):
            diff = outputs.differences(pending.signature, sig)
            raise OutputConflictError(f"--resume: {config.output} holds a run with other settings ({'; '.join(diff)})")
        state = RunState.load(chief_state)
        state.failure = None
        state.stopped_by_time = False
    elif config.resume and outputs.read_manifest(config.output) is not None and pending is None:
        return None, ""
    else:
        state = RunState(config=config.to_dict(), data_fingerprint=shards.data_fingerprint)
    scratch = tempfile.mkdtemp(prefix=f"kogpt2-worker{worker.index}-")
    gfile.makedirs(join(scratch, BACKUP_DIR))
    return state, scratch


def _input(
    strategy: Any,
    worker: Worker,
    plan: InputPlan | None,
    shards: ShardSet,
    split: str,
    config: TrainConfig,
    first: int = 0,
    last: int = 1,
    skip: int = 0,
) -> Any:
    """The ``split`` input of ``fit``: one ``tf.data`` pipeline, or with a multi-worker ``plan``
    this worker's share as per-replica batches (``distribute_datasets_from_function``)."""
    training = split == "train"
    kwargs: dict[str, Any] = {"seed": config.seed, "first_epoch": first, "epochs": last,
                              "shuffle_buffer": config.shuffle_buffer} if training else {}  # fmt: skip
    if plan is None:
        return make_dataset(shards, split, config.batch_size, training=training, skip_batches=skip, **kwargs)

    def per_worker(_: Any) -> Any:
        return make_dataset(shards, split, plan.per_replica_batch, training=training, skip_batches=skip * worker.replicas,
                            shard=(worker.count, worker.index), shard_by=plan.shard_by,
                            pad_to_batches=plan.batches_per_worker, **kwargs)  # fmt: skip

    return strategy.distribute_datasets_from_function(per_worker)


def _result_path(out: str) -> Path | str:
    return out if "://" in out else Path(out)


def _defaults() -> dict[str, Any]:
    """Each setting's default: what a run started by an earlier release, without it, used."""
    return {f.name: f.default for f in fields(TrainConfig)}


def _inputs_of(config: TrainConfig) -> list[str]:
    """What the job reads, which ``--output`` must not overlap: shards, tokenizer, base model folder."""
    inputs = [*config.data, *([config.tokenizer] if config.tokenizer else [])]
    if not (config.model in PRESETS and not Path(config.model).exists()):
        inputs.append(config.model)
    return inputs


def _restore(checkpoint: Any, optimizer: Any, state: RunState) -> None:
    """Load the newest checkpoint: weights, optimizer moments and step, token counter."""
    checkpoint.read(state.checkpoint).assert_existing_objects_matched()
    step = int(optimizer.iterations.numpy())
    if state.step and step != state.step:
        raise RuntimeError(
            f"--resume: checkpoint {state.checkpoint} holds step {step}, the run state says {state.step}"
        )
    where = f", {state.epoch_steps} batches into epoch {len(state.epochs) + 1}" if state.epoch_steps else ""
    log.info("resumed from %s: %d epochs done%s, optimizer step %d", state.checkpoint, len(state.epochs), where, step)


def _segments(state: RunState, epochs: int) -> list[tuple[int, int, int]]:
    """``(first_epoch, end_epoch, batches_to_skip)`` per ``fit`` call: the rest of an epoch
    interrupted mid-way on its own (Keras runs the same number of steps every epoch of a
    ``fit``), then the remaining whole epochs."""
    first, out = len(state.epochs), []
    if state.epoch_steps:
        out.append((first, first + 1, state.epoch_steps))
        first += 1
    if first < epochs:
        out.append((first, epochs, 0))
    return out


def _record_failure(
    out: str, config: TrainConfig, state: RunState, shards: ShardSet, strategy: Any, started: float
) -> None:
    """Write ``history.json`` into the work folder saying why; keep the backup (the last good checkpoint); raise TrainingFailed."""
    history = _history(config, state, shards, strategy, time.monotonic() - started)
    with tempfile.TemporaryDirectory(prefix="kogpt2-train-") as staging:
        write_history(staging, history)
        publish(Path(staging), out)
    kept = state.checkpoint or "none yet: it failed before the first checkpoint"
    raise TrainingFailed(
        f"{state.failure}. No model was committed to {config.output} (its current version, if any, is unchanged); "
        f"{join(out, HISTORY_FILE)} records the run, and the last good checkpoint ({kept}) stays in "
        f"{join(out, BACKUP_DIR)}. Try a lower --lr or --clip-norm, with --overwrite"
    )


def _history(config: TrainConfig, state: RunState, shards: ShardSet, strategy: Any, seconds: float) -> dict[str, Any]:
    epochs = state.epochs
    best = epochs[state.best_epoch - 1] if state.best_epoch else {}
    last = epochs[-1] if epochs else {}
    return {
        "status": "failed" if state.failure else "finished",
        "failure": state.failure,
        "epochs": epochs,
        "best_epoch": state.best_epoch,
        "best_val_loss": best.get("val_loss"),
        "best_val_perplexity": best.get("val_perplexity"),
        "epochs_run": len(epochs),
        "stopped_early": state.stopped_early,
        "stopped_by_time": state.stopped_by_time,
        "train_tokens": last.get("train_tokens", 0),
        "steps": max(int(last.get("steps", 0)), int(state.step)),
        "seconds": round(sum(e["seconds"] for e in epochs), 3),
        "wall_seconds_last_start": round(seconds, 3),
        "starts": state.starts,
        "replicas": int(strategy.num_replicas_in_sync),
        "evaluations": state.evaluations,
        "data": shards.folder,
        "data_fingerprint": shards.data_fingerprint,
        "tokenizer_fingerprint": shards.tokenizer_info["fingerprint"],
        "partial_epoch": {"epoch": len(epochs) + 1, "epoch_steps": state.epoch_steps} if state.epoch_steps else None,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("resume", "overwrite")},
    }
