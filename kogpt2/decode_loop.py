"""Decoding one batch: the per-step loop between the decoder and the sampler.

Each step feeds one token per row to the compiled decoder (:mod:`kogpt2.decoder`), turns the
rows' settings and histories into the sampler's per-row inputs (:class:`~kogpt2.sampling.DrawInputs`:
settings vectors, random numbers, seen tokens, banned n-grams, the UTF-8 byte state, the
``</s>`` ban), draws, and records what each row got: ``</s>``, a stop string, or the end of
its own token budget ends a row. Rows that finished are dropped from the decoder by halves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kogpt2.constraints import Utf8Guard, byte_of_tokens, byte_piece_ids, default_suppressed, unprintable_pieces
from kogpt2.decoder import Decoder
from kogpt2.generation_config import GenerationConfig
from kogpt2.sampling import DrawInputs, Sampler, VocabRules, repeated_ngram_bans, seen_tokens
from kogpt2.tokenizer import Tokenizer


@dataclass(frozen=True)
class RowSettings:
    """Per-row settings of one batch, as vectors (one entry per decoder row)."""

    seeds: np.ndarray  # (B,) uint64
    greedy: np.ndarray  # (B,) bool
    temperature: np.ndarray  # (B,) float32
    top_k: np.ndarray  # (B,) int32
    top_p: np.ndarray  # (B,) float32
    penalty: np.ndarray  # (B,) float32
    ngram: np.ndarray  # (B,) int64
    max_new: np.ndarray  # (B,) int64
    min_new: np.ndarray  # (B,) int64
    stops: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig], seeds: Sequence[int]) -> RowSettings:
        """The vectors of rows with these settings and row seeds."""
        cs = list(configs)
        return cls(
            seeds=np.array(seeds, np.uint64),
            greedy=np.array([c.greedy for c in cs], bool),
            temperature=np.array([c.temperature for c in cs], np.float32),
            top_k=np.array([c.top_k for c in cs], np.int32),
            top_p=np.array([c.top_p for c in cs], np.float32),
            penalty=np.array([c.repetition_penalty for c in cs], np.float32),
            ngram=np.array([c.no_repeat_ngram_size for c in cs], np.int64),
            max_new=np.array([c.max_new_tokens for c in cs], np.int64),
            min_new=np.array([c.min_new_tokens for c in cs], np.int64),
            stops=tuple(c.stop for c in cs),
        )

    def padded(self, rows: int) -> RowSettings:
        """The same with idle rows (copies of row 0) up to ``rows``."""
        extra = rows - len(self.seeds)
        if extra <= 0:
            return self
        pad = {
            name: np.concatenate([v, np.repeat(v[:1], extra)])
            for name, v in vars(self).items()
            if isinstance(v, np.ndarray)
        }
        return RowSettings(**pad, stops=self.stops + (self.stops[0],) * extra)


@dataclass(frozen=True)
class DecodedRow:
    """What decoding gives for one row."""

    new: list[int]
    reason: str
    logprob_sum: float
    dropped: int


@dataclass(frozen=True)
class TokenTables:
    """What generation needs to know about a tokenizer's pieces."""

    byte_ids: np.ndarray  # (256,) id of <0xNN>, -1 if absent
    specials: tuple[int, ...]  # every special piece but </s>
    unprintable: tuple[int, ...]  # ordinary pieces whose text holds an unprintable character


_TABLES: dict[str, TokenTables] = {}
_RULES: dict[tuple[Any, ...], VocabRules] = {}


def token_tables(tok: Tokenizer) -> TokenTables:
    """Byte pieces, special ids and unprintable pieces of a tokenizer, computed once per tokenizer file."""
    key = tok.fingerprint
    if key not in _TABLES:
        byte_ids = byte_piece_ids((i, tok.id_to_piece(i)) for i in range(tok.vocab_size))
        specials = set(tok.special_ids) | {tok.unk_id}
        skip = specials | set(byte_ids[byte_ids >= 0].tolist())
        texts = ((i, tok.decode([i])) for i in range(tok.vocab_size) if i not in skip)
        _TABLES[key] = TokenTables(byte_ids, default_suppressed(specials, tok.eos_id), tuple(unprintable_pieces(texts)))
    return _TABLES[key]


def vocab_rules(tok: Tokenizer, vocab: int, suppress_tokens: tuple[int, ...] | None, valid_utf8: bool) -> VocabRules:
    """The tokens a batch may never draw, and its byte pieces, for ``vocab``-wide logits (cached).

    Args:
        tok: the tokenizer.
        vocab: the model's logits width (ids past the tokenizer's are never drawn).
        suppress_tokens: ids never drawn; None = every special piece but ``</s>``.
        valid_utf8: byte pieces only where they form valid, printable UTF-8, and no piece whose
            text is unprintable.
    """
    key = (tok.fingerprint, vocab, suppress_tokens, valid_utf8)
    if key not in _RULES:
        tables = token_tables(tok)
        banned = set(tables.specials if suppress_tokens is None else suppress_tokens)
        banned |= set(range(tok.vocab_size, vocab))  # ids the tokenizer cannot decode
        if valid_utf8:
            banned |= set(tables.unprintable)
        static_ok = np.ones(vocab, dtype=bool)
        static_ok[[i for i in banned if i < vocab]] = False
        byte_of = byte_of_tokens(tables.byte_ids, vocab) if valid_utf8 else np.full(vocab, 256, dtype=np.int32)
        _RULES[key] = VocabRules(static_ok, byte_of, tok.eos_id)
    return _RULES[key]


def padded_batch(rows: int, max_batch: int) -> int:
    """The decoder batch for ``rows`` rows: the next power of two, or ``max_batch``.

    A partial batch (the last of a length bucket) is padded with idle rows, so the decoder
    sees a few batch shapes (powers of two below ``max_batch``, and ``max_batch``) whatever
    the job: each new shape costs an XLA compile and memory that is kept.
    """
    if rows >= max_batch:
        return rows
    return min(1 << (rows - 1).bit_length(), max_batch)


#: Cache slots a full batch is sized for. A batch whose rows need more (a long prompt bucket plus
#: its new tokens) gets fewer rows (:func:`rows_per_batch`): the key/value cache grows with rows x
#: slots (about 2.4 GB at 256 rows and 128 slots on the KoGPT2 shape, float32) and the prefill's
#: activations with rows x prompt width, so a few long prompts must not multiply the memory a
#: worker needs.
BATCH_SLOTS = 128


def rows_per_batch(batch_size: int, slots: int) -> int:
    """Rows of a batch whose rows need up to ``slots`` cache slots (prompt width + new tokens).

    ``batch_size`` up to :data:`BATCH_SLOTS` slots; beyond, as many as keep rows x slots within
    ``batch_size`` x :data:`BATCH_SLOTS`: a multiple of 16 (few compiled shapes), or a power of two
    below 16, at least 1.
    """
    if slots <= BATCH_SLOTS:
        return batch_size
    budget = batch_size * BATCH_SLOTS // slots
    if budget >= 16:
        return budget // 16 * 16
    return 1 << (max(budget, 1).bit_length() - 1)


class _Clock:
    """Adds the wall time between calls to named buckets of ``timings``."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def decode_batch(
    decoder: Decoder,
    tok: Tokenizer,
    prompts: list[list[int]],
    width: int,
    settings: RowSettings,
    rules: VocabRules,
    sampler: Sampler,
    *,
    max_batch: int | None = None,
    timings: dict[str, float] | None = None,
) -> list[DecodedRow]:
    """Decode one batch of prompts, each under its own settings.

    Args:
        decoder: the compiled decoder (its cache holds this batch until the next one).
        tok: the tokenizer (ids of ``<pad>`` and ``</s>``; stop strings are matched on decoded text).
        prompts: token ids of each prompt (``<s>`` included), each at most ``width`` long.
        width: the padded prompt length (a length bucket).
        settings: one entry per prompt.
        rules: what the batch shares (:func:`vocab_rules`).
        sampler: draws each step's tokens.
        max_batch: pad the batch to :func:`padded_batch` rows: idle copies of the first prompt
            that are never generated for (they finish before the first step).
        timings: seconds are added to its ``decoder``, ``sampler`` and ``host`` entries, and
            decode steps to ``steps``.

    Returns:
        One :class:`DecodedRow` per prompt.
    """
    clock = _Clock(timings)
    real = len(prompts)
    batch = padded_batch(real, max_batch) if max_batch else real
    prompts = prompts + [prompts[0]] * (batch - real)
    s = settings.padded(batch)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    max_new = int(s.max_new[:real].max())
    ids = np.full((batch, width), tok.pad_id, dtype=np.int64)
    starts = width - lengths  # (B,) first real slot of each row
    history = np.zeros((batch, width + max_new), dtype=np.int64)  # real ids only, left-aligned
    for b, p in enumerate(prompts):
        ids[b, starts[b] :] = p
        history[b, : len(p)] = p
    hlen = lengths.copy()
    out: list[list[int]] = [[] for _ in range(batch)]
    scores: list[list[float]] = [[] for _ in range(batch)]  # per-token log-probabilities
    reasons = ["length"] * batch
    guard = Utf8Guard(token_tables(tok).byte_ids, batch) if bool(np.any(rules.byte_of < 256)) else None
    rows = np.arange(batch)  # (R,) original row of each decoder row; shrinks as rows finish
    alive = np.arange(batch) < real  # (R,) decoder rows still generating (idle padding rows never are)
    clock.lap("host")
    logits = decoder.prefill(ids, starts, width + max_new - 1)  # (R, V)
    clock.lap("decoder")
    for step in range(max_new):
        inputs = _draw_inputs(s, rows, alive, step, history, hlen, guard)
        clock.lap("host")
        chosen, lps = sampler.draw(logits, inputs, rules)  # (R,), (R,)
        clock.lap("sampler")
        idx = np.nonzero(alive)[0]
        live = rows[idx]  # (A,) original rows
        chosen, lps = chosen[idx], lps[idx]
        if guard is not None:
            guard.advance(live, chosen)
        done = np.zeros(len(idx), dtype=bool)
        for i, (r, t) in enumerate(zip(live.tolist(), chosen.tolist(), strict=True)):
            out[r].append(t)
            scores[r].append(float(lps[i]))
            history[r, hlen[r]] = t
            hlen[r] += 1
            if t == tok.eos_id:
                reasons[r], done[i] = "eos", True
            elif s.stops[r] and _has_stop(tok.decode(out[r]), s.stops[r]):
                reasons[r], done[i] = "stop", True
            elif len(out[r]) >= s.max_new[r]:
                done[i] = True
        alive[idx[done]] = False
        if step == max_new - 1 or not alive.any():
            break
        feed = np.full(len(rows), tok.pad_id, dtype=np.int64)  # finished rows are fed <pad>, never read
        feed[idx] = chosen
        keep = _compaction(alive)
        clock.lap("host")
        if keep is not None:
            decoder.select_rows(keep)
            rows, alive, feed = rows[keep], alive[keep], feed[keep]
        logits = decoder.step(feed, starts[rows], width + step)
        clock.lap("decoder")
        if timings is not None:
            timings["steps"] = timings.get("steps", 0.0) + 1
    results = []
    for r in range(real):
        dropped = guard.open_bytes(r) if guard is not None and reasons[r] == "length" else 0
        kept = len(out[r]) - dropped
        results.append(DecodedRow(out[r][:kept], reasons[r], float(sum(scores[r][:kept])), dropped))
    clock.lap("host")
    return results


def _draw_inputs(
    s: RowSettings,
    rows: np.ndarray,
    alive: np.ndarray,
    step: int,
    history: np.ndarray,
    hlen: np.ndarray,
    guard: Utf8Guard | None,
) -> DrawInputs:
    """One step's per-row settings and constraints for the decoder rows (``rows[i]``: original row).

    Finished decoder rows are idle: nothing is drawn for them.
    """
    penalized, penalty = _penalized(s, rows, alive, history, hlen)
    return DrawInputs.make(
        s.seeds[rows],
        step,
        greedy=s.greedy[rows],
        idle=~alive,
        temperature=s.temperature[rows],
        top_k=np.where(alive, s.top_k[rows], 0),
        top_p=s.top_p[rows],
        allowed_bytes=guard.allowed(rows) if guard is not None else None,
        ban_eos=alive & (step < s.min_new[rows]),
        penalized=penalized,
        penalty=penalty,
        banned=_ngram_bans(s, rows, alive, history, hlen),
    )


def _penalized(
    s: RowSettings, rows: np.ndarray, alive: np.ndarray, history: np.ndarray, hlen: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 2)`` (decoder row, token) pairs under a repetition penalty, and ``(N,)`` their factors."""
    sel = np.flatnonzero(alive & (s.penalty[rows] != 1.0))
    if len(sel) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs = seen_tokens(history[rows[sel]], hlen[rows[sel]])  # rows numbered within sel
    pairs[:, 0] = sel[pairs[:, 0]]
    return pairs, s.penalty[rows[pairs[:, 0]]]


def _ngram_bans(
    s: RowSettings, rows: np.ndarray, alive: np.ndarray, history: np.ndarray, hlen: np.ndarray
) -> np.ndarray:
    """``(M, 2)`` (decoder row, token) pairs that would repeat an n-gram, for each row's own n."""
    sizes = s.ngram[rows]
    found = [np.zeros((0, 2), np.int64)]
    for n in np.unique(sizes[alive & (sizes > 0)]).tolist():
        sel = np.flatnonzero(alive & (sizes == n))
        pairs = repeated_ngram_bans(history[rows[sel]], hlen[rows[sel]], n)
        pairs[:, 0] = sel[pairs[:, 0]]
        found.append(pairs)
    return np.concatenate(found)


def _has_stop(text: str, stops: tuple[str, ...]) -> bool:
    return any(s in text for s in stops)


def _compaction(alive: np.ndarray) -> np.ndarray | None:
    """Decoder rows to keep once at most half of them are still generating, else None.

    The batch shrinks by halves (finished rows fill the gap), so a batch takes at most
    log2(batch size) distinct shapes: recompiles stay bounded.
    """
    size, n_alive = len(alive), int(alive.sum())
    if size < 8 or n_alive > size // 2:
        return None
    while size // 2 >= max(n_alive, 1):
        size //= 2
    filler = np.nonzero(~alive)[0][: size - n_alive]
    return np.sort(np.concatenate([np.nonzero(alive)[0], filler]))
