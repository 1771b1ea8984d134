"""What the preprocessing tests share: read a committed output folder back, build argv, check a folder."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from kogpt2 import outputs, records
from kogpt2.outputs import COMPLETED_FILE, MANIFEST_FILE
from kogpt2.schemas import tf_feature_spec, validate_info
from pipelines import preprocess
from pipelines.preprocess import PreprocessConfig, build_pipeline
from pipelines.shards import spill


def unescape_bytes(text: str) -> bytes:
    """The bytes a dead letter's ``raw`` holds (the inverse of :func:`kogpt2.text.escape_bytes`)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))


def current(out: Path) -> Path:
    """The committed version folder of an output folder (what its COMPLETED manifest names)."""
    return Path(outputs.open_committed(str(out)).root)


def is_completed(out: Path | str) -> bool:
    return outputs.read_manifest(str(out)) is not None


def read_info(out: Path) -> dict[str, Any]:
    return json.loads((current(out) / "info.json").read_text())


def built(p, config: PreprocessConfig):  # type: ignore[no-untyped-def]
    """The preprocessing steps on a test pipeline, claiming ``config.output`` as the command does."""
    plan = preprocess.make_plan(config)
    lease = outputs.Lease(config.output, preprocess.JOB).acquire()
    claim = outputs.begin(config.output, preprocess.JOB, preprocess.signature(config, plan), lease)
    preprocess.prepare_work(plan, claim)
    return build_pipeline(p, config, plan, claim)


def read_split(folder: Path, info: dict[str, Any], split: str) -> list[tuple[list[int], int]]:
    """The examples of one split of an output folder, shard by shard in file order, via tf.data."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    if (folder / COMPLETED_FILE).exists():
        folder = current(folder)
    files = [str(folder / name) for name in info["shards"][split]]
    if not files:
        return []
    spec = tf_feature_spec(info["max_len"])
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").map(lambda x: tf.io.parse_single_example(x, spec))
    return [(e["input_ids"].numpy().tolist(), int(e["length"].numpy())) for e in ds]


def expected_examples(tok, texts: list[str], max_len: int, overflow: str = "truncate") -> Counter:
    """What the shards must hold for these normalized texts, by the pure functions."""
    out: Counter = Counter()
    for text in texts:
        framed = records.frame(tok.encode(text), tok.bos_id, tok.eos_id)
        for piece in records.fit(framed, max_len, overflow):
            ids, length = records.pad(piece, max_len, tok.pad_id)
            out[(tuple(ids), length)] += 1
    return out


def as_counter(examples: list[tuple[list[int], int]]) -> Counter:
    return Counter((tuple(ids), length) for ids, length in examples)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(current(out).glob("*.tfrecord.gz"))}


def argv(inputs: list[Path] | list[str], tok, out: Path, *extra: str) -> list[str]:
    args = []
    for i in inputs:
        args += ["--input", str(i)]
    return [*args, "--tokenizer", str(tok.path if hasattr(tok, "path") else tok), "--output", str(out), *extra]


def check_accounting(info: dict[str, Any]) -> None:
    c = info["counts"]
    assert c["lines_read"] == c["kept"] + sum(c["filtered"].values()) + c["rejected"]


def check_folder(out: Path, info: dict[str, Any]) -> None:
    """Shards listed, info valid, no spill files left, the version holds exactly its manifest, COMPLETED last."""
    validate_info(info)
    done = outputs.open_committed(str(out), job="preprocess", verify="full")
    root = Path(done.root)
    names = {p.name for p in root.iterdir()}
    listed = set(info["shards"]["train"]) | set(info["shards"]["validation"])
    assert listed == {n for n in names if n.endswith(".tfrecord.gz")}
    assert not [n for n in names if n.startswith(spill.SPILL_PREFIX)]
    assert names - {MANIFEST_FILE} == set(done.manifest.files)
    committed = (out / COMPLETED_FILE).stat().st_mtime_ns
    assert all((root / n).stat().st_mtime_ns <= committed for n in names)


def folder_state(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``out`` but the lock: (inode, mtime_ns, bytes); a rewritten file has a new inode."""
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in (".lock", ".kogpt2-cas")]
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def run_steps(test_pipeline, src: Path, tok, out: Path, **settings: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Run the preprocessing steps over ``src`` into ``out`` on a test pipeline; return the committed info.json."""
    out.mkdir()
    config = PreprocessConfig(inputs=(str(src),), tokenizer=str(tok.path), output=str(out), **settings)
    with test_pipeline as p:
        built(p, config)
    return read_info(out)
