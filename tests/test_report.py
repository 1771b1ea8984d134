"""report.html from a run folder's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import commit_folder

from kogpt2.genstats import generation_stats
from kogpt2.report import build_report, collect
from kogpt2.schemas import arrow_schema


def _rows(seed: str, texts: list[str], reason: str) -> list[dict]:
    return [
        {
            "row_id": f"seeds.txt:{seed}",
            "seed": seed,
            "prompt": seed,
            "sample_index": i,
            "text": f"{seed} {t}",
            "continuation": t,
            "new_tokens": len(t.split()) + 1,
            "finish_reason": reason,
            "strategy": "greedy",
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "max_new_tokens": 20,
            "row_seed": i,
            "logprob_sum": -2.0 * (i + 1),
            "logprob_mean": -2.0,
            "text_hash": hash(t) % 1000,
            "model_fingerprint": "m",
            "tokenizer_fingerprint": "t",
        }
        for i, t in enumerate(texts)
    ]


def _parquet(rows: list[dict]) -> bytes:
    import io

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), buffer)
    return buffer.getvalue()


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    info = json.dumps(
        {
            "counts": {
                "lines_read": 12,
                "kept": 9,
                "filtered": {"too_short": 2},
                "rejected": 1,
                "truncated": 3,
                "examples": {"train": 8, "validation": 1},
                "unk_rate": 0.01,
            }
        }
    )
    commit_folder(tmp_path / "data", "preprocess", {"info.json": info.encode()})
    epochs = [
        {
            "epoch": e,
            "loss": tl,
            "accuracy": 0.1 * e,
            "perplexity": 2.0**tl,
            "val_loss": v,
            "val_accuracy": 0.1 * e,
            "val_perplexity": 2.0**v,
        }
        for e, tl, v in [(1, 5.0, 5.5), (2, 4.0, 4.5), (3, 3.0, 4.8)]
    ]
    history = {"epochs": epochs, "best_epoch": 2, "best_val_loss": 4.5, "epochs_run": 3, "stopped_early": True}
    commit_folder(tmp_path / "model", "train", {"history.json": json.dumps(history).encode()})
    for phase, reason, texts in [
        ("before", "length", ["가 가 가 가", "나 나"]),
        ("after", "eos", ["그는 웃었다", "비가 왔다 그날"]),
    ]:  # one grid job a phase: config=greedy/ (and another configuration the report does not show)
        rows = _rows("이때", texts[:1], reason) + _rows("그날", texts[1:], reason)
        files = {"config=greedy/generations-00000-of-00001.parquet": _parquet(rows),
                 "config=other/generations-00000-of-00001.parquet": _parquet(rows[:1])}  # fmt: skip
        commit_folder(tmp_path / "generations" / phase, "generate", files)
    return tmp_path


def test_report_figures_match_run_files(run_folder: Path) -> None:
    html_path = build_report(run_folder)
    page = html_path.read_text(encoding="utf-8")
    summary = json.loads((run_folder / "report.json").read_text(encoding="utf-8"))
    assert summary["training"]["best_epoch"] == 2
    assert summary["preprocess"]["lines_read"] == 12
    expected = generation_stats(["그는 웃었다", "비가 왔다 그날"], [3, 4], ["eos", "eos"]).as_dict()
    assert summary["generations"]["after-greedy"] == expected
    assert summary["generations"]["before-greedy"]["distinct_1"] == pytest.approx(2 / 6)
    for chart in ("curves.png", "perplexity.png", "preprocess.png", "generation.png"):
        assert (run_folder / "charts" / chart).stat().st_size > 1000
        assert f"charts/{chart}" in page
    # the samples table shows every seed, before and after
    assert "이때 가 가 가 가" in page and "이때 그는 웃었다" in page and "그날 비가 왔다 그날" in page
    assert "filtered: too_short" in page


def test_collect_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run outputs"):
        collect(tmp_path)


def test_cli_report(run_folder: Path, tmp_path: Path) -> None:
    from kogpt2.cli import main

    assert main(["report", "--run", str(run_folder)]) == 0
    assert (run_folder / "report.html").is_file()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
