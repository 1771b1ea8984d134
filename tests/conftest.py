"""Shared fixtures: tiny corpora, tokenizers and models built in the test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import kogpt2  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KOGPT2_SHARED_DATA", REPO.parent / "shared" / "data"))
V1_TOKENIZER = SHARED_DATA / "kogpt2_v1_tokenizer.spiece"
NOVEL = SHARED_DATA / "finetune_data_unsu_joeun_nal.txt"


#: ``python -c SLOW_GENERATE SECONDS ARGS...``: the bulk job with each decode batch delayed by SECONDS,
#: so a test can kill or race it mid-run (the delay is patched in: no test hook in the product).
SLOW_GENERATE = r"""
import sys, time
import kogpt2.generation as generation
delay, args = float(sys.argv[1]), sys.argv[2:]
real = generation._decode_batch
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)
generation._decode_batch = slow
from pipelines.generate import main
sys.exit(main(args))
"""


def make_sentences(n: int) -> list[str]:
    """n distinct, deterministic Korean sentences (the project's one generator)."""
    from kogpt2.synthetic import korean_sentences

    return korean_sentences(n)


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


# --- training shards: written with the library's own record functions, without the Beam pipeline ---


def write_test_shards(
    folder: Path,
    tokenizer,
    train_texts: list[str],
    val_texts: list[str],
    *,
    max_len: int = 24,
    packing: bool = False,
    num_shards: int = 2,
    completed: bool = True,
    tokenizer_overrides: dict | None = None,
    include_tokenizer: bool = False,
) -> Path:
    """Write a shard folder per the preprocessing contract (info.json, gzip TFRecords, a committed version).

    Padded mode: one example per text, ``<s> ids </s>`` cut at the end to ``max_len`` and
    right-padded with ``<pad>``. Packed mode: all sequences concatenated into ``max_len``
    blocks; only the last block is padded.
    """
    import json

    from kogpt2 import outputs
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    out = Path(folder)
    lease = outputs.Lease(str(out), "preprocess").acquire()
    claim = outputs.begin(str(out), "preprocess", {"test_shards": str(out), "texts": len(train_texts) + len(val_texts)},
                          lease, overwrite=True)  # fmt: skip
    folder = Path(claim.work)

    from kogpt2 import records

    def examples(texts: list[str]) -> list[tuple[list[int], int]]:
        seqs = [records.frame(tokenizer.encode(t), tokenizer.bos_id, tokenizer.eos_id) for t in texts]
        if packing:
            return list(records.pack(seqs, max_len, tokenizer.pad_id))
        return [records.pad(records.truncate(s, max_len), max_len, tokenizer.pad_id) for s in seqs]

    digests: dict[str, str] = {}
    shards: dict[str, list[str]] = {}
    counts_ex: dict[str, int] = {}
    counts_tok: dict[str, int] = {}
    for split, texts in (("train", train_texts), ("validation", val_texts)):
        rows = examples(texts)
        counts_ex[split] = len(rows)
        counts_tok[split] = sum(n for _, n in rows)
        n_files = max(1, min(num_shards, len(rows))) if rows else 0
        shards[split] = []
        for k in range(n_files):
            name = records.shard_name(split, k, n_files)
            serialized = [records.serialize_example(ids, length) for ids, length in rows[k::n_files]]
            with tf.io.TFRecordWriter(str(folder / name), options="GZIP") as w:
                for data in serialized:
                    w.write(data)
            digests[name] = records.shard_digest(serialized)  # fingerprinted as the pipeline does it
            shards[split].append(name)
    n = len(train_texts) + len(val_texts)
    info = {
        "schema_version": 1,
        "created_by": "tests/conftest.py write_test_shards",
        "data_fingerprint": records.data_fingerprint(digests),
        "tokenizer": {**tokenizer.describe(), **(tokenizer_overrides or {})},
        "max_len": max_len,
        "packing": packing,
        "val_fraction": len(val_texts) / max(1, n),
        "inputs": ["<test>"],
        "counts": {
            "lines_read": n,
            "kept": n,
            "filtered": {},
            "rejected": 0,
            "truncated": 0,
            "examples": counts_ex,
            "tokens": counts_tok,
            "unk_tokens": 0,
            "unk_rate": 0.0,
        },
        "shards": shards,
    }
    (folder / "info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    extra = []
    if include_tokenizer:  # as the pipeline does: the shards' tokenizer travels with them
        import shutil

        shutil.copy(tokenizer.path, folder / "tokenizer.spiece")
        extra.append("tokenizer.spiece")
    if completed:  # committed as the preprocessing pipeline commits: the manifest last
        outputs.commit(claim, [*shards["train"], *shards["validation"], "info.json", *extra])
    lease.release()
    return out


def commit_folder(out: Path, job: str, files: dict[str, bytes], signature: dict | None = None) -> Path:
    """Commit ``files`` (relative name -> bytes) as a new version of the output folder ``out``, as ``job`` would.

    Returns:
        The committed version folder.
    """
    from kogpt2 import outputs
    from kogpt2.storage import store_for

    with outputs.Lease(str(out), job) as lease:
        claim = outputs.begin(str(out), job, signature or {"files": sorted(files)}, lease, overwrite=True)
        store = store_for(claim.work)
        for name, data in files.items():
            store.write(claim.path(name), data)
        outputs.commit(claim, list(files))
    return Path(claim.work)


@pytest.fixture(scope="session")
def tiny_shards(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Padded shards (max_len 32) from make_sentences: 48 train and 16 validation examples."""
    texts = make_sentences(64)
    return write_test_shards(tmp_path_factory.mktemp("shards"), tiny_tokenizer, texts[:48], texts[48:], max_len=32)


# --- object storage: a GCS emulator for gs:// paths (tests/gcs_emulator.py, docs/TESTING.md) ---


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory):
    """The GCS emulator, started once; gs:// in this process and its subprocesses reaches it.

    Sets STORAGE_EMULATOR_HOST, GOOGLE_APPLICATION_CREDENTIALS (fake, needs no network),
    GOOGLE_CLOUD_PROJECT and NO_GCE_CHECK for the session. ``gcs_server.fail(kind, status,
    times=..., method=..., prefix=...)`` injects faults, ``gcs_server.clear_faults()`` removes
    them, ``gcs_server.requests()`` is the request journal, ``gcs_server.client()`` a
    google.cloud.storage client.
    """
    from gcs_emulator import GcsEmulator, missing_requirements, reset_beam_credentials

    missing = missing_requirements()
    if missing:
        pytest.skip(f"the GCS emulator needs {', '.join(missing)} (pip install -e '.[dev]')")
    server = GcsEmulator(tmp_path_factory.mktemp("gcs")).start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in server.env.items():
                env.setenv(key, value)
            reset_beam_credentials()  # in case gs:// was touched before the variables were set
            yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty bucket on the emulator for this test, as ``gs://name``; no faults set."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    gcs_server.clear_faults()
    url = gcs_server.create_bucket(f"{stem or 'test'}-{uuid.uuid4().hex[:8]}")
    yield url
    gcs_server.clear_faults()
