"""kogpt2 train's settings: TrainConfig's validation, flags built from its fields, --config files, precision flags."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from training_helpers import cli

from kogpt2.tf_setup import import_keras, import_tf
from kogpt2.training import TrainConfig

tf = import_tf()
keras = import_keras()


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs=0"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.strategy='tpu'"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), strategy="tpu")
    with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate"):
        TrainConfig(data="d", model="tiny", output=str(tmp_path), learning_rate=0)


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
        rc, _, stderr = cli("train", "--data", tiny_shards, "--model", "tiny", "--tokenizer", tiny_tokenizer.path,
                             "--output", out, "--mixed-precision", "fp16")  # fmt: skip
        assert rc == 2 and "--mixed-precision fp16" in stderr and "GPU" in stderr and "bf16" in stderr
        assert not out.exists()  # refused before the output folder is touched


def test_train_flags_come_from_the_config_fields_and_a_config_file_repeats_a_run(tmp_path: Path) -> None:

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
