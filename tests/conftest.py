"""Shared fixtures: tiny corpora, tokenizers and models built in the test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kogpt2  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KOGPT2_SHARED_DATA", REPO.parent / "shared" / "data"))
V1_TOKENIZER = SHARED_DATA / "kogpt2_v1_tokenizer.spiece"
NOVEL = SHARED_DATA / "finetune_data_unsu_joeun_nal.txt"

_SUBJECTS = ["그는", "그녀는", "아이들은", "어머니는", "노인은", "우리는", "사람들은", "이때 그는", "그날 밤", "마침내 그는"]
_PLACES = ["시장에서", "강가에서", "학교 앞에서", "비 오는 거리에서", "기차역에서", "작은 방에서", "산길에서"]
_ACTS = ["오래 기다렸다", "조용히 웃었다", "편지를 읽었다", "밥을 지었다", "길을 잃었다", "노래를 불렀다", "하늘을 보았다"]


def make_sentences(n: int) -> list[str]:
    """n distinct, deterministic Korean sentences."""
    out = []
    for i in range(n):
        s, p, a = _SUBJECTS[i % 10], _PLACES[(i // 10) % 7], _ACTS[(i // 70) % 7]
        out.append(f"{s} {p} {a} {i}번째 날이었다.")
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_sentences(300)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    from kogpt2.tokenizer import train_tokenizer

    return train_tokenizer([tiny_corpus], 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, randomly initialized 2-layer model folder with the tiny tokenizer."""
    from kogpt2.model import new_model, save_model

    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(new_model("tiny", tiny_tokenizer, seed=0), tiny_tokenizer, folder, {"steps": 0})
    return folder


@pytest.fixture(scope="session")
def v1_tokenizer_path() -> Path:
    if not V1_TOKENIZER.is_file():
        pytest.skip(f"{V1_TOKENIZER} absent")
    return V1_TOKENIZER


@pytest.fixture(scope="session")
def novel_path() -> Path:
    if not NOVEL.is_file():
        pytest.skip(f"{NOVEL} absent")
    return NOVEL


@pytest.fixture
def test_pipeline():
    """A TestPipeline on Beam's FnApiRunner (no Prism download)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.test_pipeline import TestPipeline

    return TestPipeline(runner=FnApiRunner())
