"""Where training writes: never over an input, never beside a live run, remote folders through tf.io.gfile."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from training_helpers import cli, tiny_config

from kogpt2 import outputs
from kogpt2.model import load_model
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.training import run_config

tf = import_tf()
keras = import_keras()


def test_output_over_the_model_or_data_is_refused_before_anything_is_deleted(
    tmp_path: Path, tiny_shards: Path, tiny_model_dir: Path
) -> None:
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    for output in (model, model / "sub", tmp_path):  # is, inside, contains
        rc, _, stderr = cli("train", "--data", tiny_shards, "--model", model, "--output", output, "--overwrite")
        assert rc == 2 and "--output" in stderr and str(model) in stderr, stderr
    assert sorted(p.name for p in model.iterdir()) == before
    load_model(model)
    rc, _, stderr = cli("train", "--data", tiny_shards, "--model", model, "--output", tiny_shards / "m", "--overwrite")
    assert rc == 2 and str(tiny_shards) in stderr and outputs.read_manifest(str(tiny_shards)) is not None


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path: Path, tiny_shards: Path, tiny_tokenizer) -> None:

    out = tmp_path / "model"
    with outputs.Lease(str(out), job="another kogpt2 train"):
        before = sorted(p.name for p in out.iterdir())
        rc, _, stderr = cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                             "--output", out, "--overwrite")  # fmt: skip
        assert rc == 3 and "in use by another kogpt2 train" in stderr and f"pid {os.getpid()}" in stderr
        assert sorted(p.name for p in out.iterdir()) == before  # the refused run wrote and deleted nothing


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
    config = tiny_config(f"{remote}/shards", out, tiny_tokenizer, epochs=2, save_steps=2)  # type: ignore[arg-type]
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
        run_config(tiny_config(f"{remote}/shards", f"{remote}/shards/out", tiny_tokenizer), progress=False)
