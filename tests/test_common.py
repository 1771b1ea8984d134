"""pipelines.common: output folders and remote paths, as Dataflow users meet them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from pipelines.common import local_copy

PREFIX = "kogpt2fake://"


class FakeRemoteFileSystem(LocalFileSystem):
    """``kogpt2fake:///tmp/x`` is the local ``/tmp/x``, reached through Beam's FileSystems like gs://."""

    _disk = LocalFileSystem(None)  # does the work on the local paths

    @classmethod
    def scheme(cls) -> str:
        return "kogpt2fake"

    @staticmethod
    def _local(path: str) -> str:
        return path[len(PREFIX) :] if path.startswith(PREFIX) else path

    def join(self, basepath: str, *paths: str) -> str:
        return PREFIX + self._disk.join(self._local(basepath), *paths)

    def match(self, patterns, limits=None):
        results = self._disk.match([self._local(p) for p in patterns], limits)
        return [
            MatchResult(PREFIX + r.pattern, [FileMetadata(PREFIX + m.path, m.size_in_bytes) for m in r.metadata_list])
            for r in results
        ]

    def open(self, path, *args, **kwargs):
        return self._disk.open(self._local(path), *args, **kwargs)

    def create(self, path, *args, **kwargs):
        return self._disk.create(self._local(path), *args, **kwargs)

    def exists(self, path):
        return self._disk.exists(self._local(path))


def test_local_copy_of_a_remote_model_folder_and_tokenizer_file(tiny_model_dir: Path) -> None:
    from kogpt2.model import load_model, model_fingerprint
    from kogpt2.tokenizer import load_tokenizer

    folder = local_copy(PREFIX + str(tiny_model_dir))
    assert folder != str(tiny_model_dir)
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    assert model_fingerprint(folder) == model_fingerprint(tiny_model_dir)
    model, tok = load_model(folder)
    assert model.config.n_layer == 2
    assert local_copy(PREFIX + str(tiny_model_dir)) == folder  # copied once per process
    spiece = local_copy(PREFIX + str(tiny_model_dir / "tokenizer.spiece"))
    assert load_tokenizer(spiece).fingerprint == tok.fingerprint
    assert local_copy(str(tiny_model_dir)) == str(tiny_model_dir)  # local paths are used in place


def test_an_output_over_an_input_is_refused_before_anything_is_deleted(tmp_path: Path) -> None:
    from kogpt2.outputs import refuse_output_over_inputs

    corpus = tmp_path / "data"
    corpus.mkdir()
    (corpus / "a.txt").write_text("문장\n")
    model = tmp_path / "model"
    for output, inputs, message in [
        (corpus, [str(corpus / "a.txt")], "contains an input"),
        (model, [str(model)], "is an input"),
        (model / "finetuned", [str(model)], "lies inside an input"),
        (tmp_path, [str(corpus / "a.txt")], "contains an input"),
    ]:
        with pytest.raises(ValueError, match=message):
            refuse_output_over_inputs(str(output), inputs)
    refuse_output_over_inputs(str(tmp_path / "out"), [str(corpus / "a.txt"), str(model)])  # beside: fine
    refuse_output_over_inputs("gs://b/out", ["gs://b/outputs/x.txt", str(corpus)])  # a prefix is not a parent
    with pytest.raises(ValueError, match="lies inside"):
        refuse_output_over_inputs("gs://b/model/out", ["gs://b/model/"])
    link = tmp_path / "link"
    link.symlink_to(corpus)
    with pytest.raises(ValueError, match="contains an input"):
        refuse_output_over_inputs(str(link), [str(corpus / "a.txt")])  # through a symlink too


def test_preprocess_overwrite_into_the_corpus_folder_is_refused_and_the_corpus_kept(tmp_path: Path, tiny_tokenizer):
    from pipelines.preprocess import main

    corpus = tmp_path / "data"
    corpus.mkdir()
    (corpus / "a.txt").write_text("그는 시장에서 오래 기다렸다.\n", encoding="utf-8")
    status = main(
        [
            "--input",
            str(corpus / "*.txt"),
            "--tokenizer",
            str(tiny_tokenizer.path),
            "--output",
            str(corpus),
            "--overwrite",
        ]
    )
    assert status == 2
    assert (corpus / "a.txt").read_text(encoding="utf-8") == "그는 시장에서 오래 기다렸다.\n"
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"]


def test_a_second_preprocess_run_into_a_live_runs_folder_is_refused(
    tmp_path: Path, tiny_corpus, tiny_tokenizer, capsys
):
    from kogpt2.outputs import Lease
    from pipelines.preprocess import main

    out = tmp_path / "out"
    args = ["--input", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer.path), "--output", str(out)]
    with Lease(str(out), job="a scheduled run"):
        before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
        assert main(args) == 3  # locked: retry later
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing touched
    err = capsys.readouterr().err
    assert "in use by a scheduled run" in err and f"pid {os.getpid()}" in err and "expires" in err


def test_frozen_heap_gives_the_collector_back_as_it_was() -> None:
    """A pipeline run in a process that goes on (a notebook, a test) leaves nothing frozen: its garbage is collected."""
    import gc
    import weakref

    from pipelines.common import GC_YOUNG_THRESHOLD, frozen_heap

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    alive = weakref.ref(cycle)
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    with frozen_heap():
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: full collections skip it (what saves the run's time)
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen_before
    gc.collect()
    assert alive() is None  # given back: garbage from the run is collected
