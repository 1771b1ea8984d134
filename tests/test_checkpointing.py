"""kogpt2.checkpointing: a training run's resume state survives a round trip; a version's files are published last-first."""

from __future__ import annotations

from pathlib import Path

from kogpt2.checkpointing import HISTORY_FILE, PUBLISH_LAST, RunState, publish, read_text, write_text


def test_run_state_round_trips_and_knows_when_it_is_finished(tmp_path: Path) -> None:
    state = RunState(config={"epochs": 2}, data_fingerprint="ab" * 32, epochs=[{"epoch": 1}], epoch_steps=3,
                     partial={"loss": [4.0, 2.0]})  # fmt: skip
    path = str(tmp_path / "state.json")
    state.save(path)
    assert RunState.load(path) == state and not state.finished
    state.epochs.append({"epoch": 2})
    assert state.finished
    assert RunState(config={"epochs": 5}, data_fingerprint="", stopped_early=True).finished
    assert RunState(config={"epochs": 5}, data_fingerprint="", stopped_by_time=True).finished


def test_an_older_state_file_loads_with_defaults_for_what_it_lacks(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    write_text(path, '{"config": {"epochs": 1}, "data_fingerprint": "x", "unknown_key": 1}')
    state = RunState.load(path)
    assert state.epochs == [] and state.step == 0 and state.failure is None
    assert read_text(path).startswith('{"config"')


def test_publish_copies_the_committing_files_last(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("tf_model.h5", HISTORY_FILE, "config.json", "curves.png", "kogpt2.json", "tokenizer.spiece"):
        (staging / name).write_text(name)
    copied: list[str] = []
    order = publish(staging, str(tmp_path / "v"), copy=lambda src, dst: copied.append(Path(dst).name))
    assert order == copied == ["curves.png", "tf_model.h5", "tokenizer.spiece", *PUBLISH_LAST]
    assert publish(staging, str(tmp_path / "w")) == order
    assert (tmp_path / "w" / HISTORY_FILE).read_text() == HISTORY_FILE and not list((tmp_path / "w").glob("*.tmp-*"))
