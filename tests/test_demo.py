"""The main job end to end on a tiny corpus and the tiny preset, checked against its own files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_sentences

from kogpt2 import outputs
from kogpt2.genstats import generation_stats


def version(out: Path) -> Path:
    return Path(outputs.open_committed(str(out), verify="full").root)


SEEDS = ["그는", "마침내 그는", "그날 밤"]


@pytest.mark.slow
def test_demo_end_to_end_report_matches_run_files(tmp_path: Path) -> None:
    from pipelines.demo import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_sentences(160)) + "\n\n", encoding="utf-8")  # a blank line gets filtered
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(SEEDS) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    argv = ["--run", str(run), "--corpus", str(corpus), "--seeds", str(seeds), "--preset", "tiny"]
    argv += ["--vocab-size", "400", "--epochs", "3", "--train-seconds", "120", "--max-new-tokens", "8"]
    argv += ["--num-samples", "2"]
    assert main(argv) == 0

    demo = json.loads((run / "demo.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in demo["stages"]] == ["ok"] * 6
    summary = json.loads((run / "report.json").read_text(encoding="utf-8"))
    info = json.loads((version(run / "data") / "info.json").read_text(encoding="utf-8"))
    history = json.loads((version(run / "model") / "history.json").read_text(encoding="utf-8"))

    # preprocessing counts in the report are the pipeline's own
    assert summary["preprocess"] == info["counts"]
    assert info["counts"]["lines_read"] == 161 and info["counts"]["filtered"]["empty"] == 1
    # training figures are history.json's, and training lowered validation loss
    assert summary["training"]["best_epoch"] == history["best_epoch"]
    assert summary["evaluation"]["after"]["loss"] < summary["evaluation"]["before"]["loss"]
    assert summary["evaluation"]["after"]["loss"] == pytest.approx(history["best_val_loss"], rel=1e-3)
    # generation statistics are recomputed from the Parquet files; every seed, before and after
    for name in ("before-greedy", "before-top_p", "after-greedy", "after-top_p"):
        phase, config = name.split("-", 1)  # one grid job a phase, a configuration a strategy
        files = sorted((version(run / "generations" / phase) / f"config={config}").glob("*.parquet"))
        rows = [r for f in files for r in pq.read_table(f).to_pylist()]
        per_seed = 1 if name.endswith("greedy") else 2
        assert sorted(r["seed"] for r in rows) == sorted(SEEDS * per_seed)
        stats = generation_stats(
            [r["continuation"] for r in rows], [r["new_tokens"] for r in rows], [r["finish_reason"] for r in rows]
        )
        assert summary["generations"][name] == pytest.approx(stats.as_dict())
    page = (run / "report.html").read_text(encoding="utf-8")
    for seed in SEEDS:
        assert f"<td>{seed}</td>" in page


def test_demo_config_rejects_bad_values(tmp_path: Path) -> None:
    from pipelines.demo import DemoConfig

    with pytest.raises(ValueError, match="DemoConfig.preset"):
        DemoConfig(run=str(tmp_path), preset="huge")
    with pytest.raises(ValueError, match="DemoConfig.corpus"):
        DemoConfig(run=str(tmp_path), corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="DemoConfig.max_new_tokens"):
        DemoConfig(run=str(tmp_path), max_new_tokens=0)


def test_demo_stops_at_the_failing_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.demo import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_sentences(20)) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    # vocab 10 is refused by the tokenizer trainer: stage 1 fails, nothing after it runs
    assert main(["--run", str(run), "--corpus", str(corpus), "--vocab-size", "10"]) == 1
    err = capsys.readouterr().err
    assert "stage 1/6 'tokenizer' failed" in err and "vocab_size" in err
    demo = json.loads((run / "demo.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in demo["stages"]] == ["failed"]


@pytest.mark.slow
@pytest.mark.long  # the demo's stages: also test_demo_end_to_end_report_matches_run_files; fine-tuning a folder: test_training
def test_demo_fine_tunes_a_model_folder_like_the_notebook(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pipelines.demo import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_sentences(120)) + "\n", encoding="utf-8")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("그날 밤\n", encoding="utf-8")
    run = tmp_path / "run"
    argv = ["--run", str(run), "--model", str(tiny_model_dir), "--corpus", str(corpus), "--seeds", str(seeds)]
    argv += ["--epochs", "2", "--max-new-tokens", "5", "--num-samples", "1"]
    assert main(argv) == 0
    demo = json.loads((run / "demo.json").read_text(encoding="utf-8"))
    assert demo["stages"][0]["detail"].startswith("using ")  # the model's own tokenizer, nothing trained
    assert not (run / "tokenizer").exists() and not (run / "init-model").exists()
    history = json.loads((version(run / "model") / "history.json").read_text(encoding="utf-8"))
    assert history["config"]["learning_rate"] == 1e-4 and history["config"]["batch_size"] == 16
    assert demo["evaluation"]["before"]["model"] == str(tiny_model_dir)
    assert demo["evaluation"]["after"]["loss"] < demo["evaluation"]["before"]["loss"]
