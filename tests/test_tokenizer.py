"""Tokenizer loading, deterministic encoding, decoding and training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kogpt2.tokenizer import (
    HFJsonTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    restore_compat_jamo,
    train_tokenizer,
)


def test_restore_compat_jamo_maps_conjoining_to_compatibility() -> None:
    assert restore_compat_jamo("\u110f\u110f 웃겼다") == "ㅋㅋ 웃겼다"
    assert restore_compat_jamo("\u1100\u1161") == "ㄱㅏ"  # standalone choseong + jungseong
    assert restore_compat_jamo("한국어") == "한국어"  # syllables are untouched


@pytest.mark.shared_data
def test_v1_tokenizer_facts(v1_tokenizer_path: Path) -> None:
    tok = load_tokenizer(v1_tokenizer_path)
    ids = tok.encode("이때문에 일부 전문가들은")
    assert ids == [4499, 2592, 847, 4558]
    assert tok.decode(ids) == "이때문에 일부 전문가들은"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 3, 5)
    assert tok.vocab_size == 50000
    # specials are dropped and ㅋㅋ survives NFKC + decode
    assert tok.decode([tok.bos_id, *tok.encode("ㅋㅋ 웃겼다"), tok.eos_id, tok.pad_id]) == "ㅋㅋ 웃겼다"
    # user-defined specials (<usr>=2, <sys>=4, <unused0>=6) are dropped too
    assert tok.decode([2, *ids, 4, 6]) == "이때문에 일부 전문가들은"


@pytest.mark.shared_data
def test_v1_encoding_is_deterministic_not_sampled(v1_tokenizer_path: Path) -> None:
    tok = load_tokenizer(v1_tokenizer_path)
    text = "그날 김첨지는 오래간만에 닷새 만에 돈을 벌었다"
    first = tok.encode(text)
    assert all(tok.encode(text) == first for _ in range(50))
    # a sampled encoding degrades Korean to near single characters; ours keeps words whole
    assert len(first) < 0.75 * len(text.replace(" ", ""))
    assert tok.encode_batch([text, "이때"]) == [first, tok.encode("이때")]


@pytest.mark.shared_data
def test_fullwidth_text_is_nfkc_normalized(v1_tokenizer_path: Path) -> None:
    tok = load_tokenizer(v1_tokenizer_path)
    assert tok.encode("ＡＢＣ 이때") == tok.encode("ABC 이때")


@pytest.mark.shared_data
def test_v1_folder_layout_finds_spiece(tmp_path: Path, v1_tokenizer_path: Path) -> None:
    shutil.copy(v1_tokenizer_path, tmp_path / "gpt2_kor_tokenizer.spiece")
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.path.name == "gpt2_kor_tokenizer.spiece"
    assert tok.fingerprint == load_tokenizer(v1_tokenizer_path).fingerprint


def test_trained_tokenizer_has_kogpt2_special_ids(tiny_tokenizer, tiny_corpus: Path) -> None:
    tok = tiny_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 3, 5)
    assert [tok.id_to_piece(i) for i in range(6)] == ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>"]
    assert tok.decode([2, *tok.encode("그날 밤"), 4]) == "그날 밤"
    line = tiny_corpus.read_text(encoding="utf-8").splitlines()[7]
    assert tok.decode(tok.encode(line)) == line


def test_trained_tokenizer_byte_fallback_never_unk(tiny_tokenizer) -> None:
    text = "漢字와 쀍 같은 드문 글자"  # none of these syllables are in the training corpus
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.unk_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_train_tokenizer_rejects_bad_arguments(tmp_path: Path, tiny_corpus: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([tiny_corpus], 10, tmp_path)
    with pytest.raises(ValueError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 400, tmp_path)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.spiece")
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.spiece"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(bad)


def _hf_tokenizer_folder(folder: Path, corpus: Path) -> Path:
    """A KoGPT2-v2-style HF folder: tokenizer.json with bos = eos = </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
    )
    tok.train([str(corpus)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    )
    return folder


def test_hf_tokenizer_json_folder(tmp_path: Path, tiny_corpus: Path) -> None:
    folder = _hf_tokenizer_folder(tmp_path, tiny_corpus)
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFJsonTokenizer)
    assert tok.bos_id == tok.eos_id == 1
    assert (tok.pad_id, tok.unk_id) == (3, 5)
    ids = tok.encode("그는 시장에서 웃었다")
    assert ids and tok.decode([tok.bos_id, *ids, tok.eos_id]) == "그는 시장에서 웃었다"
    assert len(tok.fingerprint) == 64


def test_converted_tokenizer_json_defers_to_its_sentencepiece_file(
    tmp_path: Path, tiny_corpus: Path, tiny_tokenizer
) -> None:
    """A tokenizer.json that tokenizer_config.json marks as converted from a .spiece (what
    save_model and `kogpt2 export` write) does not replace it: the .spiece and its fingerprint
    stay the folder's tokenizer. An HF folder's own tokenizer.json still wins."""
    folder = _hf_tokenizer_folder(tmp_path, tiny_corpus)
    shutil.copy(tiny_tokenizer.path, folder / "tokenizer.spiece")
    assert isinstance(load_tokenizer(folder), HFJsonTokenizer)  # no marker: tokenizer.json wins, as before
    marker = {"kogpt2_converted_from": {"file": "tokenizer.spiece", "fingerprint": tiny_tokenizer.fingerprint}}
    (folder / "tokenizer_config.json").write_text(json.dumps(marker))
    tok = load_tokenizer(folder)
    assert isinstance(tok, SentencePieceTokenizer) and tok.fingerprint == tiny_tokenizer.fingerprint
    (folder / "tokenizer.spiece").unlink()  # the named file is gone: tokenizer.json is what there is
    assert isinstance(load_tokenizer(folder), HFJsonTokenizer)


def test_tokenizer_pickles_by_path(tiny_tokenizer) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.encode("그날 밤") == tiny_tokenizer.encode("그날 밤")
    assert clone.fingerprint == tiny_tokenizer.fingerprint


def test_cli_train_tokenizer(tmp_path: Path, tiny_corpus: Path) -> None:
    from kogpt2.cli import main

    assert main(["train-tokenizer", "--input", str(tiny_corpus), "--vocab-size", "350", "--output", str(tmp_path)]) == 0
    tok = load_tokenizer(tmp_path / "tokenizer.spiece")
    assert tok.pad_id == 3
    assert main(["train-tokenizer", "--input", str(tmp_path / "none*.txt"), "--output", str(tmp_path)]) == 2


# --- text never produces special ids --------------------------------

#: Special-piece strings as they appear typed in corpora (strike-through markup, chat logs, templates).
TYPED_SPECIALS = [
    "<usr> 안녕 <sys>",
    "<unused0>",
    "a </s> b <pad> a",
    "취소선 <s>가격</s> 할인",
    "<unk> 와 <mask> 그리고 <s><s></s>",
    "그는<usr>시장에서<sys>웃었다",
]


def _assert_plain(tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids, text
    assert not set(ids) & tok.special_ids, (text, ids, [tok.id_to_piece(i) for i in ids])
    assert tok.decode(ids) == text  # the typed markup comes back as the text it was


@pytest.mark.parametrize("text", TYPED_SPECIALS)
def test_typed_special_pieces_encode_as_plain_text_trained(tiny_tokenizer, text: str) -> None:
    assert {0, 1, 2, 3, 4} <= tiny_tokenizer.special_ids  # <usr>, <sys> count as special
    _assert_plain(tiny_tokenizer, text)
    assert tiny_tokenizer.encode_batch([text, "그날 밤"]) == [
        tiny_tokenizer.encode(text),
        tiny_tokenizer.encode("그날 밤"),
    ]
    # ordinary text encodes as before: the guard changes nothing else
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("그날 밤 시장에서")) == "그날 밤 시장에서"


@pytest.mark.shared_data
def test_typed_special_pieces_encode_as_plain_text_v1(v1_tokenizer_path: Path) -> None:
    tok = load_tokenizer(v1_tokenizer_path)
    assert 2 not in tok.encode("<usr> 안녕 <sys>") and 4 not in tok.encode("<usr> 안녕 <sys>")
    assert 6 not in tok.encode("<unused0>")
    for text in TYPED_SPECIALS:
        _assert_plain(tok, text)
    assert tok.encode("이때문에 일부 전문가들은") == [4499, 2592, 847, 4558]  # unchanged for plain text


def test_typed_special_pieces_encode_as_plain_text_hf(tmp_path: Path, tiny_corpus: Path) -> None:
    tok = load_tokenizer(_hf_tokenizer_folder(tmp_path, tiny_corpus))
    assert {1, 2, 3, 4, 6} <= tok.special_ids  # every added special token, <usr>/<sys>/<mask> too
    ids = tok.encode("a </s> b <pad> a")
    assert 1 not in ids and 3 not in ids
    for text in TYPED_SPECIALS:
        assert not set(tok.encode(text)) & tok.special_ids, text
    assert tok.decode(tok.encode("그는 시장에서 웃었다")) == "그는 시장에서 웃었다"
