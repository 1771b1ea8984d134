"""Training: fine-tune (or train from scratch) a GPT-2 LM on preprocessing shards.

:func:`run_config` runs one job from a frozen :class:`~kogpt2.train_config.TrainConfig` and
returns a :class:`~kogpt2.train_config.TrainResult`: ``tf.data`` over the shards, masked
cross-entropy (padding never counts), masked accuracy and perplexity on train and validation
every epoch, early stopping on validation loss with the best weights kept, resumable checkpoints
at every epoch end (and every ``save_steps`` batches), and a self-describing model folder with
``history.json``, ``curves.png`` and TensorBoard logs beside it, committed as a version of the
output folder (:mod:`kogpt2.outputs`). ``kogpt2 train`` (:mod:`kogpt2.commands.train`) is its
command line. The pieces live in their own modules: :mod:`kogpt2.trainer` (the Keras model with
the masked loss), :mod:`kogpt2.schedules` (learning rate, optimizer), :mod:`kogpt2.precision`,
:mod:`kogpt2.distribute`, :mod:`kogpt2.checkpointing` (resume state), :mod:`kogpt2.callbacks`,
:mod:`kogpt2.curves`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kogpt2 import outputs
from kogpt2.callbacks import EpochSummaries, RunTracker, StoppedAtCheckpoint
from kogpt2.checkpointing import (
    BACKUP_DIR,
    HISTORY_FILE,
    LOGS_DIR,
    STATE_FILE,
    RunState,
    TrainingFailed,
    publish,
)
from kogpt2.curves import write_history
from kogpt2.dataset import ShardSet, check_tokenizer, make_dataset, open_shards
from kogpt2.distribute import InputPlan, Worker, make_strategy, plan_input, worker_of
from kogpt2.model import PRESETS, load_model, model_fingerprint, new_model, read_model_info, save_model
from kogpt2.outputs import (
    ALREADY_COMPLETE,
    RESUME,
    WORK_PREFIX,
    OutputConflictError,
    OutputRun,
    refuse_output_over_inputs,
)
from kogpt2.precision import dtype_policy, resolve_policy
from kogpt2.schedules import make_optimizer
from kogpt2.storage import join
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.tokenizer import Tokenizer, TokenizerError, find_tokenizer_file, load_tokenizer
from kogpt2.train_config import TrainConfig, TrainResult
from kogpt2.trainer import LMTrainer

tf = import_tf()
keras = import_keras()
log = logging.getLogger(__name__)

#: The job's name in manifests and locks.
JOB = "train"

__all__ = ["JOB", "TrainConfig", "TrainResult", "TrainingFailed", "run_config", "signature"]


# ----------------------------------------------------------------------------- model and tokenizer


def _preset_tokenizer(config: TrainConfig, shards: ShardSet) -> Tokenizer:
    """The tokenizer a preset is trained with: ``--tokenizer``, else the one preprocessing copied beside the shards.

    Beside the shards means in the committed version of the first ``--data`` folder (all of them
    share one tokenizer, :func:`kogpt2.dataset.open_shards` checks), on a local disk; for shards on
    remote storage, pass ``--tokenizer``.

    Raises:
        ValueError: no ``--tokenizer``, and no tokenizer file beside the shards.
    """
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    beside = Path(shards.roots[0])
    if beside.is_dir():
        try:
            return load_tokenizer(find_tokenizer_file(beside))
        except TokenizerError:
            pass
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


def run_config(config: TrainConfig, *, progress: bool = True, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Run one training job (see the module docstring); what ``kogpt2 train`` runs.

    Args:
        config: the job.
        progress: print Keras progress (one line per epoch when stdout is not a terminal).
        callbacks: extra Keras callbacks, run after the job's own (tests inject faults with them).

    Returns:
        A :class:`~kogpt2.train_config.TrainResult`; ``config.output`` holds the best epoch's
        model folder, ``history.json``, ``curves.png`` and ``logs/`` as its current version.

    Raises:
        ShardError: unfinished or malformed shards.
        TokenizerMismatchError: shards made with another tokenizer than the model's.
        kogpt2.outputs.OutputConflictError: ``output`` holds another run (see ``resume``/``overwrite``).
        kogpt2.outputs.OutputLockedError: another live run holds ``output``.
        ValueError: ``output`` is, contains or lies inside an input; ``resume`` with changed
            settings or data; a preset without a tokenizer; ``fp16`` without a GPU.
        TrainingFailed: the loss or the weights became non-finite; ``history.json`` says so,
            no model is committed and the last good checkpoint stays in the work folder.
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
    callbacks: Sequence[Any],
) -> TrainResult:
    """Build, restore, fit, commit: the body of :func:`run_config` once its work folder ``out`` is claimed.

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
            fit_callbacks = [tracker, EpochSummaries(join(out, LOGS_DIR), tracker), *callbacks]
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
        "tokenizer_fingerprint": shards.tokenizer.fingerprint,
        "partial_epoch": {"epoch": len(epochs) + 1, "epoch_steps": state.epoch_steps} if state.epoch_steps else None,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("resume", "overwrite")},
    }
