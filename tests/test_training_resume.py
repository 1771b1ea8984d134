"""Training stopped and resumed: preemption, SIGKILL mid-epoch, time budgets, NaN, a copy cut short."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_sentences, write_test_shards
from training_helpers import cli, tiny_config, version, work

from kogpt2 import outputs
from kogpt2.dataset import make_dataset, open_shards
from kogpt2.model import load_model
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.training import TrainingFailed, run_config

tf = import_tf()
keras = import_keras()


PREEMPTED_AFTER_EPOCH = textwrap.dedent(
    """
    import os, sys
    import kogpt2
    from kogpt2 import callbacks
    epoch = int(sys.argv[1])
    real = callbacks.RunTracker.on_epoch_end
    def on_epoch_end(self, index, logs=None):
        real(self, index, logs)
        if index + 1 == epoch:
            os._exit(75)
    callbacks.RunTracker.on_epoch_end = on_epoch_end
    from kogpt2.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


SLOW_BATCHES = textwrap.dedent(
    """
    import sys, time
    import kogpt2
    from kogpt2 import callbacks
    pause = float(sys.argv[1])
    real = callbacks.RunTracker.on_train_batch_end
    def on_train_batch_end(self, batch, logs=None):
        real(self, batch, logs)
        time.sleep(pause)
    callbacks.RunTracker.on_train_batch_end = on_train_batch_end
    from kogpt2.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_killed_run_resumes_to_the_full_epoch_count(tmp_path: Path, tiny_shards: Path, tiny_tokenizer) -> None:
    out = tmp_path / "out"
    args = ["train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path, "--output", out,
            "--epochs", 4, "--lr", 1e-3, "--early-stopping-patience", 0, "--quiet"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", PREEMPTED_AFTER_EPOCH, "2", *map(str, args), "--lease-seconds", "1"], cwd=REPO,
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 75, proc.stderr[-2000:]  # "preempted" right after epoch 2's checkpoint
    state = json.loads((work(out) / "backup" / "state.json").read_text())
    assert [e["epoch"] for e in state["epochs"]] == [1, 2] and outputs.read_manifest(str(out)) is None
    rc, _, stderr = cli(*args, "--resume")  # the preempted run's lock lives until its lease expires
    assert rc == 3 and "expires" in stderr
    time.sleep(1.1)

    rc, _, stderr = cli(*args)  # without --resume: refused, nothing lost
    assert rc == 2 and "--resume" in stderr
    rc, _, stderr = cli(*[a if a != 4 else 5 for a in args], "--resume")  # other settings: refused
    assert rc == 2 and "epochs: 4 -> 5" in stderr
    rc, stdout, stderr = cli(*args, "--resume")
    assert rc == 0, stderr
    h = json.loads((version(out) / "history.json").read_text())
    assert [e["epoch"] for e in h["epochs"]] == [1, 2, 3, 4] and h["epochs_run"] == 4 and h["starts"] == 2
    assert h["epochs"][:2] == state["epochs"]
    steps = open_shards(str(tiny_shards)).steps("train", 16)
    assert [e["steps"] for e in h["epochs"]] == [steps, 2 * steps, 3 * steps, 4 * steps]  # optimizer state restored
    per_epoch = h["epochs"][0]["train_tokens"]
    assert [e["train_tokens"] for e in h["epochs"]] == [per_epoch * n for n in (1, 2, 3, 4)]
    assert h["epochs"][3]["loss"] < h["epochs"][1]["loss"]  # it kept learning from the checkpoint
    load_model(out)
    rc, stdout, _ = cli(*args, "--resume")  # a finished run: nothing to do
    assert rc == 0 and "best epoch" in stdout


def test_time_budget_on_packed_shards_with_the_tokenizer_beside_them(tmp_path: Path, tiny_tokenizer) -> None:
    texts = make_sentences(40)
    shards = write_test_shards(  # a preset finds the tokenizer beside the shards
        tmp_path / "packed", tiny_tokenizer, texts[:32], texts[32:], max_len=24, packing=True, include_tokenizer=True
    )
    config = tiny_config(shards, tmp_path / "out", tiny_tokenizer, epochs=5, max_seconds=0.01, tokenizer=None)
    result = run_config(config, progress=False)
    assert result.history["stopped_by_time"] and result.history["epochs_run"] == 1
    assert "time budget" in result.summary() and result.history["resumable"]
    load_model(tmp_path / "out")
    # the rerun without --resume says where the run stands; with --resume it trains on (a new version)
    assert run_config(config, progress=False).history == result.history
    more = run_config(dataclasses.replace(config, resume=True, max_seconds=None), progress=False)
    assert more.history["epochs_run"] == 5 and not more.history["resumable"] and more.history["starts"] == 2
    assert [v["version"] for v in outputs.read_manifest(str(tmp_path / "out"))[0].versions] == [2, 1]  # type: ignore[index]


def test_a_time_budget_stops_at_the_first_step_checkpoint_and_resume_continues(
    tmp_path: Path, tiny_shards: Path, tiny_tokenizer
) -> None:
    # 48 examples in batches of 4: 12 batches an epoch; a checkpoint every 2; a budget spent at once.
    out = tmp_path / "out"
    config = tiny_config(tiny_shards, out, tiny_tokenizer, epochs=2, batch_size=4, save_steps=2, max_seconds=0.01,
                     early_stopping_patience=0)  # fmt: skip
    first = run_config(config, progress=False).history
    assert first["epochs"] == [] and first["partial_epoch"] == {"epoch": 1, "epoch_steps": 2} and first["steps"] == 2
    assert (
        first["stopped_by_time"] and first["resumable"] and "no epoch finished yet" in TrainResult_summary(out, first)
    )
    load_model(out)  # a usable model is committed at once: the weights as they were at the checkpoint
    state = json.loads((work(out) / "backup" / "state.json").read_text())
    assert state["epoch_steps"] == 2 and state["step"] == 2
    # scheduled reruns: each continues from the last checkpoint, a step checkpoint at a time
    second = run_config(dataclasses.replace(config, resume=True), progress=False).history
    assert second["partial_epoch"] == {"epoch": 1, "epoch_steps": 4} and second["steps"] == 4
    rest = run_config(dataclasses.replace(config, resume=True, max_seconds=None), progress=False).history
    straight = run_config(dataclasses.replace(config, output=str(tmp_path / "straight"), max_seconds=None),
                     progress=False).history  # fmt: skip
    assert rest["steps"] == straight["steps"] == 24 and rest["train_tokens"] == straight["train_tokens"]
    assert rest["starts"] == 3 and not rest["resumable"] and outputs.read_pending(str(out)) is None
    assert [v["version"] for v in outputs.read_manifest(str(out))[0].versions] == [3, 2]  # type: ignore[index]


def TrainResult_summary(out: Path, history: dict) -> str:
    from kogpt2.training import TrainResult

    return TrainResult(out, history).summary()


def _wait_for_state(out: Path, proc: subprocess.Popen, done, timeout: float = 240.0) -> dict:
    """Poll the run's ``state.json`` in ``out`` until ``done(state)``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended (status {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}"
            )
        try:
            pending = outputs.read_pending(str(out))
            state = json.loads((out / pending.work / "backup" / "state.json").read_text()) if pending else None
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state and done(state):
            return state
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no mid-epoch checkpoint in time")


def test_sigkill_mid_epoch_resumes_from_the_last_step_checkpoint(
    tmp_path: Path, tiny_shards: Path, tiny_tokenizer
) -> None:
    # 48 examples in batches of 4: 12 batches per epoch, a checkpoint every 3 batches.
    out = tmp_path / "killed"
    args = ["train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path, "--output", out,
            "--epochs", 2, "--batch-size", 4, "--lr", 1e-3, "--warmup-steps", 4, "--lr-schedule", "linear",
            "--early-stopping-patience", 0, "--save-steps", 3, "--eval-steps", 6, "--quiet"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BATCHES, "0.25", *map(str, args), "--lease-seconds", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = _wait_for_state(out, proc, lambda s: len(s["epochs"]) == 1 and s["epoch_steps"] >= 3)
    state_path = work(out) / "backup" / "state.json"
    time.sleep(0.3)  # a batch or two past the checkpoint: trained, then lost with the process
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = json.loads(state_path.read_text())
    assert len(state["epochs"]) == 1 and 3 <= state["epoch_steps"] < 12 and state["step"] == 12 + state["epoch_steps"]
    assert state["epoch_steps"] >= seen["epoch_steps"] and outputs.read_manifest(str(out)) is None
    time.sleep(1.1)  # the killed run's lease expires

    rc, _, stderr = cli(*args)  # without --resume: refused, and says where the run stands
    assert rc == 2 and f"{state['epoch_steps']} batches into epoch 2" in stderr
    rc, _, stderr = cli(*args, "--resume")
    assert rc == 0, stderr
    resumed = json.loads((version(out) / "history.json").read_text())

    cfg = tiny_config(tiny_shards, tmp_path / "straight", tiny_tokenizer, epochs=2, batch_size=4, warmup_steps=4,
                  lr_schedule="linear", early_stopping_patience=0, save_steps=3, eval_steps=6)  # fmt: skip
    straight = run_config(cfg, progress=False).history
    # Same optimizer steps and tokens: the batches trained before the checkpoint were skipped, not repeated,
    # and the ones trained after it were redone.
    assert resumed["steps"] == straight["steps"] == 24 and resumed["starts"] == 2
    assert resumed["train_tokens"] == straight["train_tokens"]
    assert [e["train_tokens"] for e in resumed["epochs"]] == [e["train_tokens"] for e in straight["epochs"]]
    # The resumed epoch's loss covers all 12 batches (the ones before the kill too); dropout draws differ.
    assert resumed["epochs"][1]["loss"] == pytest.approx(straight["epochs"][1]["loss"], abs=0.02)
    assert resumed["epochs"][1]["val_loss"] == pytest.approx(straight["epochs"][1]["val_loss"], abs=0.02)
    assert resumed["epochs"][0]["loss"] == pytest.approx(straight["epochs"][0]["loss"], abs=1e-6)
    # Evaluations every 6 batches within each epoch (not at its end, which the epoch entry covers).
    assert [(e["epoch"], e["epoch_step"]) for e in straight["evaluations"]] == [(1, 6), (2, 6)]
    assert [(e["epoch"], e["epoch_step"]) for e in resumed["evaluations"]] == [(1, 6), (2, 6)]
    load_model(out)
    assert outputs.read_pending(str(out)) is None and len([p for p in out.iterdir() if p.is_dir()]) == 1


def test_resume_skips_the_trained_batches_of_the_epoch(tiny_shards: Path) -> None:
    shards = open_shards(str(tiny_shards))
    full = [x.numpy().tolist() for x, _ in make_dataset(shards, "train", 4, training=True, seed=2, epochs=2)]
    rest = [x.numpy().tolist() for x, _ in
            make_dataset(shards, "train", 4, training=True, seed=2, first_epoch=1, epochs=2, skip_batches=5)]  # fmt: skip
    assert len(full) == 24 and rest == full[12 + 5 :]
    with pytest.raises(ValueError, match="skip_batches"):
        make_dataset(shards, "validation", 4, skip_batches=1)


class _PoisonWeights(keras.callbacks.Callback):
    """Sets one weight to NaN after optimizer step ``at`` (as a diverging run would)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None) -> None:
        if int(self.model.optimizer.iterations.numpy()) == self.at:
            var = self.model.lm.trainable_variables[0]
            var.assign(var * float("nan"))


def test_nan_run_fails_keeps_the_last_good_checkpoint_and_says_why(tmp_path: Path, tiny_tokenizer) -> None:
    texts = make_sentences(48)
    shards = write_test_shards(tmp_path / "noval", tiny_tokenizer, texts, [], max_len=32)  # no validation split
    out = tmp_path / "out"
    config = tiny_config(shards, out, tiny_tokenizer, epochs=3)  # 3 batches per epoch
    with pytest.raises(TrainingFailed, match="non-finite training loss") as err:
        run_config(config, progress=False, callbacks=[_PoisonWeights(at=5)])  # NaN from epoch 2's third batch
    from kogpt2.jobs import ExitStatus, exit_status

    assert exit_status(err.value) == ExitStatus.DIVERGED  # the CLI exits with status 4
    assert outputs.read_manifest(str(out)) is None  # nothing committed
    h = json.loads((work(out) / "history.json").read_text())
    assert h["status"] == "failed" and "non-finite" in h["failure"] and "epoch 2" in h["failure"]
    assert [e["epoch"] for e in h["epochs"]] == [1]  # the partial epoch is not recorded as complete
    assert not list(out.rglob("tf_model.h5")) and not list(out.rglob("kogpt2.json"))  # never the NaN weights
    state = json.loads((work(out) / "backup" / "state.json").read_text())  # the backup is kept
    assert state["failure"] == h["failure"] and state["checkpoint"].endswith("ckpt-3") and state["step"] == 3
    reader = tf.train.load_checkpoint(state["checkpoint"])
    for name in reader.get_variable_to_shape_map():
        if name.startswith("lm/") and "OPTIMIZER_SLOT" not in name:
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.isfinite(value).all(), name
    rc, _, stderr = cli("train", "--data", shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                         "--output", out, "--epochs", 3, "--lr", 1e-3)  # fmt: skip
    assert rc == 2 and "stopped with: non-finite" in stderr and "--resume" in stderr


def test_a_copy_cut_short_does_not_look_finished_and_resume_completes_it(
    tmp_path: Path, tiny_shards: Path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kogpt2.checkpointing as checkpointing

    real_copy = checkpointing._copy_file

    def preempted(src: str, dst: str) -> None:
        if dst.endswith("/kogpt2.json"):
            raise OSError("preempted while copying")
        real_copy(src, dst)

    monkeypatch.setattr(checkpointing, "_copy_file", preempted)
    remote = f"ram://kogpt2-{tmp_path.name}/model"
    config = tiny_config(tiny_shards, remote, tiny_tokenizer, epochs=1)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="preempted"):
        run_config(config, progress=False)
    gfile = tf.io.gfile
    assert outputs.read_manifest(remote) is None  # nothing committed
    pending = outputs.read_pending(remote)
    assert pending is not None and gfile.exists(f"{remote}/{pending.work}/backup/state.json")  # still resumable
    rc, _, stderr = cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                         "--output", remote, "--epochs", 1, "--lr", 1e-3)  # fmt: skip
    assert rc == 2 and "interrupted run" in stderr  # not taken for a finished one
    monkeypatch.setattr(checkpointing, "_copy_file", real_copy)
    history = run_config(dataclasses.replace(config, resume=True), progress=False).history
    assert history["epochs_run"] == 1 and history["starts"] == 2
    done = outputs.open_committed(remote, job="train", verify="full")
    assert "history.json" in done.manifest.files and outputs.read_pending(remote) is None
    left = [n.rstrip("/") for n in gfile.listdir(remote) if n.startswith(("w-", "v-"))]
    assert left == [done.manifest.folder]  # the half-copied version and the work folder are removed after the commit
