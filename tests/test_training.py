"""The training job end to end: a tiny preset trained from shards, its model folder, evaluation, early stopping, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sentences, write_test_shards
from training_helpers import cli, tiny_config, version

from kogpt2 import outputs
from kogpt2.dataset import IGNORE_ID, ShardError, TokenizerMismatchError, open_shards
from kogpt2.evaluate import evaluate_model
from kogpt2.model import load_model, read_model_info
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.trainer import token_stats
from kogpt2.training import run_config

tf = import_tf()
keras = import_keras()


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
    rc, stdout, stderr = cli(
        "train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path, "--output", out,
        "--epochs", 3, "--lr", 1e-3, "--warmup-steps", 2, "--clip-norm", 1.0, "--weight-decay", 0.01,
    )  # fmt: skip
    assert rc == 0, stderr
    return out, stdout


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
    rc, stdout, stderr = cli("evaluate", "--model", out, "--data", tiny_shards, "--json", "--batch-size", 7)
    assert rc == 0, stderr
    result = json.loads(stdout)
    history = json.loads((version(out) / "history.json").read_text())
    assert result["loss"] == pytest.approx(history["best_val_loss"], abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["tokens"] == _val_target_tokens(tiny_shards) and result["examples"] == 16
    rc, stdout, _ = cli("evaluate", "--model", out, "--data", tiny_shards, "--split", "train")
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
        tiny_config(shards, tmp_path / "out", tiny_tokenizer, epochs=12, learning_rate=3e-3), progress=False
    )
    h = result.history
    val = [e["val_loss"] for e in h["epochs"]]
    assert h["stopped_early"] and h["epochs_run"] < 12 and h["best_epoch"] == h["epochs_run"] - 2  # patience 2
    assert h["best_val_loss"] == min(val) and val[-1] > min(val) + 0.05
    saved = evaluate_model(str(tmp_path / "out"), str(shards))
    assert saved.loss == pytest.approx(h["best_val_loss"], abs=1e-4)  # the best epoch's weights, not the last


def test_bf16_trains_with_float32_weights_and_loss(tmp_path: Path, tiny_shards: Path, tiny_tokenizer) -> None:
    result = run_config(
        tiny_config(tiny_shards, tmp_path / "out", tiny_tokenizer, epochs=1, mixed_precision="bf16"), progress=False
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
        run_config(tiny_config(other, tmp_path / "o1", tiny_tokenizer, model=str(tiny_model_dir)), progress=False)
    assert "eeeeeeeeeeeeeeee" in str(err.value) and tiny_tokenizer.fingerprint[:16] in str(err.value)
    assert "999" in str(err.value) and str(tiny_tokenizer.vocab_size) in str(err.value)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_shards, unfinished)
    (unfinished / "COMPLETED").unlink()  # as a run that never committed
    rc, _, stderr = cli("train", "--data", unfinished, "--model", tiny_model_dir, "--output", tmp_path / "o2")
    assert rc == 2 and "COMPLETED" in stderr
    with pytest.raises(ShardError):
        evaluate_model(str(tiny_model_dir), str(unfinished))

    finished, _ = trained
    with pytest.raises(outputs.OutputConflictError, match="holds version 1 of a different run"):
        run_config(tiny_config(tiny_shards, finished, tiny_tokenizer), progress=False)
    with pytest.raises(ValueError, match="--tokenizer"):
        run_config(tiny_config(tiny_shards, tmp_path / "o3", tiny_tokenizer, tokenizer=None), progress=False)
    with pytest.raises(ValueError, match="neither a model folder nor a preset"):
        run_config(
            tiny_config(tiny_shards, tmp_path / "o3", tiny_tokenizer, model=str(tmp_path / "nope")), progress=False
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
