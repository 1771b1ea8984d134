"""pipelines.common: output folders and remote paths, as Dataflow users meet them."""

from __future__ import annotations

from pathlib import Path

import pytest
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from pipelines.common import OutputConflictError, local_copy, prepare_output

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


def test_prepare_output_refuses_another_run_and_reruns_the_same(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    prepare_output(out, {"flags": 1})
    (tmp_path / "out" / "shard-0").write_text("old")
    prepare_output(out, {"flags": 1})  # the same run again: cleared, to be rewritten
    assert not (tmp_path / "out" / "shard-0").exists()
    with pytest.raises(OutputConflictError, match="--overwrite"):
        prepare_output(out, {"flags": 2})
    prepare_output(out, {"flags": 2}, overwrite=True)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflictError, match="not written by this pipeline"):
        prepare_output(str(tmp_path / "stranger"), {"flags": 1})
