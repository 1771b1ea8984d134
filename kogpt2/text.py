"""Pure text functions of corpus preprocessing: decode, normalize, split sentences, filter.

Everything here is ``bytes -> str`` or ``str -> str`` with no I/O, so the Beam pipeline
(:mod:`pipelines.preprocess`), the benchmark loop and the tests share one definition.
"""

from __future__ import annotations

import codecs
import re
import sys
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

from kogpt2.tokenizer import normalize

# Sentence ends after NFKC (which maps "？！．" to "?!." and "…" to "...").
_TERMINALS = frozenset(".?!。")
_OPEN_TO_CLOSE = {
    "“": "”",
    "‘": "’",
    "「": "」",
    "『": "』",
    "(": ")",
    "[": "]",
    "{": "}",
    "《": "》",
    "〈": "〉",
    "«": "»",
}
_CLOSERS = frozenset(_OPEN_TO_CLOSE.values()) | {'"', "'"}
# A quotation closed after a sentence end is still one sentence when a quotative ending
# follows it: "가자." 하고 말했다 / "가자." 라며 웃었다.
_QUOTATIVES = (
    "하고",
    "라고",
    "라며",
    "하며",
    "하면서",
    "라는",
    "이라고",
    "이라며",
    "하는",
    "하니",
    "하자",
    "고 ",
    "며 ",
)
# Latin abbreviations that end in a period without ending a sentence.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "no", "vol", "p", "pp"})


#: Stateful encodings (canonical codec names or prefixes): a shift sequence changes the meaning of
#: the bytes after it, possibly lines later, so their lines cannot be decoded one by one.
STATEFUL_ENCODINGS = ("iso2022", "hz", "utf-7")


def is_stateful_encoding(codec_name: str) -> bool:
    """Whether a canonical codec name (``codecs.lookup(name).name``) is a stateful encoding."""
    return codec_name.replace("-", "_").startswith(tuple(e.replace("-", "_") for e in STATEFUL_ENCODINGS))


def check_encoding(name: str) -> str:
    """Return the canonical codec name of a text encoding that can be read line by line.

    Args:
        name: an encoding name (``utf-8``, ``cp949``, ``euc-kr``, ...).

    Returns:
        The codec's canonical name (``utf-8``, ``cp949``, ``euc_kr``).

    Raises:
        ValueError: unknown name, not a text encoding, one where ``\\n`` is not the byte
            ``0x0a`` (UTF-16/32: lines cannot be split on bytes), or a stateful encoding
            (ISO-2022-*, HZ, UTF-7: a line's bytes mean something else without the shift
            sequences of the lines before it).
    """
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(f"encoding={name!r}: unknown encoding (try utf-8, cp949 or euc-kr)") from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"encoding={name!r}: not a text encoding")
    if is_stateful_encoding(info.name):
        raise ValueError(
            f"encoding={name!r}: {info.name} is a stateful encoding (shift sequences carry over between "
            "lines), so lines cannot be decoded one by one; re-encode the corpus as UTF-8 (or use a "
            "stateless encoding such as cp949, euc-kr)"
        )
    if "\n".encode(info.name) != b"\n" or "a".encode(info.name) != b"a":
        raise ValueError(
            f"encoding={name!r}: not ASCII-compatible, lines cannot be split on b'\\n' (re-encode as UTF-8)"
        )
    return info.name


def decode_line(raw: bytes, encoding: str, *, file_start: bool = False) -> str:
    """Decode one line's bytes (without its line ending).

    Args:
        raw: the line's bytes.
        encoding: codec name (see :func:`check_encoding`).
        file_start: the line is the first of its file: a UTF-8 byte-order mark is dropped.

    Returns:
        The decoded text.

    Raises:
        UnicodeDecodeError: the bytes are not valid in ``encoding``.
    """
    if file_start and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    return raw.decode(encoding)


def decode_lines(
    raws: Sequence[bytes], encoding: str, *, file_start: bool = False
) -> tuple[list[str], dict[int, UnicodeDecodeError]]:
    """:func:`decode_line` over many lines, decoding them in one call when they all decode.

    Args:
        raws: lines' bytes (without line endings, so without ``\\n``).
        encoding: codec name (see :func:`check_encoding`).
        file_start: ``raws[0]`` is the first line of its file (a UTF-8 BOM is dropped).

    Returns:
        ``(texts, errors)``: one text per line (``""`` for a line that does not decode), and the
        decoding error of each such line by its index.
    """
    if file_start and raws and raws[0].startswith(codecs.BOM_UTF8):
        raws = [raws[0][len(codecs.BOM_UTF8) :], *raws[1:]]
    if raws and "sig" not in encoding:  # a -sig codec drops a BOM per call: decode line by line
        try:
            texts = b"\n".join(raws).decode(encoding).split("\n")
        except UnicodeDecodeError:
            pass
        else:
            if len(texts) == len(raws):  # no multi-byte sequence took a line end in
                return texts, {}
    texts, errors = [], {}
    for i, raw in enumerate(raws):
        try:
            texts.append(raw.decode(encoding))
        except UnicodeDecodeError as exc:
            texts.append("")
            errors[i] = exc
    return texts, errors


def escape_bytes(raw: bytes) -> str:
    """Printable ASCII (except ``\\``) as is, every other byte as ``\\xNN``: unambiguous and reversible."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


@lru_cache(maxsize=1)
def _removal_pattern() -> re.Pattern[str]:
    """Control characters that are not whitespace (Cc) and format characters (Cf: zero-width, BOM, bidi marks)."""
    return re.compile("[" + re.escape("".join(_removed_chars(_CONTROL_PLANES))) + "]")


#: Unicode planes holding every Cc and Cf character (BMP, SMP, SIP, TIP, SSP): planes 4-13 are
#: unassigned and 15-16 private use. Scanning these alone makes the pattern 3x faster to build
#: in each worker; a test checks it against a scan of every code point.
_CONTROL_PLANES = (0, 1, 2, 3, 14)


def _removed_chars(planes: Sequence[int]) -> list[str]:
    """The Cc (not whitespace) and Cf characters of the given Unicode planes."""
    chars = []
    for plane in planes:
        for cp in range(plane << 16, min((plane + 1) << 16, sys.maxunicode + 1)):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if cat == "Cf" or (cat == "Cc" and not ch.isspace()):
                chars.append(ch)
    return chars


def normalize_text(text: str) -> str:
    """Normalize a line as the tokenizer expects, and clean it.

    Removes control characters (Cc, except whitespace) and format characters (Cf: zero-width
    space/joiners, BOM, soft hyphen, bidi marks), applies NFKC (:func:`kogpt2.tokenizer.normalize`),
    and collapses every run of whitespace (tabs, NBSP, ideographic space, ...) to one space,
    stripped at both ends.

    Args:
        text: decoded text.

    Returns:
        The normalized text (possibly empty).
    """
    if not text.isprintable():  # fast path: printable text holds no Cc/Cf character
        text = _removal_pattern().sub("", text)
    return " ".join(normalize(text).split())


def normalize_texts(texts: Sequence[str]) -> list[str]:
    """:func:`normalize_text` of each text (the same results, without a function call per text)."""
    pattern, nfkc = _removal_pattern(), unicodedata.normalize
    return [" ".join(nfkc("NFKC", t if t.isprintable() else pattern.sub("", t)).split()) for t in texts]


def _quote_depths(text: str, *, balanced_only: bool) -> list[int] | None:
    """Nesting depth of quotes/brackets after each character; None when unbalanced and balanced_only."""
    depths = []
    stack: list[str] = []
    for ch in text:
        if ch == '"':
            if stack and stack[-1] == '"':
                stack.pop()
            else:
                stack.append('"')
        elif ch in _OPEN_TO_CLOSE:
            stack.append(_OPEN_TO_CLOSE[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        depths.append(len(stack))
    if balanced_only and stack:
        return None
    return depths


def _is_abbreviation(text: str, dot: int) -> bool:
    """The period at ``dot`` ends a Latin abbreviation or initial (``Dr.``, ``J.``), not a sentence."""
    start = dot
    while start > 0 and (text[start - 1].isascii() and (text[start - 1].isalpha() or text[start - 1] == ".")):
        start -= 1
    word = text[start:dot].lower()
    if not word:
        return False
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split normalized paragraph text into sentences, Korean-aware.

    A sentence ends at ``.``, ``?``, ``!`` or ``。`` (runs such as ``?!`` included, with any
    closing quotes or brackets after them) followed by a space or the end of the text. It does
    not end:

    - inside quotes or brackets (``그는 "왜? 어서 가." 하고 물었다`` stays whole),
    - at a closing quote followed by a quotative ending (``하고``, ``라고``, ``라며``, ...),
    - at an ellipsis (``...``, NFKC's form of ``…``), common mid-sentence in Korean prose,
    - after a Latin abbreviation or initial (``Dr.``, ``J. K.``) or between digits (``3.14``).

    Unbalanced quotes are ignored for nesting. Splitting an already split sentence returns it.

    Args:
        text: one normalized line (see :func:`normalize_text`).

    Returns:
        The sentences, stripped, none empty; ``[]`` for empty text.
    """
    if not text.strip():
        return []
    depths = _quote_depths(text, balanced_only=True) or [0] * len(text)
    sentences = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        if text[i] not in _TERMINALS:
            i += 1
            continue
        j = i
        while j < n and text[j] in _TERMINALS:
            j += 1
        run = text[i:j]
        while j < n and text[j] in _CLOSERS:
            j += 1
        closed_quote = j > i + len(run)
        at_break = j == n or text[j].isspace()
        ok = at_break and depths[j - 1] == 0
        if ok and set(run) == {"."} and len(run) >= 2:
            ok = False  # ellipsis
        if ok and run == "." and _is_abbreviation(text, i):
            ok = False
        if ok and closed_quote and j < n and text[j:].lstrip().startswith(_QUOTATIVES):
            ok = False
        if ok:
            piece = text[start:j].strip()
            if piece:
                sentences.append(piece)
            start = j
        i = j
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def filter_reason(text: str, min_chars: int) -> str | None:
    """Why a normalized text is filtered out, or None to keep it.

    Args:
        text: normalized text.
        min_chars: shortest text kept, in characters.

    Returns:
        ``"empty"``, ``"too_short"`` or None.
    """
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    return None
