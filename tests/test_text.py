"""Pure text functions of preprocessing: decode, normalize, split sentences, filter."""

from __future__ import annotations

import codecs

import pytest
from preprocess_helpers import unescape_bytes

from kogpt2.text import (
    check_encoding,
    decode_line,
    decode_lines,
    escape_bytes,
    filter_reason,
    normalize_text,
    normalize_texts,
    split_sentences,
)


@pytest.mark.parametrize(
    ("name", "canonical"), [("utf-8", "utf-8"), ("UTF8", "utf-8"), ("cp949", "cp949"), ("euc-kr", "euc_kr")]
)
def test_check_encoding_accepts_korean_encodings(name: str, canonical: str) -> None:
    assert check_encoding(name) == canonical


@pytest.mark.parametrize(
    ("name", "why"), [("klingon-8", "unknown"), ("utf-16", "ASCII-compatible"), ("base64", "not a text")]
)
def test_check_encoding_refuses_with_the_name(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        check_encoding(name)
    assert name in str(err.value)


@pytest.mark.parametrize(
    "name", ["iso2022_kr", "ISO-2022-KR", "csiso2022kr", "iso2022_jp_2", "utf-7", "UTF7", "hz", "hz-gb-2312"]
)
def test_check_encoding_refuses_stateful_encodings(name: str) -> None:
    with pytest.raises(ValueError, match="stateful encoding") as err:
        check_encoding(name)
    assert name in str(err.value) and "UTF-8" in str(err.value)


def test_iso2022_kr_lines_do_not_decode_one_by_one() -> None:
    # why it is refused: the shift-in declaration comes once per file, so a later line read alone is garbage
    second = "첫 줄\n둘째 줄\n".encode("iso2022_kr").split(b"\n")[1]
    assert second.decode("iso2022_kr", "replace") != "둘째 줄"


def test_decode_line_drops_a_bom_only_at_file_start() -> None:
    raw = codecs.BOM_UTF8 + "그는 웃었다.".encode()
    assert decode_line(raw, "utf-8", file_start=True) == "그는 웃었다."
    assert decode_line(raw, "utf-8") == "\ufeff그는 웃었다."  # mid-file: kept, the normalizer removes it
    assert normalize_text(decode_line(raw, "utf-8")) == "그는 웃었다."


def test_decode_line_cp949_and_errors() -> None:
    text = "운수 좋은 날, 김첨지는 웃었다."
    assert decode_line(text.encode("cp949"), "cp949") == text
    with pytest.raises(UnicodeDecodeError):
        decode_line(text.encode("cp949"), "utf-8")
    with pytest.raises(UnicodeDecodeError):
        decode_line(b"\x80\x80 bad", "cp949")


def test_escape_bytes_is_readable_and_reversible() -> None:
    raw = b"ab \\ \xff\xfe\x00\n\xea\xb0"
    escaped = escape_bytes(raw)
    assert escaped == "ab \\x5c \\xff\\xfe\\x00\\x0a\\xea\\xb0"
    assert escaped.isascii()
    assert unescape_bytes(escaped) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  그는\t웃었다.  ", "그는 웃었다."),  # whitespace collapsed and stripped
        ("그는\u00a0\u3000웃었다.", "그는 웃었다."),  # NBSP and ideographic space
        ("그\u200b는 웃\u200d었\ufeff다.", "그는 웃었다."),  # zero-width characters and BOM
        ("그는\x00\x07 웃었다.\x1b", "그는 웃었다."),  # control characters
        ("ＡＢＣ１２３！", "ABC123!"),  # NFKC: fullwidth forms
        ("ｶﾀｶﾅ", "カタカナ"),  # NFKC: halfwidth katakana
        ("\u1100\u1161\u11a8", "각"),  # NFKC composes conjoining jamo
        ("line\r\nbreak\u2028here", "line break here"),
        ("", ""),
        (" \t\u200b ", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("그는 웃었다. 그녀는 울었다! 왜일까? 몰라.", ["그는 웃었다.", "그녀는 울었다!", "왜일까?", "몰라."]),
        ("정말?! 응.", ["정말?!", "응."]),
        ('그는 "왜? 어서 가." 하고 물었다. 그리고 떠났다.', ['그는 "왜? 어서 가." 하고 물었다.', "그리고 떠났다."]),
        ("“가자.” 그가 말했다.", ["“가자.”", "그가 말했다."]),
        ("“가자.”라고 그가 말했다. 끝.", ["“가자.”라고 그가 말했다.", "끝."]),
        ("“가자.” 라며 웃었다.", ["“가자.” 라며 웃었다."]),
        ("그래서... 그는 떠났다. 끝.", ["그래서... 그는 떠났다.", "끝."]),
        ("원주율은 3.14이다. 맞다.", ["원주율은 3.14이다.", "맞다."]),
        ("Dr. Kim은 J. K. 씨를 만났다. 그리고 갔다.", ["Dr. Kim은 J. K. 씨를 만났다.", "그리고 갔다."]),
        ("괄호(예. 이것) 안이다. 다음.", ["괄호(예. 이것) 안이다.", "다음."]),
        ('"열린 따옴표. 다음 문장.', ['"열린 따옴표.', "다음 문장."]),  # unbalanced: nesting ignored
        ("마침표가 없는 문장", ["마침표가 없는 문장"]),
        ("그때에 김첨지는 대수롭지 않은듯이,", ["그때에 김첨지는 대수롭지 않은듯이,"]),
        ("", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
    for sentence in expected:
        assert split_sentences(sentence) == [sentence]


def test_split_sentences_loses_no_text() -> None:
    text = '이때 그는 말했다. "무엇을? 왜!" 하고. 그날 밤... 비가 왔다? 마침내 끝났다.'
    assert " ".join(split_sentences(text)) == text


@pytest.mark.parametrize(
    ("text", "min_chars", "reason"),
    [("", 0, "empty"), ("", 5, "empty"), ("가나", 3, "too_short"), ("가나다", 3, None), ("가", 0, None)],
)
def test_filter_reason(text: str, min_chars: int, reason: str | None) -> None:
    assert filter_reason(text, min_chars) == reason


@pytest.mark.parametrize("encoding", ["utf-8", "cp949", "utf-8-sig"])
def test_decode_lines_gives_decode_line_of_each_line(encoding: str) -> None:
    good = ["그는 웃었다.", "", "ㅋㅋ 재밌네요", "abc"]
    raws = [codecs.BOM_UTF8 + good[0].encode(encoding), *(t.encode(encoding) for t in good[1:])]
    assert decode_lines(raws, encoding, file_start=True) == (
        [decode_line(r, encoding, file_start=i == 0) for i, r in enumerate(raws)],
        {},
    )
    bad = [raws[2], b"\xff\xfe broken", raws[3], b"\xb0"]  # a lone lead byte at a line end
    texts, errors = decode_lines(bad, encoding)
    assert texts == ["ㅋㅋ 재밌네요", "", "abc", ""] and sorted(errors) == [1, 3]
    assert all(isinstance(e, UnicodeDecodeError) for e in errors.values())
    assert decode_lines([], encoding) == ([], {})


def test_decode_lines_keeps_a_bom_inside_the_file() -> None:
    raws = [codecs.BOM_UTF8 + b"a", codecs.BOM_UTF8 + b"b"]
    assert decode_lines(raws, "utf-8", file_start=True)[0] == ["a", "\ufeffb"]
    assert decode_lines(raws, "utf-8")[0] == ["\ufeffa", "\ufeffb"]


def test_removed_characters_are_found_in_the_planes_scanned() -> None:
    from kogpt2 import text

    assert text._removed_chars(range(17)) == text._removed_chars(text._CONTROL_PLANES)
    assert normalize_text("a\u200bb\U000e0001c\x07d") == "abcd"


def test_normalize_texts_is_normalize_text_of_each() -> None:
    texts = ["  그는\u3000웃었다.\u200b ", "ＡＢＣ１２３", "", "\x07\t", "ᄏᄏ ㅋㅋ", "a\u00a0b"]
    assert normalize_texts(texts) == [normalize_text(t) for t in texts]
