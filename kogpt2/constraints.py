"""Token constraints: which tokens a row may draw next (numpy; :mod:`kogpt2.sampling` applies them).

- **Suppressed tokens**: ids that are never generated. By default every special piece but
  ``</s>``: ``<s>``, ``<pad>``, ``<unk>`` and user-defined ones (``<usr>``, ``<sys>``,
  ``<unusedN>``). They vanish when decoded, so sampling them made a row's ``new_tokens``
  and its text disagree (transformers calls this ``suppress_tokens``).
- **Valid, printable UTF-8**: with byte fallback (pieces ``<0x00>`` .. ``<0xFF>``) a model can
  emit bytes that do not form UTF-8, which decode to U+FFFD, or that form control, private-use
  or unassigned characters. :class:`Utf8Guard` tracks, per row, the bytes of the character
  being spelled and allows only the bytes that can still complete a valid (RFC 3629: no
  overlong forms, no surrogates, nothing past U+10FFFF) and printable character. A character
  still open when a row ends is dropped (and counted). Ordinary pieces whose text holds an
  unprintable character are never drawn (:func:`unprintable_pieces`).
- **min_new_tokens**: ``</s>`` is banned until a row has that many new tokens.

Printable: a character outside the Unicode categories Cc (control; tab and newline are
allowed), Co (private use), Cn (unassigned, in Python's Unicode database) and Cs (surrogate).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Co", "Cn", "Cs"})
PRINTABLE_CONTROLS = frozenset("\t\n")
#: Code points spelled with 1, 2, 3, 4 bytes (shorter forms of them are overlong).
_LENGTH_RANGES = {1: (0, 0x7F), 2: (0x80, 0x7FF), 3: (0x800, 0xFFFF), 4: (0x10000, 0x10FFFF)}
_OTHER = 256  # the column of pieces that are not bytes


def is_printable(char: str) -> bool:
    """Whether one character may be generated (see the module docstring)."""
    return char in PRINTABLE_CONTROLS or unicodedata.category(char) not in UNPRINTABLE_CATEGORIES


def unprintable_pieces(texts: Iterable[tuple[int, str]]) -> list[int]:
    """Ids of the pieces whose decoded text holds a character that is not printable.

    Args:
        texts: ``(id, decoded text)`` of the ordinary pieces (not byte or special pieces).
    """
    return [i for i, text in texts if not all(is_printable(c) for c in text)]


def byte_piece_ids(pieces: Iterable[tuple[int, str]]) -> np.ndarray:
    """``(256,)`` id of the piece ``<0xNN>`` for each byte value, -1 where the vocabulary has none."""
    table = np.full(256, -1, dtype=np.int64)
    for token_id, piece in pieces:
        m = _BYTE_PIECE.match(piece)
        if m:
            table[int(m.group(1), 16)] = token_id
    return table


def byte_of_tokens(byte_ids: np.ndarray, vocab: int) -> np.ndarray:
    """``(vocab,)`` int32: the byte value of each byte piece, 256 for every other token."""
    out = np.full(vocab, _OTHER, dtype=np.int32)
    present = np.flatnonzero((byte_ids >= 0) & (byte_ids < vocab))
    out[byte_ids[present]] = present
    return out


@functools.cache
def _code_point_prefix_sums(printable: bool) -> np.ndarray:
    """``(0x110001,)`` counts of allowed code points below each one (surrogates never allowed)."""
    if printable:
        ok = np.fromiter((is_printable(chr(c)) for c in range(0x110000)), dtype=bool, count=0x110000)
    else:
        ok = np.ones(0x110000, dtype=bool)
        ok[0xD800:0xE000] = False
    return np.concatenate([[0], np.cumsum(ok, dtype=np.int64)])


def _sequence_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence a lead byte starts (0: not a lead byte)."""
    if lead < 0x80:
        return 1
    for n, (lo, hi) in ((2, (0xC0, 0xDF)), (3, (0xE0, 0xEF)), (4, (0xF0, 0xF7))):
        if lo <= lead <= hi:
            return n
    return 0


def _code_point_range(prefix: tuple[int, ...], n: int) -> tuple[int, int]:
    """Lowest and highest code point an ``n``-byte sequence starting with ``prefix`` can spell."""
    lo = hi = prefix[0] & (0x7F, 0x1F, 0x0F, 0x07)[n - 1]
    for i in range(1, n):
        low6, high6 = (prefix[i] & 0x3F,) * 2 if i < len(prefix) else (0x00, 0x3F)
        lo, hi = lo << 6 | low6, hi << 6 | high6
    first, last = _LENGTH_RANGES[n]
    return max(lo, first), min(hi, last)


@functools.lru_cache(maxsize=65536)
def next_bytes(prefix: tuple[int, ...], printable: bool) -> np.ndarray:
    """``(257,)`` bool: the bytes that may follow ``prefix`` (the bytes of an open character).

    Column 256 (pieces that are not bytes) is allowed only where no character is open.

    Args:
        prefix: bytes of the character spelled so far (empty: none is open).
        printable: also require a printable character (else any valid one).

    Returns:
        A read-only array (it is cached).
    """
    sums = _code_point_prefix_sums(printable)
    out = np.zeros(257, dtype=bool)
    out[_OTHER] = not prefix
    n = _sequence_length(prefix[0]) if prefix else 0
    for b in range(256):
        if prefix:
            if not 0x80 <= b <= 0xBF:
                continue
        else:
            n = _sequence_length(b)
            if n == 0:
                continue
        lo, hi = _code_point_range((*prefix, b), n)
        out[b] = lo <= hi and sums[hi + 1] > sums[lo]
    out.flags.writeable = False
    return out


class Utf8Guard:
    """Per-row UTF-8 state over a batch: which byte pieces may come next.

    Args:
        byte_ids: ``(256,)`` from :func:`byte_piece_ids`.
        batch: rows.
        printable: allow only printable characters (else any valid UTF-8).
    """

    def __init__(self, byte_ids: np.ndarray, batch: int, *, printable: bool = True) -> None:
        self.byte_ids = byte_ids
        self.printable = printable
        self.byte_of = {int(t): b for b, t in enumerate(byte_ids.tolist()) if t >= 0}
        self.active = bool(self.byte_of)
        start = next_bytes((), printable).copy() if self.active else np.ones(257, dtype=bool)
        if self.active and not np.all(byte_ids[0x80:0xC0] >= 0):
            start[0x80:256] = False  # lead bytes whose continuations the vocabulary lacks
        self.start = start  # (257,)
        self.prefix: list[tuple[int, ...]] = [()] * batch  # bytes of each row's open character
        self.need = np.zeros(batch, dtype=np.int64)  # continuation bytes still needed

    def allowed(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), 257)`` bool: which byte values (and, column 256, other pieces) each row may draw."""
        out = np.broadcast_to(self.start, (len(rows), 257)).copy()
        for i in np.flatnonzero(self.need[rows] > 0).tolist():
            out[i] = next_bytes(self.prefix[rows[i]], self.printable)
        return out

    def mask(self, logits: np.ndarray, rows: np.ndarray) -> None:
        """Ban, in place, the tokens ``rows`` may not draw (``logits`` row i is ``rows[i]``)."""
        if self.active:
            allowed = self.allowed(rows)
            logits[~allowed[:, byte_of_tokens(self.byte_ids, logits.shape[1])]] = -np.inf

    def advance(self, rows: np.ndarray, chosen: np.ndarray) -> None:
        """Record the tokens just picked for ``rows``."""
        if not self.active:
            return
        for r, t in zip(rows.tolist(), chosen.tolist(), strict=True):
            b = self.byte_of.get(t)
            if b is None:
                continue
            if self.need[r] > 0:
                self.need[r] -= 1
                self.prefix[r] = (*self.prefix[r], b) if self.need[r] else ()
            elif b >= 0x80:
                self.need[r] = _sequence_length(b) - 1
                self.prefix[r] = (b,)

    def open_bytes(self, row: int) -> int:
        """Bytes of a character left open in ``row`` (to be dropped when the row ends)."""
        return len(self.prefix[row]) if self.need[row] > 0 else 0


def default_suppressed(special_ids: Iterable[int], eos_id: int) -> tuple[int, ...]:
    """Every special piece but ``</s>``: never worth generating."""
    return tuple(sorted(int(i) for i in special_ids if int(i) != eos_id))
