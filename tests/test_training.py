"""The training job: masked loss, end-to-end runs from shards, early stopping, resume, refusals, mirroring."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_sentences, write_test_shards

from kogpt2 import outputs
from kogpt2.cli import main
from kogpt2.dataset import IGNORE_ID, ShardError, TokenizerMismatchError, make_dataset, open_shards
from kogpt2.evaluate import evaluate_model
from kogpt2.model import load_model, new_model, read_model_info
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.trainer import LMTrainer, token_stats
from kogpt2.training import TrainConfig, TrainingFailed, run_config

tf = import_tf()
keras = import_keras()


#: ``kogpt2 ARGS...`` preempted (``os._exit(75)``) right after epoch ``sys.argv[1]``'s checkpoint is written.
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
#: ``kogpt2 ARGS...`` with every batch followed by a pause of ``sys.argv[1]`` seconds (so a kill lands mid-epoch).
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


def _config(shards: Path, out: Path, tok, **kwargs) -> TrainConfig:
    base = {"model": "tiny", "tokenizer": str(tok.path), "epochs": 3, "learning_rate": 1e-3}
    return TrainConfig(data=str(shards), output=str(out), **{**base, **kwargs})


def version(out: Path | str) -> Path:
    """The committed version folder of a training output folder (a model folder)."""
    return Path(outputs.open_committed(str(out), job="train").root)


def work(out: Path | str) -> Path:
    """The work folder of the run in progress (or stopped) in ``out``: checkpoints, logs."""
    pending = outputs.read_pending(str(out))
    assert pending is not None, f"{out} has no run in progress"
    return Path(out) / pending.work


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _val_target_tokens(shards: Path) -> int:
    """Real targets of the validation split, read straight from the TFRecords."""
    s = open_shards(str(shards))
    total = 0
    for path in s.files("validation"):
        for rec in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            ex = tf.train.Example.FromString(rec.numpy())
            total += ex.features.feature["length"].int64_list.value[0] - 1
    return total


@pytest.fixture(scope="module")
def trained(tiny_shards: Path, tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One end-to-end `kogpt2 train` run of the tiny preset (3 epochs)."""
    out = tmp_path_factory.mktemp("run") / "model"
    rc, stdout, stderr = _cli(
        "train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path, "--output", out,
        "--epochs", 3, "--lr", 1e-3, "--warmup-steps", 2, "--clip-norm", 1.0, "--weight-decay", 0.01,
    )  # fmt: skip
    assert rc == 0, stderr
    return out, stdout


def test_masked_loss_matches_a_hand_computation(tiny_tokenizer) -> None:
    model = new_model("tiny", tiny_tokenizer, seed=1)
    pad = tiny_tokenizer.pad_id
    inputs = np.array([[0, 270, 280, 290, 1, pad], [0, 300, 1, pad, pad, pad]], dtype=np.int32)
    targets = np.array([[270, 280, 290, 1, IGNORE_ID, IGNORE_ID], [300, 1] + [IGNORE_ID] * 4], dtype=np.int32)
    logits = model(tf.constant(inputs)).logits.numpy().astype(np.float64)  # (2, 6, V)

    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    real = targets != IGNORE_ID
    nll = np.array([-logp[b, t, targets[b, t]] for b, t in zip(*np.nonzero(real), strict=True)])
    hand = nll.sum() / real.sum()  # 6 real targets out of 12
    correct = sum(logits[b, t].argmax() == targets[b, t] for b, t in zip(*np.nonzero(real), strict=True))

    nll_sum, n_correct, count = (float(v) for v in token_stats(tf.constant(targets), tf.constant(logits, tf.float32)))
    loss = nll_sum / max(count, 1.0)  # what LMTrainer minimizes: the sum over real targets over their count
    assert loss == pytest.approx(hand, rel=1e-5)
    assert count == 6 and n_correct == correct and nll_sum == pytest.approx(nll.sum(), rel=1e-5)
    # The notebook's loss averaged over padding too: a different number.
    unmasked = -np.mean(np.take_along_axis(logp, np.where(real, targets, pad)[..., None], -1))
    assert abs(unmasked - hand) > 1e-3

    scorer = LMTrainer(model)
    scorer.compile()
    scores = scorer.evaluate(tf.data.Dataset.from_tensors((inputs, targets)), verbose=0, return_dict=True)
    assert scores["loss"] == pytest.approx(hand, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(hand), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(correct / 6)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs=0"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.strategy='tpu'"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), strategy="tpu")
    with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), learning_rate=0)


def test_tiny_preset_trains_end_to_end_from_shards(trained: tuple[Path, str], tiny_shards: Path) -> None:
    out, stdout = trained
    assert "Epoch 1/3" in stdout  # Keras progress
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("best epoch ") and str(out) in summary and "perplexity" in summary
    h = json.loads((version(out) / "history.json").read_text())
    assert [e["epoch"] for e in h["epochs"]] == [1, 2, 3] and h["epochs_run"] == 3
    val = [e["val_loss"] for e in h["epochs"]]
    assert val[-1] < val[0]  # it learns
    assert h["best_epoch"] == 1 + int(np.argmin(val)) and h["best_val_loss"] == min(val)
    assert h["best_val_perplexity"] == pytest.approx(math.exp(h["best_val_loss"]), rel=1e-4)
    for e in h["epochs"]:
        assert set(e) >= {"loss", "accuracy", "perplexity", "val_loss", "val_accuracy", "val_perplexity", "seconds"}
        assert e["perplexity"] == pytest.approx(math.exp(e["loss"]), rel=1e-4)
    steps = open_shards(str(tiny_shards)).steps("train", 16)
    assert h["steps"] == 3 * steps and not h["stopped_early"]
    assert h["train_tokens"] > 0 and h["config"]["weight_decay"] == 0.01
    assert (version(out) / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs.read_pending(str(out)) is None and [p.name for p in out.iterdir() if p.is_dir()] == [
        version(out).name
    ]  # the work folder (checkpoints) is gone once the run is committed
    tags = set()
    for split in ("train", "validation"):
        for event_file in (version(out) / "logs" / split).iterdir():
            for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                tags.update(f"{split}/{v.tag}" for v in event.summary.value)
    assert {
        "train/epoch_loss",
        "validation/epoch_loss",
        "validation/epoch_perplexity",
        "train/epoch_learning_rate",
    } <= tags


def test_saved_folder_loads_and_describes_itself(trained: tuple[Path, str], tiny_shards: Path, tiny_tokenizer) -> None:
    from transformers import TFGPT2LMHeadModel

    out, _ = trained
    model, tok = load_model(out)  # the output folder: its committed version
    plain = TFGPT2LMHeadModel.from_pretrained(str(version(out)))  # the version folder is a plain HF folder
    ids = tf.constant([[0, *tok.encode("그는 강가에서")]])
    np.testing.assert_allclose(model(ids).logits.numpy(), plain(ids).logits.numpy(), atol=1e-5)
    info = read_model_info(out)["info"]
    history = json.loads((version(out) / "history.json").read_text())
    shard_info = outputs.open_committed(str(tiny_shards)).read_json("info.json")
    assert info["data_fingerprint"] == shard_info["data_fingerprint"]
    assert info["tokenizer_fingerprint"] == tiny_tokenizer.fingerprint == tok.fingerprint
    assert info["steps"] == history["steps"] and info["best_epoch"] == history["best_epoch"]
    assert info["base_model"] == {"preset": "tiny"} and info["config"]["epochs"] == 3


def test_evaluate_command_reports_the_best_validation_loss(trained: tuple[Path, str], tiny_shards: Path) -> None:
    out, _ = trained
    rc, stdout, stderr = _cli("evaluate", "--model", out, "--data", tiny_shards, "--json", "--batch-size", 7)
    assert rc == 0, stderr
    result = json.loads(stdout)
    history = json.loads((version(out) / "history.json").read_text())
    assert result["loss"] == pytest.approx(history["best_val_loss"], abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["tokens"] == _val_target_tokens(tiny_shards) and result["examples"] == 16
    rc, stdout, _ = _cli("evaluate", "--model", out, "--data", tiny_shards, "--split", "train")
    assert rc == 0 and stdout.startswith("train: loss ")


def test_train_command_runs_from_an_argument_list(trained: tuple[Path, str], tiny_shards: Path, tiny_tokenizer,
                                                  capsys) -> None:  # fmt: skip
    from kogpt2.commands.train import run

    out, _ = trained
    args = ["--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path, "--output", out, "--epochs", 3,
            "--lr", 1e-3, "--warmup-steps", 2, "--clip-norm", 1.0, "--weight-decay", 0.01, "--quiet"]  # fmt: skip
    assert run([str(a) for a in args]) == 0  # the fixture's very run: committed already, nothing to do
    assert capsys.readouterr().out.strip().startswith("best epoch ")
    assert run([str(a) for a in args] + ["--weight-decay", "0.5"]) == 2  # the last one counts: another run's folder
    assert "--overwrite" in capsys.readouterr().err


def test_early_stopping_saves_the_best_epoch(tmp_path: Path, tiny_tokenizer) -> None:
    # Validation text is the training text reversed: the model overfits to left-to-right
    # order, so validation loss turns up after a few epochs.
    texts = make_sentences(64)
    shards = write_test_shards(
        tmp_path / "shards", tiny_tokenizer, texts[:48], [t[::-1] for t in texts[48:]], max_len=32
    )
    result = run_config(
        _config(shards, tmp_path / "out", tiny_tokenizer, epochs=12, learning_rate=3e-3), progress=False
    )
    h = result.history
    val = [e["val_loss"] for e in h["epochs"]]
    assert h["stopped_early"] and h["epochs_run"] < 12 and h["best_epoch"] == h["epochs_run"] - 2  # patience 2
    assert h["best_val_loss"] == min(val) and val[-1] > min(val) + 0.05
    saved = evaluate_model(str(tmp_path / "out"), str(shards))
    assert saved.loss == pytest.approx(h["best_val_loss"], abs=1e-4)  # the best epoch's weights, not the last


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
    rc, _, stderr = _cli(*args, "--resume")  # the preempted run's lock lives until its lease expires
    assert rc == 3 and "expires" in stderr
    time.sleep(1.1)

    rc, _, stderr = _cli(*args)  # without --resume: refused, nothing lost
    assert rc == 2 and "--resume" in stderr
    rc, _, stderr = _cli(*[a if a != 4 else 5 for a in args], "--resume")  # other settings: refused
    assert rc == 2 and "epochs: 4 -> 5" in stderr
    rc, stdout, stderr = _cli(*args, "--resume")
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
    rc, stdout, _ = _cli(*args, "--resume")  # a finished run: nothing to do
    assert rc == 0 and "best epoch" in stdout


def test_time_budget_on_packed_shards_with_the_tokenizer_beside_them(tmp_path: Path, tiny_tokenizer) -> None:
    texts = make_sentences(40)
    shards = write_test_shards(  # a preset finds the tokenizer beside the shards
        tmp_path / "packed", tiny_tokenizer, texts[:32], texts[32:], max_len=24, packing=True, include_tokenizer=True
    )
    config = _config(shards, tmp_path / "out", tiny_tokenizer, epochs=5, max_seconds=0.01, tokenizer=None)
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
    config = _config(tiny_shards, out, tiny_tokenizer, epochs=2, batch_size=4, save_steps=2, max_seconds=0.01,
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


def test_bf16_trains_with_float32_weights_and_loss(tmp_path: Path, tiny_shards: Path, tiny_tokenizer) -> None:
    result = run_config(
        _config(tiny_shards, tmp_path / "out", tiny_tokenizer, epochs=1, mixed_precision="bf16"), progress=False
    )
    assert (
        math.isfinite(result.history["epochs"][0]["val_loss"]) and result.history["config"]["mixed_precision"] == "bf16"
    )
    model, _ = load_model(tmp_path / "out")
    assert {w.dtype for w in model.weights} == {tf.float32}
    assert import_keras().mixed_precision.global_policy().name == "float32"  # restored after the run
    logits = tf.constant(np.random.default_rng(0).normal(size=(1, 3, 7)), tf.bfloat16)
    assert token_stats(tf.constant([[1, 2, IGNORE_ID]]), logits)[0].dtype == tf.float32  # loss in float32


def test_refusals(tmp_path: Path, tiny_shards: Path, tiny_tokenizer, tiny_model_dir: Path, trained) -> None:
    other = write_test_shards(
        tmp_path / "other",
        tiny_tokenizer,
        ["가나다"],
        ["라마바"],
        tokenizer_overrides={"fingerprint": "e" * 64, "vocab_size": 999},
    )
    with pytest.raises(TokenizerMismatchError) as err:
        run_config(_config(other, tmp_path / "o1", tiny_tokenizer, model=str(tiny_model_dir)), progress=False)
    assert "eeeeeeeeeeeeeeee" in str(err.value) and tiny_tokenizer.fingerprint[:16] in str(err.value)
    assert "999" in str(err.value) and str(tiny_tokenizer.vocab_size) in str(err.value)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_shards, unfinished)
    (unfinished / "COMPLETED").unlink()  # as a run that never committed
    rc, _, stderr = _cli("train", "--data", unfinished, "--model", tiny_model_dir, "--output", tmp_path / "o2")
    assert rc == 2 and "COMPLETED" in stderr
    with pytest.raises(ShardError):
        evaluate_model(str(tiny_model_dir), str(unfinished))

    finished, _ = trained
    with pytest.raises(outputs.OutputConflictError, match="holds version 1 of a different run"):
        run_config(_config(tiny_shards, finished, tiny_tokenizer), progress=False)
    with pytest.raises(ValueError, match="--tokenizer"):
        run_config(_config(tiny_shards, tmp_path / "o3", tiny_tokenizer, tokenizer=None), progress=False)
    with pytest.raises(ValueError, match="neither a model folder nor a preset"):
        run_config(_config(tiny_shards, tmp_path / "o3", tiny_tokenizer, model=str(tmp_path / "nope")), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import kogpt2
    from kogpt2.tf_setup import import_tf
    tf = import_tf()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kogpt2.evaluate import evaluate_model
    from kogpt2.distribute import make_strategy
    from kogpt2.training import TrainConfig, run_config

    shards, model, out = sys.argv[1:4]
    runs = {}
    for name in ("mirrored", "default"):
        config = TrainConfig(data=shards, model=model, output=f"{out}/{name}", epochs=2, batch_size=16,
                             learning_rate=1e-3, early_stopping_patience=0, strategy=name)
        runs[name] = run_config(config, progress=False).history
    ev = {name: evaluate_model(f"{out}/mirrored", shards, batch_size=5, strategy=make_strategy(name)).loss
          for name in ("mirrored", "default")}
    print("RESULT " + json.dumps({"runs": runs, "eval": ev}))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus(tmp_path: Path, tiny_shards: Path, tiny_model_dir: Path) -> None:
    # A dropout-free copy, so a mirrored run and a single-device run must agree.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_shards), str(model), str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    mirrored, single = result["runs"]["mirrored"], result["runs"]["default"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    for a, b in zip(mirrored["epochs"], single["epochs"], strict=True):
        # The global masked mean: replicas divide by the global token count, so the runs agree.
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    assert mirrored["epochs"][1]["val_loss"] < mirrored["epochs"][0]["val_loss"]
    assert result["eval"]["mirrored"] == pytest.approx(result["eval"]["default"], abs=1e-5)


# --- step checkpoints and mid-epoch resume ---------------------------------------------------


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

    rc, _, stderr = _cli(*args)  # without --resume: refused, and says where the run stands
    assert rc == 2 and f"{state['epoch_steps']} batches into epoch 2" in stderr
    rc, _, stderr = _cli(*args, "--resume")
    assert rc == 0, stderr
    resumed = json.loads((version(out) / "history.json").read_text())

    cfg = _config(tiny_shards, tmp_path / "straight", tiny_tokenizer, epochs=2, batch_size=4, warmup_steps=4,
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


# --- a NaN run is a failed run ----------------------------------------------------------------


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
    config = _config(shards, out, tiny_tokenizer, epochs=3)  # 3 batches per epoch
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
    rc, _, stderr = _cli("train", "--data", shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                         "--output", out, "--epochs", 3, "--lr", 1e-3)  # fmt: skip
    assert rc == 2 and "stopped with: non-finite" in stderr and "--resume" in stderr


# --- --output never over an input --------------------------------------------------------------


def test_output_over_the_model_or_data_is_refused_before_anything_is_deleted(
    tmp_path: Path, tiny_shards: Path, tiny_model_dir: Path
) -> None:
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    for output in (model, model / "sub", tmp_path):  # is, inside, contains
        rc, _, stderr = _cli("train", "--data", tiny_shards, "--model", model, "--output", output, "--overwrite")
        assert rc == 2 and "--output" in stderr and str(model) in stderr, stderr
    assert sorted(p.name for p in model.iterdir()) == before
    load_model(model)
    rc, _, stderr = _cli("train", "--data", tiny_shards, "--model", model, "--output", tiny_shards / "m", "--overwrite")
    assert rc == 2 and str(tiny_shards) in stderr and outputs.read_manifest(str(tiny_shards)) is not None


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path: Path, tiny_shards: Path, tiny_tokenizer) -> None:
    import os

    out = tmp_path / "model"
    with outputs.Lease(str(out), job="another kogpt2 train"):
        before = sorted(p.name for p in out.iterdir())
        rc, _, stderr = _cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                             "--output", out, "--overwrite")  # fmt: skip
        assert rc == 3 and "in use by another kogpt2 train" in stderr and f"pid {os.getpid()}" in stderr
        assert sorted(p.name for p in out.iterdir()) == before  # the refused run wrote and deleted nothing


# --- schedules and mixed precision ----------------------------------------------------


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


def test_schedule_and_precision_flags(
    tmp_path: Path, tiny_shards: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    from kogpt2.cli import build_parser
    from kogpt2.commands.train import config_from_args

    base = ["train", "--data", "d", "--model", "tiny", "--output", "o"]
    parse = lambda *a: config_from_args(build_parser("train").parse_args([*base, *a]))  # noqa: E731
    assert parse().lr_schedule == "constant" and parse().mixed_precision == "no"  # defaults unchanged
    assert parse("--lr-schedule", "linear").lr_schedule == "linear"
    assert parse("--mixed-precision").mixed_precision == "auto"  # the old bare flag still works
    assert parse("--mixed-precision", "bf16").mixed_precision == "bf16"
    assert TrainConfig(data="d", model="tiny", output="o", mixed_precision=True).mixed_precision == "auto"
    with pytest.raises(ValueError, match=r"TrainConfig\.mixed_precision='fp8'"):
        TrainConfig(data="d", model="tiny", output="o", mixed_precision="fp8")
    from kogpt2.precision import resolve_policy

    with caplog.at_level(logging.INFO, logger="kogpt2.precision"):
        assert resolve_policy("no", has_gpu=False) == "float32"
    assert "off by default on CPU" in caplog.text and "--mixed-precision bf16" in caplog.text  # says why
    assert resolve_policy("auto", has_gpu=True) == "mixed_float16" and resolve_policy("bf16") == "mixed_bfloat16"
    if not tf.config.list_physical_devices("GPU"):
        out = tmp_path / "fp16"
        rc, _, stderr = _cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                             "--output", out, "--mixed-precision", "fp16")  # fmt: skip
        assert rc == 2 and "--mixed-precision fp16" in stderr and "GPU" in stderr and "bf16" in stderr
        assert not out.exists()  # refused before the output folder is touched


def test_train_flags_come_from_the_config_fields_and_a_config_file_repeats_a_run(tmp_path: Path) -> None:
    import dataclasses
    import json

    from kogpt2.cli import build_parser
    from kogpt2.commands.train import config_from_args

    parse = lambda *a: config_from_args(build_parser("train").parse_args(["train", *a]))  # noqa: E731
    base = ["--data", "d", "--model", "tiny", "--output", "o"]
    assert parse(*base) == TrainConfig(data="d", model="tiny", output="o")  # every default lives on TrainConfig
    assert parse("--data", "a", "b", "--model", "tiny", "--output", "o").data == ("a", "b")  # several folders
    cfg = parse(*base, "--lr", "3e-4", "--xla", "--batch_size", "8", "--clip-norm", "1.0")
    assert (cfg.learning_rate, cfg.jit_compile, cfg.batch_size, cfg.clip_norm) == (3e-4, True, 8, 1.0)
    history = tmp_path / "history.json"  # what a run writes: its resolved config
    history.write_text(json.dumps({"config": dataclasses.asdict(cfg), "epochs": []}))
    assert parse("--config", str(history)) == cfg
    assert parse("--config", str(history), "--epochs", "3") == dataclasses.replace(cfg, epochs=3)
    with pytest.raises(ValueError, match="missing --data, --output"):
        parse("--model", "tiny")
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 0.1}))
    with pytest.raises(ValueError, match="'learning_rat' is not a setting; did you mean 'learning_rate'"):
        parse("--config", str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size=True: must be an integer >= 1"):
        TrainConfig(data="d", model="tiny", output="o", batch_size=True)
    # per-run decisions never come from a file; a boolean a file sets can be switched off
    (tmp_path / "old.json").write_text(json.dumps({**dataclasses.asdict(cfg), "overwrite": True}))
    with pytest.raises(ValueError, match="--overwrite is decided for each run"):
        parse("--config", str(tmp_path / "old.json"))
    assert parse("--config", str(history), "--no-xla").jit_compile is False


# --- remote --data and --output (through TensorFlow's ram:// filesystem) ----------------------


def test_remote_data_and_output_through_tf_gfile(
    tmp_path: Path, tiny_shards: Path, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kogpt2.checkpointing as checkpointing

    gfile = tf.io.gfile
    remote = f"ram://kogpt2-{tmp_path.name}"
    for f in tiny_shards.rglob("*"):
        if f.is_file():
            gfile.makedirs(f"{remote}/shards/{f.parent.relative_to(tiny_shards)}".rstrip("/."))
            gfile.copy(str(f), f"{remote}/shards/{f.relative_to(tiny_shards)}", overwrite=True)
    copied: list[str] = []
    real_copy = checkpointing._copy_file
    monkeypatch.setattr(checkpointing, "_copy_file", lambda s, d: (copied.append(d.rsplit("/", 1)[1]), real_copy(s, d)))

    out = f"{remote}/model"
    config = _config(f"{remote}/shards", out, tiny_tokenizer, epochs=2, save_steps=2)  # type: ignore[arg-type]
    result = run_config(config, progress=False)
    assert result.output == out and result.history["epochs_run"] == 2
    # every file copied into the new version before the manifest that commits it
    assert copied[-3:] == ["config.json", "kogpt2.json", "history.json"] and "tf_model.h5" in copied[:-3]
    done = outputs.open_committed(out, job="train", verify="full")
    root = done.root
    assert gfile.glob(f"{root}/logs/train/*") and outputs.read_pending(out) is None
    assert not [n for n in gfile.listdir(root) if ".tmp" in n]
    local = tmp_path / "copy"  # the version folder copied elsewhere is a model folder that checks itself
    for folder, _, files in gfile.walk(root):
        rel = folder[len(root) :].strip("/")
        (local / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            gfile.copy(f"{folder}/{name}", str(local / rel / name))
    load_model(local)
    (local / "logs" / "train").rename(local / "logs" / "lost")
    with pytest.raises(ValueError, match="is missing"):
        load_model(local)  # an incomplete copy is refused, naming what is missing
    (local / "logs" / "lost").rename(local / "logs" / "train")
    assert json.loads((local / "history.json").read_text())["data"] == f"{remote}/shards"
    assert done.manifest.summary["epochs"] == 2
    again = run_config(dataclasses.replace(config, resume=True), progress=False)  # finished: nothing to do
    assert again.history == result.history
    with pytest.raises(ValueError, match="lies inside an input"):
        run_config(_config(f"{remote}/shards", f"{remote}/shards/out", tiny_tokenizer), progress=False)


# --- multi-worker training ---------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_match_one_worker(tmp_path: Path, tiny_tokenizer, tiny_model_dir: Path) -> None:
    # A dropout-free model and one train file (so the workers share it by data): the two
    # workers' halves of each global batch are exactly one worker's batch.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    texts = make_sentences(64)
    shards = write_test_shards(tmp_path / "shards", tiny_tokenizer, texts[:48], texts[48:], max_len=32, num_shards=1)
    out = tmp_path / "out"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = ["train", "--strategy", "multi_worker", "--data", shards, "--model", model, "--output", out,
            "--epochs", 1, "--batch-size", 16, "--lr", 1e-3, "--early-stopping-patience", 0, "--quiet"]  # fmt: skip
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-m", "kogpt2.cli", *map(str, args)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "reads its share by data" in results[1][1]
    multi = json.loads((version(out) / "history.json").read_text())
    assert multi["replicas"] == 2 and outputs.read_pending(str(out)) is None
    names = {p.name for p in version(out).iterdir()}  # the chief's model folder; the other worker wrote nothing here
    assert {"config.json", "tf_model.h5", "history.json", "logs"} <= names and not [n for n in names if ".tmp" in n]
    load_model(out)
    single = run_config(_config(shards, tmp_path / "single", tiny_tokenizer, model=str(model), tokenizer=None, epochs=1,
                           early_stopping_patience=0), progress=False).history  # fmt: skip
    assert multi["steps"] == single["steps"] == 3 and multi["train_tokens"] == single["train_tokens"]
    # Same global batches, global masked mean: the same losses as one worker.
    assert multi["epochs"][0]["loss"] == pytest.approx(single["epochs"][0]["loss"], abs=1e-4)
    assert multi["epochs"][0]["val_loss"] == pytest.approx(single["epochs"][0]["val_loss"], abs=1e-4)


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
    config = _config(tiny_shards, remote, tiny_tokenizer, epochs=1)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="preempted"):
        run_config(config, progress=False)
    gfile = tf.io.gfile
    assert outputs.read_manifest(remote) is None  # nothing committed
    pending = outputs.read_pending(remote)
    assert pending is not None and gfile.exists(f"{remote}/{pending.work}/backup/state.json")  # still resumable
    rc, _, stderr = _cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                         "--output", remote, "--epochs", 1, "--lr", 1e-3)  # fmt: skip
    assert rc == 2 and "interrupted run" in stderr  # not taken for a finished one
    monkeypatch.setattr(checkpointing, "_copy_file", real_copy)
    history = run_config(dataclasses.replace(config, resume=True), progress=False).history
    assert history["epochs_run"] == 1 and history["starts"] == 2
    done = outputs.open_committed(remote, job="train", verify="full")
    assert "history.json" in done.manifest.files and outputs.read_pending(remote) is None
    left = [n.rstrip("/") for n in gfile.listdir(remote) if n.startswith(("w-", "v-"))]
    assert left == [done.manifest.folder]  # the half-copied version and the work folder are removed after the commit
