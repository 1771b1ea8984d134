"""Training on several devices and machines: MirroredStrategy over logical CPUs, two workers on localhost."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, make_sentences, write_test_shards
from training_helpers import tiny_config, version

from kogpt2 import outputs
from kogpt2.model import load_model
from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.training import run_config

tf = import_tf()
keras = import_keras()


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
@pytest.mark.long  # the global masked mean across replicas: also test_two_workers_on_localhost_match_one_worker
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


def _free_ports(n: int) -> list[int]:

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
    single = run_config(tiny_config(shards, tmp_path / "single", tiny_tokenizer, model=str(model), tokenizer=None, epochs=1,
                           early_stopping_patience=0), progress=False).history  # fmt: skip
    assert multi["steps"] == single["steps"] == 3 and multi["train_tokens"] == single["train_tokens"]
    # Same global batches, global masked mean: the same losses as one worker.
    assert multi["epochs"][0]["loss"] == pytest.approx(single["epochs"][0]["loss"], abs=1e-4)
    assert multi["epochs"][0]["val_loss"] == pytest.approx(single["epochs"][0]["val_loss"], abs=1e-4)
