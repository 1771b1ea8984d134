"""Hugging Face tokenizer files: AutoTokenizer opens a model folder and encodes as load_tokenizer does."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA, make_sentences

from kogpt2.cli import main
from kogpt2.hf_export import HF_TOKENIZER_FILES, HFExportError, export_folder, write_hf_tokenizer
from kogpt2.tokenizer import SentencePieceTokenizer, load_tokenizer, train_tokenizer

REVIEWS = SHARED_DATA / "nsmc_reviews_a.txt.gz"

#: Text that must encode as our encode does: typed special and byte pieces are text, whitespace and
#: control characters as SentencePiece normalizes them, NFKC forms, characters no piece covers.
TRICKY = [
    "",
    " ",
    "</s>",
    "<s>그날</s>",
    "<pad><unk><usr><sys><unused0><unused97>",
    "<0x41><0xEA>",
    "a</s>b <</s>> <>",
    "  앞뒤   공백  ",
    "탭\t줄\n바꿈\r\n끝",
    "\u3000전각\u3000공백\u00a0",
    "zero\u200bwidth\ufeff",
    "\x00제어\x01문자\x7f",
    "ㅋㅋㅋ ㅎㅎ ㅠㅠ",
    "\u1100\u1161\u11a8 조합형 자모",
    "ＡＢＣ ①② ﬁ ㈜ ½",
    "é e\u0301",
    "漢字 한자 \U0001f600\U0001f600 ♥♥♥",
    "▁이미 ▁가 있는 글",
    "!!!!!!!!!!!!!!!! ................ ~~~~",
    "그날 밤 그는 웃었다.",
]


def _auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _differing(ours, hf, lines: list[str]) -> list[tuple[str, list[int], list[int]]]:
    theirs = hf(lines, add_special_tokens=False)["input_ids"]
    mine = ours.encode_batch(lines)
    return [(line, a, b) for line, a, b in zip(lines, mine, theirs, strict=True) if a != b]


def _reviews(n: int) -> list[str]:
    if not REVIEWS.is_file():
        return []
    with gzip.open(REVIEWS, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for _, line in zip(range(n), f, strict=False)]


def _folder_with(tmp_path: Path, spiece: Path, name: str = "tokenizer.spiece") -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(spiece, folder / name)
    return folder


@pytest.mark.shared_data
def test_v1_tokenizer_autotokenizer_encodes_every_line_as_ours(
    tmp_path: Path, v1_tokenizer_path: Path, novel_path: Path
) -> None:
    """The real KoGPT2 v1 tokenizer (SentencePiece BPE, no byte fallback): the novel and 20,000 reviews."""
    folder = _folder_with(tmp_path, v1_tokenizer_path, "gpt2_kor_tokenizer.spiece")
    export_folder(folder)
    ours, hf = load_tokenizer(folder), _auto(folder)
    assert isinstance(ours, SentencePieceTokenizer)  # the .spiece stays the folder's tokenizer
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (0, 1, 3, 5)
    assert len(hf) == ours.vocab_size == 50000
    assert hf("이때문에 일부 전문가들은")["input_ids"] == [4499, 2592, 847, 4558]
    lines = novel_path.read_text(encoding="utf-8").splitlines() + _reviews(20_000) + TRICKY
    assert len(lines) > 284 + len(TRICKY) or not REVIEWS.is_file()
    assert _differing(ours, hf, lines) == []
    typed = hf("</s><usr><unused0><unk>", add_special_tokens=False)["input_ids"]
    assert not set(typed) & (ours.special_ids | {ours.unk_id})


def test_trained_tokenizer_autotokenizer_encodes_every_line_as_ours(tmp_path: Path, tiny_corpus: Path) -> None:
    """A tokenizer trained here (unigram, byte fallback): most syllables of real text become bytes."""
    tok = train_tokenizer([tiny_corpus], 400, tmp_path / "tok")
    folder = _folder_with(tmp_path, tok.path)
    write_hf_tokenizer(tok, folder)
    ours, hf = load_tokenizer(folder), _auto(folder)
    lines = make_sentences(300) + TRICKY + _reviews(20_000)
    novel = SHARED_DATA / "finetune_data_unsu_joeun_nal.txt"
    if novel.is_file():
        lines += novel.read_text(encoding="utf-8").splitlines()
    assert _differing(ours, hf, lines) == []
    assert hf("<0xEA><s>", add_special_tokens=False)["input_ids"] == ours.encode("<0xEA><s>")
    assert hf.decode(hf("그날 밤 ㅋㅋ 漢")["input_ids"]) == ours.decode(ours.encode("그날 밤 ㅋㅋ 漢"))


def test_trained_bpe_tokenizer_autotokenizer_encodes_every_line_as_ours(tmp_path: Path, tiny_corpus: Path) -> None:
    tok = train_tokenizer([tiny_corpus], 400, tmp_path / "tok", model_type="bpe")
    folder = _folder_with(tmp_path, tok.path)
    write_hf_tokenizer(tok, folder)
    lines = make_sentences(300) + TRICKY + _reviews(5_000)
    assert _differing(load_tokenizer(folder), _auto(folder), lines) == []


def test_unigram_ties_in_repeated_runs_differ_only_in_order(tmp_path: Path) -> None:
    """The one documented difference: where two segmentations of a unigram model score exactly the
    same (runs of one repeated unit), SentencePiece's float32 sums and tokenizers' float64 sums can
    pick different orders of the same pieces. The ids as a multiset and the decoded text agree."""
    corpus = tmp_path / "runs.txt"
    runs = [f"{s} {'.' * (3 + i % 17)} {'ㅋ' * (2 + i % 9)}" for i, s in enumerate(make_sentences(300))]
    corpus.write_text("\n".join(runs) + "\n", encoding="utf-8")
    tok = train_tokenizer([corpus], 600, tmp_path / "tok")
    folder = _folder_with(tmp_path, tok.path)
    write_hf_tokenizer(tok, folder)
    ours, hf = load_tokenizer(folder), _auto(folder)
    lines = [u * n for u in (".", "ㅋ", "ㅋㅋ.") for n in range(1, 80)] + runs
    for line, a, b in _differing(ours, hf, lines):
        assert Counter(a) == Counter(b), line
        assert hf.decode(b) == ours.decode(a), line


def test_export_command_adds_the_files_idempotently(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tf_model.h5", "tokenizer.spiece"):
        shutil.copy(tiny_model_dir / name, folder / name)
    spiece = (folder / "tokenizer.spiece").read_bytes()

    assert main(["export", str(folder)]) == 0
    assert str(folder / "tokenizer.json") in capsys.readouterr().out
    digests = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in HF_TOKENIZER_FILES}
    assert main(["export", str(folder)]) == 0
    assert digests == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in HF_TOKENIZER_FILES}
    assert (folder / "tokenizer.spiece").read_bytes() == spiece
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind

    from kogpt2.model import load_model

    _, tok = load_model(folder)
    assert isinstance(tok, SentencePieceTokenizer) and tok.fingerprint == hashlib.sha256(spiece).hexdigest()
    hf = _auto(folder)
    assert hf.model_max_length == 256  # the tiny preset's n_positions
    assert hf("그날 밤 <s>", add_special_tokens=False)["input_ids"] == tok.encode("그날 밤 <s>")


def test_export_command_refuses_bad_input_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kogpt2 export: error:" in err and "holds no tokenizer" in err and "nothing to export" in err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tokenizer_json_folder_gets_its_configs_and_keeps_its_file(tmp_path: Path, tiny_corpus: Path) -> None:
    """A KoGPT2-v2-style folder (tokenizer.json, bos = eos = </s>): only the two config files are new."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf_tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>"]
    hf_tok.train([str(tiny_corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    folder = tmp_path / "v2"
    folder.mkdir()
    hf_tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text('{"bos_token": "</s>", "eos_token": "</s>"}')
    before = (folder / "tokenizer.json").read_bytes()

    written = export_folder(folder)
    assert [p.name for p in written] == ["tokenizer_config.json", "special_tokens_map.json"]
    assert (folder / "tokenizer.json").read_bytes() == before
    ours, hf = load_tokenizer(folder), _auto(folder)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 1, 3)


def test_unconvertible_model_is_an_error_naming_it() -> None:
    with pytest.raises(HFExportError, match="not a SentencePiece model"):
        from kogpt2.hf_export import spm_to_hf

        spm_to_hf(b"\x0a\x05hello")
