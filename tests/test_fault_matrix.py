"""The fault matrix: each pipeline job x {local disk, gs://} under the faults a scheduler meets.

- SIGKILL at several points (mid-run; after the manifest copy, before COMPLETED; after COMPLETED,
  before .pending is forgotten), then a rerun: the output is identical to an uninterrupted run's.
- A second concurrent run into the same folder: refused with exit status 3, the first completes.
- A crashed run's lock: the next run is refused while the lease lives and proceeds after it.
- A failed rebuild (an empty export, failed rows): exit status 1, the previous version stays
  complete and readable.

The killed runs are real processes (``python -c`` with the fault patched in: no test hook in the
product). Training's side of the matrix is in tests/test_training.py (SIGKILL mid-epoch, a copy
cut short, NaN), through ``ram://`` for its remote folders (TensorFlow's own gs:// cannot be pointed
at an emulator); the protocol itself on gs:// is in tests/test_outputs_gcs.py. Counts:
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SLOW_GENERATE, make_sentences

from kogpt2 import outputs
from kogpt2.storage import store_for

pytestmark = pytest.mark.slow

#: Patches the named fault into a job's process, then runs the job's command line.
KILLER = r"""
import os, signal, sys
point, job, *args = sys.argv[1:]
import kogpt2
from kogpt2 import outputs, storage
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-run" and job == "preprocess":
    from pipelines.shards import writer
    real_write = writer.write_tfrecord
    def write(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            die()  # one shard written, the next one not
        return real_write(*a, **k)
    writer.write_tfrecord = write
elif point == "mid-run":
    real_unit = outputs.commit_unit
    def commit_unit(*a, **k):
        real_unit(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            die()  # two units committed, the others not
    outputs.commit_unit = commit_unit
elif point == "before-commit":
    for cls in (storage.LocalStore, storage.GcsStore):
        def make(real):
            def write(self, path, data, **k):
                if path.endswith("/COMPLETED"):
                    die()  # the version's MANIFEST.json is written, COMPLETED is not
                return real(self, path, data, **k)
            return write
        cls.write = make(cls.write)
elif point == "after-commit":
    outputs._forget_pending = lambda *a, **k: die()  # committed; .pending and old versions not cleaned up
if job == "preprocess":
    from pipelines.preprocess import main
else:
    from pipelines.generate import main
sys.exit(main(args))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer, tiny_model_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text("\n".join(make_sentences(120)) + "\n", encoding="utf-8")
    (d / "seeds.txt").write_text("\n".join(s.split(" ")[0] for s in make_sentences(40)) + "\n", encoding="utf-8")
    return {"corpus": d / "corpus.txt", "seeds": d / "seeds.txt", "tokenizer": Path(tiny_tokenizer.path),
            "model": tiny_model_dir}  # fmt: skip


def job_args(job: str, inputs: dict[str, Path], out: str, *extra: str) -> list[str]:
    if job == "preprocess":
        return ["--input", str(inputs["corpus"]), "--tokenizer", str(inputs["tokenizer"]), "--output", out,
                "--num-shards", "3", "--max-len", "24", *extra]  # fmt: skip
    return ["--model", str(inputs["model"]), "--seeds", str(inputs["seeds"]), "--output", out, "--num-shards", "6",
            "--batch-size", "4", "--num-samples", "2", "--max-new-tokens", "4", *extra]  # fmt: skip


def run_job(job: str, args: list[str]) -> int:
    if job == "preprocess":
        from pipelines.preprocess import main
    else:
        from pipelines.generate import main
    return int(main(args))


def output_of(job: str, out: str) -> dict:
    """What a user reads from a committed output: every data file's bytes (shards) or every row (generations)."""
    import io

    import pyarrow.parquet as pq

    done = outputs.open_committed(out, job=job, verify="full")
    info = done.read_json("info.json")
    if job == "preprocess":
        files = {n: done.read(n) for n in done.names(suffix=".tfrecord.gz")}
        return {"files": files, "fingerprint": info["data_fingerprint"], "counts": info["counts"]}
    rows = {}
    for name in done.names(suffix=".parquet"):
        for r in pq.read_table(io.BytesIO(done.read(name))).to_pylist():
            rows[(r["seed"], r["sample_index"])] = r["text"]
    return {"rows": rows, "counts": info["counts"]}


def version_folders(out: str) -> list[str]:
    return [n for n in store_for(out).children(out) if n.startswith("v-")]


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_bucket")


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[str, dict]:
    out = {}
    for job in ("preprocess", "generate"):
        folder = str(tmp_path_factory.mktemp(f"ref-{job}") / "out")
        assert run_job(job, job_args(job, inputs, folder)) == 0
        out[job] = output_of(job, folder)
    return out


@pytest.mark.parametrize("point", ["mid-run", "before-commit", "after-commit"])
@pytest.mark.parametrize("job", ["preprocess", "generate"])
def test_sigkill_then_rerun_gives_the_uninterrupted_output(job, point, where, inputs, references) -> None:
    out = f"{where}/{job}-{point}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, point, job, *job_args(job, inputs, out, "--lease-seconds", "1.5")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    committed = outputs.read_manifest(out) is not None
    assert committed == (point == "after-commit")  # a kill before COMPLETED never leaves a version behind
    # the killed run's lock lives for its lease: a rerun right away is refused, one after it proceeds
    assert run_job(job, job_args(job, inputs, out)) == 3
    time.sleep(1.6)
    assert run_job(job, job_args(job, inputs, out)) == 0
    assert output_of(job, out) == references[job]
    assert len(version_folders(out)) == 1 and outputs.read_pending(out) is None
    status = outputs.status(out)
    assert status["complete"] and status["current"]["version"] == 1 and status["lock"] is None


@pytest.mark.parametrize("job", ["preprocess", "generate"])
def test_a_second_concurrent_run_is_refused_and_the_first_completes(job, where, inputs, references) -> None:
    out = f"{where}/{job}-race"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if job == "generate":
        code = [SLOW_GENERATE, "0.1"]
    else:
        code = ["import sys; from pipelines.preprocess import main; sys.exit(main(sys.argv[1:]))"]
    first = subprocess.Popen([sys.executable, "-c", *code, *job_args(job, inputs, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not store_for(out).exists(f"{out}/.lock") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second started"
    assert run_job(job, job_args(job, inputs, out, "--overwrite")) == 3  # refused at once, touched nothing
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert output_of(job, out) == references[job]


def test_a_failed_rebuild_keeps_the_previous_version(where, inputs, references, tmp_path, monkeypatch) -> None:
    # preprocessing: an --overwrite rebuild from an export that came out empty (read as UTF-16 garbage)
    out = f"{where}/shards"
    assert run_job("preprocess", job_args("preprocess", inputs, out)) == 0
    empty = tmp_path / "export.txt"
    empty.write_text("\n".join(make_sentences(10)) + "\n", encoding="utf-16")
    args = job_args("preprocess", inputs, out, "--overwrite")
    args[args.index(str(inputs["corpus"]))] = str(empty)
    assert run_job("preprocess", args) == 1
    assert output_of("preprocess", out) == references["preprocess"]
    # generation: an --overwrite run whose batches fail commits nothing; the previous rows stay
    gen = f"{where}/generations"
    assert run_job("generate", job_args("generate", inputs, gen)) == 0
    import kogpt2.generation as generation

    def broken(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(generation, "_decode_batch", broken)
    assert run_job("generate", job_args("generate", inputs, gen, "--overwrite", "--seed", "9")) == 1
    assert output_of("generate", gen) == references["generate"]
    assert json.loads(json.dumps(outputs.status(gen)["current"]["summary"]))["rows"] == 80
