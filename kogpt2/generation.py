"""Batched, cached, reproducible text generation.

``generate(model, tokenizer, prompts, config)`` continues each prompt as the notebook
did (``<s>`` + the prompt, then one token at a time until ``</s>`` or
``max_new_tokens``), but for a whole batch at once: prompts are left-padded into
length buckets, run through a compiled decoder with a key/value cache
(:mod:`kogpt2.decoder`), and each next token is picked by :mod:`kogpt2.sampling`.

Reproducible: row ``(prompt, sample_index)`` draws its random numbers from a seed
derived from ``(prompt, sample_index, config.seed)``, so it gives the same text in any
batch and any order (up to floating-point near-ties between candidate tokens, which
batch shapes can perturb in the last bit).
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kogpt2.constraints import Utf8Guard, byte_piece_ids, default_suppressed, suppress, unprintable_pieces
from kogpt2.decoder import DEFAULT_CACHE_GROWTH, DTYPES, Decoder
from kogpt2.generation_config import (  # noqa: F401  (re-exported: the generation API)
    DECODING_STRATEGIES,
    DEFAULT_TOP_P,
    GENERATION_CONFIG_FILE,
    GenerationConfig,
    write_generation_config,
)
from kogpt2.sampling import apply_repetition_penalty, ban_repeated_ngrams, select_tokens
from kogpt2.tokenizer import Tokenizer
from kogpt2.validate import is_int

log = logging.getLogger(__name__)

#: Padded prompt lengths; a batch is padded to the bucket of its longest prompt.
PROMPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZE = 64


class BatchFailedError(RuntimeError):
    """Decoding a batch raised (see :meth:`Generator.stream_rows` to go on past failures)."""


@dataclass(frozen=True)
class Sample:
    """One generated output.

    Attributes:
        prompt: the prompt as given.
        sample_index: 0 .. num_samples-1.
        text: the prompt continued, decoded as one text (``이때`` may become ``이때문에 ...``).
        continuation: the generated part alone (``text`` = decoded prompt + ``continuation``).
        new_tokens: generated tokens, ``</s>`` included.
        finish_reason: ``eos`` (stopped at ``</s>``), ``stop`` (a stop string appeared) or
            ``length`` (``max_new_tokens`` reached).
        row_seed: the random seed of this output.
        prompt_tokens: tokens fed as the prompt (``<s>`` included, after any cut).
        truncated: the prompt was cut from the left to fit the model's positions.
        new_ids: the generated token ids (``</s>`` included when it ended the output).
        logprob_sum: sum of the log-probabilities of ``new_ids`` under the model (its raw
            distribution: before repetition penalty, bans, temperature and top-k/top-p cuts).
        logprob_mean: ``logprob_sum / new_tokens`` (0.0 with no new token).
        dropped_tokens: byte pieces of a character left unfinished at ``max_new_tokens``,
            dropped so that the text is valid UTF-8.
    """

    prompt: str
    sample_index: int
    text: str
    continuation: str
    new_tokens: int
    finish_reason: str
    row_seed: int
    prompt_tokens: int
    truncated: bool
    new_ids: tuple[int, ...] = ()
    logprob_sum: float = 0.0
    logprob_mean: float = 0.0
    dropped_tokens: int = 0


@dataclass(frozen=True)
class BatchOutcome:
    """One decoded batch of :meth:`Generator.stream_rows`.

    Attributes:
        rows: the ``(prompt, sample_index)`` rows this batch answers.
        samples: one :class:`Sample` per row (empty when the batch failed).
        new_tokens: tokens decoded (each decoded sequence counted once).
        seconds: wall time of the batch.
        error: ``"ExceptionType: message"`` when decoding raised, else None.
    """

    rows: list[tuple[str, int]]
    samples: list[Sample]
    new_tokens: int
    seconds: float
    error: str | None


def prompt_bucket(length: int, limit: int) -> int:
    """The padded length of a batch whose longest prompt has ``length`` tokens."""
    for b in PROMPT_BUCKETS:
        if b >= length:
            return min(b, limit)
    return limit


def max_prompt_tokens(n_positions: int, max_new_tokens: int) -> int:
    """The longest prompt (``<s>`` included) that leaves room for ``max_new_tokens``.

    Raises:
        ValueError: ``max_new_tokens`` leaves no room for a prompt.
    """
    limit = n_positions - max_new_tokens
    if limit < 2:
        raise ValueError(
            f"GenerationConfig.max_new_tokens={max_new_tokens}: must be <= {n_positions - 2} "
            f"for this model ({n_positions} positions, room for <s> and a prompt token)"
        )
    return limit


class Generator:
    """A tokenizer and a compiled decoder: what a pipeline worker loads once and reuses.

    Args:
        model: a ``TFGPT2LMHeadModel``.
        tokenizer: its tokenizer.
        dtype: ``float32`` or ``bfloat16`` computation.
        batch_size: rows decoded together.
        scores: compute ``Sample.logprob_sum`` / ``logprob_mean`` (False leaves them 0).
        cache_growth: key/value cache slots added at a time (0: the whole budget from the start);
            see :class:`kogpt2.decoder.Decoder`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        scores: bool = True,
        cache_growth: int = DEFAULT_CACHE_GROWTH,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, dtype, scores=scores, cache_growth=cache_growth)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.n_positions = int(model.config.n_positions)

    @classmethod
    def from_folder(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_growth: int = DEFAULT_CACHE_GROWTH,
    ) -> Generator:
        """Load a model folder (see :func:`kogpt2.model.load_model`) into a generator."""
        from kogpt2.model import load_model

        model, tokenizer = load_model(path)
        return cls(model, tokenizer, dtype=dtype, batch_size=batch_size, cache_growth=cache_growth)

    @property
    def compiles(self) -> int:
        """Graph traces plus XLA compiles so far."""
        return self.decoder.traces + self.decoder.xla_compiles

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> list[Sample]:
        """``num_samples`` outputs per prompt, prompt-major (prompt 0's samples first)."""
        rows = [(p, i) for p in prompts for i in range(config.num_samples)]
        return self.generate_rows(rows, config)

    def generate_rows(self, rows: Sequence[tuple[str, int]], config: GenerationConfig) -> list[Sample]:
        """Generate one output per ``(prompt, sample_index)`` row, in the order given.

        Args:
            rows: ``(prompt, sample_index)`` pairs (``config.num_samples`` is not used here).
            config: the strategy.

        Returns:
            One :class:`Sample` per row.

        Raises:
            ValueError: a prompt is not a string, or ``max_new_tokens`` does not fit the model.
            BatchFailedError: decoding a batch raised (the first such error).
        """
        by_row: dict[tuple[str, int], Sample] = {}
        for outcome in self.stream_rows(rows, config):
            if outcome.error is not None:
                raise BatchFailedError(f"a batch of {len(outcome.rows)} rows failed: {outcome.error}")
            by_row.update(((s.prompt, s.sample_index), s) for s in outcome.samples)
        return [by_row[(p, i)] for p, i in rows]

    def run_rows(self, rows: Sequence[tuple[str, int]], config: GenerationConfig) -> list[BatchOutcome]:
        """:meth:`stream_rows` as a list (what crosses a process boundary, for shared models)."""
        return list(self.stream_rows(rows, config))

    def stream_rows(self, rows: Sequence[tuple[str, int]], config: GenerationConfig) -> Iterator[BatchOutcome]:
        """Decode ``rows`` in full, length-bucketed batches; yield each batch's outcome as it finishes.

        Rows are sorted by prompt length, so every batch but the last of each length bucket
        holds ``batch_size`` rows. A batch whose decoding raises yields its rows with the
        error message (``samples`` empty) and the next batch goes on: callers decide what a
        failure means. Duplicate rows are decoded once; greedy rows of one prompt too.

        Raises:
            ValueError: a prompt is not a string, or ``max_new_tokens`` does not fit the model.
        """
        limit = max_prompt_tokens(self.n_positions, config.max_new_tokens)
        tok = self.tokenizer
        encoded: dict[str, tuple[list[int], bool]] = {}
        for prompt, _ in rows:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {prompt!r}: must be a string")
            if prompt not in encoded:
                ids = [tok.bos_id, *tok.encode(prompt)]
                cut = len(ids) > limit
                encoded[prompt] = ([tok.bos_id, *ids[len(ids) - limit + 1 :]] if cut else ids, cut)
        n_cut = sum(1 for p, _ in rows if encoded[p][1])
        if n_cut:
            msg = (
                f"{n_cut} of {len(rows)} prompts are longer than {limit} tokens (the model's {self.n_positions} "
                f"positions minus max_new_tokens={config.max_new_tokens}); cut from the left"
            )
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        # Greedy outputs do not depend on the sample index: decode each prompt once.
        members: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for p, i in dict.fromkeys(rows):
            members.setdefault((p, 0 if config.greedy else i), []).append((p, i))
        unique = sorted(members, key=lambda k: (len(encoded[k[0]][0]), k))
        for batch in self._batches(unique, encoded, limit):
            started = time.perf_counter()
            batch_rows = [r for k in batch for r in members[k]]
            try:
                with self.decoder.lock:
                    outs = _decode_batch(
                        self.decoder,
                        tok,
                        [encoded[k[0]][0] for k in batch],
                        np.array([config.row_seed(*k) for k in batch], np.uint64),
                        config,
                        limit,
                        max_batch=self.batch_size,
                    )
            except Exception as exc:  # noqa: BLE001 - reported per batch; the caller dead-letters the rows
                log.warning("a batch of %d rows failed: %s: %s", len(batch_rows), type(exc).__name__, exc)
                yield BatchOutcome(batch_rows, [], 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
                continue
            samples = []
            for key, row in zip(batch, outs, strict=True):
                prompt_ids, cut = encoded[key[0]]
                for prompt, index in members[key]:
                    samples.append(
                        _make_sample(tok, prompt, index, prompt_ids, row, config.row_seed(prompt, index), cut)
                    )
            new_tokens = sum(len(row.new) for row in outs)
            yield BatchOutcome(batch_rows, samples, new_tokens, time.perf_counter() - started, None)

    def _batches(
        self, keys: list[tuple[str, int]], encoded: dict[str, tuple[list[int], bool]], limit: int
    ) -> list[list[tuple[str, int]]]:
        """Split length-sorted rows into batches of at most ``batch_size`` sharing a length bucket."""
        batches: list[list[tuple[str, int]]] = []
        current: list[tuple[str, int]] = []
        bucket = None
        for key in keys:
            b = prompt_bucket(len(encoded[key[0]][0]), limit)
            if current and (b != bucket or len(current) == self.batch_size):
                batches.append(current)
                current = []
            current.append(key)
            bucket = b
        if current:
            batches.append(current)
        return batches


@dataclass(frozen=True)
class _Row:
    """What decoding gives for one row."""

    new: list[int]
    reason: str
    logprob_sum: float
    dropped: int


def _make_sample(
    tok: Tokenizer, prompt: str, index: int, prompt_ids: list[int], row: _Row, seed: int, cut: bool
) -> Sample:
    new = row.new
    text = tok.decode(prompt_ids + new)
    prefix = tok.decode(prompt_ids)
    continuation = text[len(prefix) :] if text.startswith(prefix) else tok.decode(new)
    mean = row.logprob_sum / len(new) if new else 0.0
    return Sample(
        prompt,
        index,
        text,
        continuation,
        len(new),
        row.reason,
        seed,
        len(prompt_ids),
        cut,
        tuple(new),
        row.logprob_sum,
        mean,
        row.dropped,
    )


@dataclass(frozen=True)
class _TokenTables:
    byte_ids: np.ndarray  # (256,) id of <0xNN>, -1 if absent
    specials: tuple[int, ...]  # every special piece but </s>
    unprintable: tuple[int, ...]  # ordinary pieces whose text holds an unprintable character


_TABLES: dict[str, _TokenTables] = {}


def _token_tables(tok: Tokenizer) -> _TokenTables:
    """Byte pieces, special ids and unprintable pieces of a tokenizer, computed once per tokenizer file."""
    key = tok.fingerprint
    if key not in _TABLES:
        byte_ids = byte_piece_ids((i, tok.id_to_piece(i)) for i in range(tok.vocab_size))
        specials = set(tok.special_ids) | {tok.unk_id}
        skip = specials | set(byte_ids[byte_ids >= 0].tolist())
        texts = ((i, tok.decode([i])) for i in range(tok.vocab_size) if i not in skip)
        _TABLES[key] = _TokenTables(
            byte_ids, default_suppressed(specials, tok.eos_id), tuple(unprintable_pieces(texts))
        )
    return _TABLES[key]


def padded_batch(rows: int, max_batch: int) -> int:
    """The decoder batch for ``rows`` rows: the next power of two, or ``max_batch``.

    A partial batch (the last of a length bucket) is padded with idle rows, so the decoder
    sees a few batch shapes (powers of two below ``max_batch``, and ``max_batch``) whatever
    the job: each new shape costs an XLA compile and memory that is kept.
    """
    if rows >= max_batch:
        return rows
    return min(1 << (rows - 1).bit_length(), max_batch)


def _decode_batch(
    decoder: Decoder,
    tok: Tokenizer,
    prompts: list[list[int]],
    seeds: np.ndarray,
    config: GenerationConfig,
    limit: int,
    *,
    max_batch: int | None = None,
) -> list[_Row]:
    """Decode one batch of prompt ids (each <= ``limit`` tokens); one :class:`_Row` per prompt.

    With ``max_batch``, the batch is padded to :func:`padded_batch` rows: idle copies of the
    first prompt that are never generated for (they finish before the first step).
    """
    real = len(prompts)
    batch = padded_batch(real, max_batch) if max_batch else real
    if batch > real:
        prompts = prompts + [prompts[0]] * (batch - real)
        seeds = np.concatenate([seeds, np.repeat(seeds[:1], batch - real)])
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    width = prompt_bucket(int(lengths.max()), limit)
    max_new = config.max_new_tokens
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
    tables = _token_tables(tok)
    guard = Utf8Guard(tables.byte_ids, batch) if config.valid_utf8 else None
    rows = np.arange(batch)  # (R,) original row of each decoder row; shrinks as rows finish
    alive = np.arange(batch) < real  # (R,) decoder rows still generating (idle padding rows never are)
    logits = decoder.prefill(ids, starts, width + max_new - 1)  # (R, V)
    logz = decoder.last_logz  # (R,)
    vocab = logits.shape[1]
    banned = list(tables.specials if config.suppress_tokens is None else config.suppress_tokens)
    banned += range(tok.vocab_size, vocab)  # ids the tokenizer cannot decode
    if config.valid_utf8:
        banned += tables.unprintable  # pieces whose text holds a control, private-use or unassigned character
    suppressed = np.array(sorted(i for i in set(banned) if i < vocab), dtype=np.int64)
    penalty = config.repetition_penalty
    for step in range(max_new):
        idx = np.nonzero(alive)[0]
        lg = logits if len(idx) == len(rows) else logits[idx]  # (A, V)
        live = rows[idx]  # (A,) original rows
        hist, hl = history[live], hlen[live]
        if penalty != 1.0:
            apply_repetition_penalty(lg, hist, hl, penalty)
        if config.no_repeat_ngram_size:
            ban_repeated_ngrams(lg, hist, hl, config.no_repeat_ngram_size)
        suppress(lg, suppressed)
        if step < config.min_new_tokens:
            lg[:, tok.eos_id] = -np.inf
        if guard is not None:
            guard.mask(lg, live)
        chosen = select_tokens(
            lg,
            greedy=config.greedy,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            row_seeds=seeds[live],
            step=step,
        )
        picked = lg[np.arange(len(idx)), chosen].astype(np.float64)  # (A,)
        if penalty != 1.0:  # undo the penalty on the picked logit: scores are under the raw model
            seen = ((hist == chosen[:, None]) & (np.arange(hist.shape[1])[None, :] < hl[:, None])).any(axis=1)
            picked = np.where(seen, np.where(picked > 0, picked * penalty, picked / penalty), picked)
        lps = picked - logz[idx]
        if guard is not None:
            guard.advance(live, chosen)
        done = chosen == tok.eos_id
        for i, (r, t) in enumerate(zip(live.tolist(), chosen.tolist(), strict=True)):
            out[r].append(t)
            scores[r].append(float(lps[i]))
            history[r, hlen[r]] = t
            hlen[r] += 1
            if t == tok.eos_id:
                reasons[r] = "eos"
            elif config.stop and _has_stop(tok.decode(out[r]), config.stop):
                reasons[r] = "stop"
                done[i] = True
        alive[idx[done]] = False
        if step == max_new - 1 or not alive.any():
            break
        feed = np.full(len(rows), tok.pad_id, dtype=np.int64)  # finished rows are fed <pad>, never read
        feed[idx] = chosen
        keep = _compaction(alive)
        if keep is not None:
            decoder.select_rows(keep)
            rows, alive, feed = rows[keep], alive[keep], feed[keep]
        logits = decoder.step(feed, starts[rows], width + step)
        logz = decoder.last_logz
    results = []
    for r in range(real):
        dropped = guard.open_bytes(r) if guard is not None and reasons[r] == "length" else 0
        kept = len(out[r]) - dropped
        results.append(_Row(out[r][:kept], reasons[r], float(sum(scores[r][:kept])), dropped))
    return results


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


# A model's generators, by dtype and batch size, so repeated calls reuse the compiled decoder.
_GENERATORS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], Generator]] = weakref.WeakKeyDictionary()


def generate(
    model: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
) -> list[Sample]:
    """Continue each prompt ``config.num_samples`` times.

    Args:
        model: a ``TFGPT2LMHeadModel`` (see :func:`kogpt2.model.load_model`).
        tokenizer: its tokenizer.
        prompts: prompt strings; ``<s>`` is put in front of each, as in the notebook.
        config: the strategy (default: plain sampling, 100 new tokens).
        batch_size: rows decoded together.
        dtype: ``float32`` or ``bfloat16``.

    Returns:
        ``len(prompts) * num_samples`` samples, prompt-major.

    Raises:
        ValueError: bad arguments (the message names them).
    """
    config = config or GenerationConfig()
    per_model = _GENERATORS.setdefault(model, {})
    key = (dtype, int(batch_size))
    if key not in per_model:
        per_model[key] = Generator(model, tokenizer, dtype=dtype, batch_size=batch_size)
    gen = per_model[key]
    gen.tokenizer = tokenizer
    return gen.generate(prompts, config)
