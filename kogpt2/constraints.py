"""Token constraints applied to next-token logits before a token is picked (numpy, in place).

- **Suppressed tokens**: ids that are never generated. By default every special piece but
  ``</s>``: ``<s>``, ``<pad>``, ``<unk>`` and user-defined ones (``<usr>``, ``<sys>``,
  ``<unusedN>``). They vanish when decoded, so sampling them made a row's ``new_tokens``
  and its text disagree (transformers calls this ``suppress_tokens``).
- **Valid UTF-8**: with byte fallback (pieces ``<0x00>`` .. ``<0xFF>``) a model can emit
  bytes that do not form UTF-8, which decode to U+FFFD. :class:`Utf8Guard` tracks, per
  row, whether a multi-byte character is open and allows only the bytes that start or
  continue a valid sequence (RFC 3629: no overlong forms, no surrogates, nothing past
  U+10FFFF). A character still open when a row ends is dropped (and counted).
- **min_new_tokens**: ``</s>`` is banned until a row has that many new tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_piece_ids(pieces: Iterable[tuple[int, str]]) -> np.ndarray:
    """``(256,)`` id of the piece ``<0xNN>`` for each byte value, -1 where the vocabulary has none."""
    table = np.full(256, -1, dtype=np.int64)
    for token_id, piece in pieces:
        m = _BYTE_PIECE.match(piece)
        if m:
            table[int(m.group(1), 16)] = token_id
    return table


def _lead(byte: int) -> tuple[int, int, int]:
    """For a lead byte: (continuation bytes needed, low and high bound of the first continuation)."""
    if 0xC2 <= byte <= 0xDF:
        return 1, 0x80, 0xBF
    if byte == 0xE0:
        return 2, 0xA0, 0xBF  # no overlong 3-byte forms
    if byte == 0xED:
        return 2, 0x80, 0x9F  # no surrogates
    if 0xE1 <= byte <= 0xEF:
        return 2, 0x80, 0xBF
    if byte == 0xF0:
        return 3, 0x90, 0xBF  # no overlong 4-byte forms
    if 0xF1 <= byte <= 0xF3:
        return 3, 0x80, 0xBF
    if byte == 0xF4:
        return 3, 0x80, 0x8F  # nothing past U+10FFFF
    raise ValueError(f"0x{byte:02X} is not a UTF-8 lead byte")


#: Bytes that may stand where no character is open: ASCII and valid lead bytes.
_STARTERS = [b for b in range(256) if b < 0x80 or 0xC2 <= b <= 0xF4]


class Utf8Guard:
    """Per-row UTF-8 state over a batch: which byte pieces may come next.

    Args:
        byte_ids: ``(256,)`` from :func:`byte_piece_ids`.
        batch: rows.
    """

    def __init__(self, byte_ids: np.ndarray, batch: int) -> None:
        self.byte_ids = byte_ids
        self.byte_of = {int(t): b for b, t in enumerate(byte_ids.tolist()) if t >= 0}
        self.active = bool(self.byte_of)
        have_continuations = bool(np.all(byte_ids[0x80:0xC0] >= 0))
        # lead bytes whose continuations do not exist in the vocabulary may never start a character
        allowed = [b for b in _STARTERS if b < 0x80 or have_continuations]
        banned = sorted(set(range(256)) - set(allowed))
        self.banned_at_start = byte_ids[banned][byte_ids[banned] >= 0]  # (K,)
        self.need = np.zeros(batch, dtype=np.int64)  # continuation bytes still needed
        self.lo = np.zeros(batch, dtype=np.int64)
        self.hi = np.zeros(batch, dtype=np.int64)
        self.open_len = np.zeros(batch, dtype=np.int64)  # bytes of the open character so far

    def mask(self, logits: np.ndarray, rows: np.ndarray) -> None:
        """Ban, in place, the tokens that would break UTF-8 for ``rows`` (``logits`` row i is ``rows[i]``)."""
        if not self.active:
            return
        need = self.need[rows]
        closed = np.nonzero(need == 0)[0]
        if len(closed) and len(self.banned_at_start):
            logits[closed[:, None], self.banned_at_start[None, :]] = -np.inf
        for i in np.nonzero(need > 0)[0].tolist():  # inside a character: only its next byte
            r = rows[i]
            ok = self.byte_ids[self.lo[r] : self.hi[r] + 1]
            keep = logits[i, ok].copy()
            logits[i, :] = -np.inf
            logits[i, ok] = keep

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
                self.open_len[r] = self.open_len[r] + 1 if self.need[r] else 0
                self.lo[r], self.hi[r] = 0x80, 0xBF
            elif b >= 0x80:
                self.need[r], self.lo[r], self.hi[r] = _lead(b)
                self.open_len[r] = 1

    def open_bytes(self, row: int) -> int:
        """Bytes of a character left open in ``row`` (to be dropped when the row ends)."""
        return int(self.open_len[row]) if self.need[row] > 0 else 0


def default_suppressed(special_ids: Iterable[int], eos_id: int) -> tuple[int, ...]:
    """Every special piece but ``</s>``: never worth generating."""
    return tuple(sorted(int(i) for i in special_ids if int(i) != eos_id))


def suppress(logits: np.ndarray, ids: np.ndarray) -> None:
    """Ban ``ids`` in every row, in place."""
    if len(ids):
        logits[:, ids] = -np.inf


def ban_eos_before(logits: np.ndarray, new_counts: np.ndarray, min_new: int, eos_id: int) -> None:
    """Ban ``</s>`` in rows that have fewer than ``min_new`` new tokens, in place."""
    if min_new > 0:
        early = new_counts < min_new
        if early.any():
            logits[early, eos_id] = -np.inf
