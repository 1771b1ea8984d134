"""Model folders: the KoGPT2 v1 layout, save/load round trips, presets, safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kogpt2.model import (
    PRESETS,
    ModelLoadError,
    load_model,
    model_fingerprint,
    new_model,
    read_model_info,
)
from kogpt2.tf_setup import import_tf


def _logits(model, ids: list[int]) -> np.ndarray:
    tf = import_tf()
    return model(tf.constant([ids], dtype=tf.int32)).logits.numpy()


@pytest.mark.shared_data
def test_v1_layout_folder_loads_with_eos_corrected(tmp_path: Path, v1_tokenizer_path: Path) -> None:
    """config.json says eos 50256 (outside the 50,000 vocabulary): the tokenizer's ids win."""
    from kogpt2.tokenizer import load_tokenizer

    tok = load_tokenizer(v1_tokenizer_path)
    model = new_model("tiny", tok, seed=0)
    model.save_pretrained(str(tmp_path))  # config.json + tf_model.h5
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(bos_token_id=50256, eos_token_id=50256)
    cfg.pop("pad_token_id", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    shutil.copy(v1_tokenizer_path, tmp_path / "gpt2_kor_tokenizer.spiece")

    with pytest.warns(UserWarning, match="50256"):
        loaded, loaded_tok = load_model(tmp_path)
    assert loaded.config.eos_token_id == 1
    assert loaded.config.bos_token_id == 0
    assert loaded.config.pad_token_id == 3
    assert loaded.generation_config.eos_token_id == 1
    assert loaded_tok.encode("이때문에 일부 전문가들은") == [4499, 2592, 847, 4558]
    np.testing.assert_allclose(_logits(loaded, [0, 4499]), _logits(model, [0, 4499]), atol=1e-5)


def test_pickle_only_folder_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_model_dir / "tokenizer.spiece", tmp_path / "tokenizer.spiece")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(tmp_path)


def test_missing_folder_and_missing_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_model_dir / "tokenizer.spiece", tmp_path / "tokenizer.spiece")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


def test_save_load_round_trip_is_self_describing(tiny_model_dir: Path, tiny_tokenizer) -> None:
    from transformers import TFGPT2LMHeadModel

    model, tok = load_model(tiny_model_dir)
    assert tok.fingerprint == tiny_tokenizer.fingerprint
    info = read_model_info(tiny_model_dir)
    assert info["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint
    assert info["tokenizer"]["file"] == "tokenizer.spiece"
    assert info["model"]["preset"] == "tiny"
    assert info["model"]["fingerprint"] == model_fingerprint(tiny_model_dir)
    assert info["info"]["steps"] == 0
    assert "tensorflow" in info["versions"] and "transformers" in info["versions"]
    plain = TFGPT2LMHeadModel.from_pretrained(str(tiny_model_dir))
    ids = tok.encode("그날 밤 그는 웃었다")
    np.testing.assert_allclose(_logits(plain, ids), _logits(model, ids), atol=1e-5)


def test_safetensors_folder_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    model, tok = load_model(tiny_model_dir)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    tok.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "tf_model.h5").exists()
    again, _ = load_model(tmp_path)
    ids = tok.encode("아침이 밝았다")
    np.testing.assert_allclose(_logits(again, ids), _logits(model, ids), atol=1e-5)


def test_new_model_presets_follow_tokenizer(tiny_tokenizer) -> None:
    model = new_model("tiny", tiny_tokenizer, seed=1)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd) == (PRESETS["tiny"].n_layer, PRESETS["tiny"].n_embd) == (2, 128)
    assert cfg.vocab_size == tiny_tokenizer.vocab_size
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 3)
    assert (PRESETS["small"].n_layer, PRESETS["small"].n_embd) == (6, 512)
    assert (PRESETS["base"].n_layer, PRESETS["base"].n_embd) == (12, 768)
    same = new_model("tiny", tiny_tokenizer, seed=1)
    np.testing.assert_array_equal(_logits(model, [0, 7]), _logits(same, [0, 7]))
    with pytest.raises(ValueError, match="preset='huge'"):
        new_model("huge", tiny_tokenizer)


def test_compile_and_fit_one_step_after_import(tiny_tokenizer) -> None:
    """transformers TF models compile and train with tf-keras bound (Keras 3 would fail)."""
    from kogpt2.tf_setup import import_keras

    tf = import_tf()
    keras = import_keras()
    model = new_model("tiny", tiny_tokenizer, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(True))
    x = tf.constant([[0, 10, 11, 12, 1]], dtype=tf.int32)
    hist = model.fit(x[:, :-1], x[:, 1:], epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


# --- one weight file, weights match config, vocabularies match -----------------

WEIGHT_NAMES = ("tf_model.h5", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack")


def test_save_into_a_folder_with_old_weights_leaves_one_weight_file(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import TFGPT2LMHeadModel

    from kogpt2.model import save_model
    from kogpt2.tokenizer import file_fingerprint

    old = new_model("tiny", tiny_tokenizer, seed=0)
    old.save_pretrained(str(tmp_path), safe_serialization=True)  # an HF download: model.safetensors
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 old pickle")
    (tmp_path / "notes.txt").write_text("mine")  # not a weight file: kept
    new = new_model("tiny", tiny_tokenizer, seed=1)
    save_model(new, tiny_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name in WEIGHT_NAMES) == ["tf_model.h5"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    fingerprint = read_model_info(tmp_path)["model"]["fingerprint"]
    assert fingerprint == model_fingerprint(tmp_path) == file_fingerprint(tmp_path / "tf_model.h5")
    ids = tiny_tokenizer.encode("그날 밤")
    plain = TFGPT2LMHeadModel.from_pretrained(str(tmp_path))  # what any consumer loads: the new weights
    np.testing.assert_allclose(_logits(plain, ids), _logits(new, ids), atol=1e-5)


def test_fingerprint_is_of_the_weight_file_that_loads(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import TFGPT2LMHeadModel

    from kogpt2.tokenizer import file_fingerprint

    a, b = new_model("tiny", tiny_tokenizer, seed=0), new_model("tiny", tiny_tokenizer, seed=1)
    a.save_pretrained(str(tmp_path), safe_serialization=True)
    b.save_pretrained(str(tmp_path))  # a folder saved elsewhere, holding both
    ids = tiny_tokenizer.encode("그날 밤")
    loaded = _logits(TFGPT2LMHeadModel.from_pretrained(str(tmp_path)), ids)
    which = "model.safetensors" if np.allclose(loaded, _logits(a, ids), atol=1e-5) else "tf_model.h5"
    assert model_fingerprint(tmp_path) == file_fingerprint(tmp_path / which)


def test_sharded_weights_are_fingerprinted_by_every_shard(tmp_path: Path, tiny_tokenizer) -> None:
    model = new_model("tiny", tiny_tokenizer, seed=0)
    model.save_pretrained(str(tmp_path), max_shard_size="200KB")  # tf_model-0000N-of-0000M.h5 + an index
    shards = sorted(tmp_path.glob("tf_model-*.h5"))
    assert len(shards) > 1 and (tmp_path / "tf_model.h5.index.json").is_file()
    before = model_fingerprint(tmp_path)
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 0xFF  # one byte of the last shard: the index is unchanged
    shards[-1].write_bytes(bytes(data))
    assert model_fingerprint(tmp_path) != before
    shards[0].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        model_fingerprint(tmp_path)


def _saved_tiny(folder: Path, tokenizer, **config_changes) -> Path:
    model = new_model("tiny", tokenizer, seed=0)
    model.save_pretrained(str(folder))
    tokenizer.save(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_config_missing_a_field_is_an_error_naming_the_missing_weights(tmp_path: Path, tiny_tokenizer) -> None:
    # without n_layer, GPT2Config defaults to 12 layers: 10 of them would be random
    folder = _saved_tiny(tmp_path, tiny_tokenizer, n_layer=None)
    with pytest.raises(ModelLoadError, match=r"missing.*transformer/h_\._10/attn.*\(120 in all\)") as err:
        load_model(folder)
    assert "config.json" in str(err.value)


def test_config_with_fewer_layers_is_an_error_naming_the_unexpected_weights(tmp_path: Path, tiny_tokenizer) -> None:
    folder = _saved_tiny(tmp_path, tiny_tokenizer, n_layer=1)
    with pytest.raises(ModelLoadError, match=r"unexpected.*transformer/h_\._1/attn"):
        load_model(folder)


def test_model_vocabulary_larger_than_the_tokenizers_is_refused(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import GPT2Config, TFGPT2LMHeadModel

    tf = import_tf()
    cfg = GPT2Config(vocab_size=tiny_tokenizer.vocab_size + 100, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = TFGPT2LMHeadModel(cfg)
    model(tf.constant([[0]], dtype=tf.int32))
    model.save_pretrained(str(tmp_path))
    tiny_tokenizer.save(tmp_path)
    with pytest.raises(ModelLoadError, match=f"{tiny_tokenizer.vocab_size + 100}.*{tiny_tokenizer.vocab_size}"):
        load_model(tmp_path)


def test_saved_folder_opens_with_autotokenizer_and_hf_pipeline(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """save_model writes the HF tokenizer files and generation_config.json; kogpt2.json is unchanged."""
    from transformers import AutoTokenizer, pipeline

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    text = "그날 밤 그는 </s> 웃었다"
    assert hf(text)["input_ids"] == tiny_tokenizer.encode(text)  # no <s> added; </s> typed is text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (0, 1, 3, 5)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 3)
    info = read_model_info(tiny_model_dir)
    assert info["tokenizer"]["file"] == "tokenizer.spiece"
    assert info["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint
    assert info["model"]["fingerprint"] == model_fingerprint(tiny_model_dir)

    gen_pipe = pipeline("text-generation", model=str(tiny_model_dir), framework="tf", dtype=None)
    out = gen_pipe("그날 밤", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("그날 밤")


def test_folder_loads_with_or_without_the_hf_files(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "with")
    shutil.copytree(tiny_model_dir, tmp_path / "without")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (tmp_path / "without" / name).unlink()
    ids = tiny_tokenizer.encode("아침이 밝았다")
    logits = []
    for folder in (tmp_path / "with", tmp_path / "without"):
        model, tok = load_model(folder)
        assert tok.fingerprint == tiny_tokenizer.fingerprint and tok.path.name == "tokenizer.spiece"
        logits.append(_logits(model, ids))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


def test_save_model_replaces_hf_files_of_another_tokenizer(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer
) -> None:
    """Saving over a folder whose tokenizer.json came from elsewhere leaves the saved tokenizer in charge."""
    from kogpt2.model import save_model

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    model, _ = load_model(tiny_model_dir)
    save_model(model, tiny_tokenizer, tmp_path)
    _, tok = load_model(tmp_path)
    assert tok.fingerprint == tiny_tokenizer.fingerprint
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "Unigram"


def test_a_tokenizer_saved_under_another_name_stays_the_folders_tokenizer(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer
) -> None:
    """A v1-style gpt2_kor_tokenizer.spiece is saved as tokenizer.spiece; tokenizer_config.json names the copy."""
    from kogpt2.model import save_model
    from kogpt2.tokenizer import SentencePieceTokenizer, load_tokenizer

    shutil.copy(tiny_tokenizer.path, tmp_path / "gpt2_kor_tokenizer.spiece")
    v1_named = load_tokenizer(tmp_path / "gpt2_kor_tokenizer.spiece")
    model, _ = load_model(tiny_model_dir)
    save_model(model, v1_named, tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    assert isinstance(tok, SentencePieceTokenizer) and tok.path.name == "tokenizer.spiece"
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["kogpt2_converted_from"] == {"file": "tokenizer.spiece", "fingerprint": tiny_tokenizer.fingerprint}
