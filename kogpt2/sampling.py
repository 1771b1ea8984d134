"""Per-row reproducible token selection: every setting a per-row vector, the random numbers hashed.

One decode step gives logits ``(R, V)``; :class:`HostSampler` draws one token per row and
its log-probability under the raw model. Every setting is a per-row vector (greedy,
temperature, top-k, top-p, repetition penalty, ``</s>`` ban, allowed byte pieces:
:class:`DrawInputs`), so rows with different settings share one batch, and a row's token
depends on its own logits, history and seed only, never on its batch-mates. Its random
numbers are a counter-based hash of ``(row_seed, step, attempt)`` (:func:`uniforms`).

The draw, per row (an exact draw from the renormalized nucleus, without sorting 50,000 logits):

- greedy (or a temperature below :data:`MIN_TEMPERATURE`): the best allowed token, ties to the
  lowest id;
- top-p: a token drawn from the whole distribution by inverse CDF (256-token block sums locate
  the block, a cumulative sum inside it the token) is accepted when the mass of the tokens
  ranked before it is < top_p, which takes about 1/top_p tries; rows still unresolved after
  :data:`MAX_ATTEMPTS` tries (a small top_p) take an exact sorted draw;
- top-k (then top-p among the k): TensorFlow's top-k kernel, then the sorted draw.

One exponential per logit serves the draw and the log normalizer of the scores; the
constraints touch a few entries each (sparse writes), except for rows inside a multi-byte
character, which may only continue it and are drawn exactly among those bytes.

Tokens are ranked by probability, descending, then by id, ascending: this decides ties at the
nucleus boundary and makes ``top_k=1`` and a tiny ``top_p`` greedy.
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kogpt2.tf_setup import usable_cpus  # no TensorFlow import: it only sets the environment

MAX_ATTEMPTS = 16
#: Uniform draws per row and step: one per nucleus attempt, then one for the sorted draw.
DRAWS = MAX_ATTEMPTS + 1
#: Below this temperature, sampling is greedy: dividing float32 logits by a smaller one
#: overflows to inf (and inf - inf is NaN), while the limit of softmax(x / T) as T -> 0
#: is the argmax anyway.
MIN_TEMPERATURE = 1e-4
#: Columns of :attr:`DrawInputs.allowed_bytes`: one per byte value, then "any other piece".
BYTE_COLUMNS = 257
#: The nucleus of a row the tries did not resolve is looked for among its best this many tokens
#: first (top-k kernel), before a full sort.
SORTED_CANDIDATES = 1024
#: Where the token draw runs: ``host`` (:class:`HostSampler`, numpy: the fastest on this CPU,
#: measured) or ``graph`` (:mod:`kogpt2.graph_sampling`, one XLA function beside the model: the logits
#: never leave the device, the choice for GPU workers, not measured on one).
SAMPLERS = ("host", "graph")
#: Fewest rows a thread of the host draw takes: below this a second thread costs more than it saves.
MIN_ROWS_PER_THREAD = 16
_BLOCK = 256
_TINY = 1e-30  # below this total mass (underflow), a row is drawn exactly
_INT63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def row_seed(prompt: str, sample_index: int, seed: int) -> int:
    """The random seed of one output row, from stable ids.

    Args:
        prompt: the seed text as given.
        sample_index: 0 .. num_samples-1.
        seed: the run seed.

    Returns:
        A non-negative int64 derived from a sha256 of the three values.
    """
    key = f"kogpt2-row\x1f{int(seed)}\x1f{int(sample_index)}\x1f{prompt}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & _INT63


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(row_seeds: np.ndarray, step: int, attempts: int = 1) -> np.ndarray:
    """Uniform draws in [0, 1) per row, a pure function of ``(row_seed, step, attempt)``.

    Args:
        row_seeds: ``(B,)`` non-negative integer seeds.
        step: generation step (0-based).
        attempts: draws per row (attempt numbers 0 .. attempts-1, at most 1024).

    Returns:
        ``(B, attempts)`` float64 values in [0, 1).
    """
    seeds = np.asarray(row_seeds, dtype=np.uint64)
    counters = np.array([((int(step) * 1024 + a + 1) * _GOLDEN) & _MASK64 for a in range(attempts)], np.uint64)
    z = _mix64(_mix64(seeds)[:, None] + counters[None, :])  # (B, A), wrapping
    return (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def seen_tokens(history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The distinct ``(row, token)`` pairs of each row's history (what a repetition penalty touches).

    Args:
        history: ``(B, C)`` token ids; row ``b`` holds ``lengths[b]`` real ids at the front.
        lengths: ``(B,)`` number of real ids per row.

    Returns:
        ``(N, 2)`` int64 pairs, sorted.
    """
    valid = np.arange(history.shape[1])[None, :] < lengths[:, None]  # (B, C)
    rows, cols = np.nonzero(valid)
    return _unique_pairs(rows, history[rows, cols])


def repeated_ngram_bans(history: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """``(row, token)`` pairs that would repeat an n-gram already in the row's history.

    Args:
        history: ``(B, C)`` token ids, ``lengths[b]`` real ids at the front of row ``b``.
        lengths: ``(B,)`` number of real ids per row.
        n: n-gram size; 0 = off.

    Returns:
        ``(M, 2)`` int64 pairs, sorted.
    """
    cap = history.shape[1]
    if n <= 0 or cap < n:
        return np.zeros((0, 2), dtype=np.int64)
    windows = sliding_window_view(history, n, axis=1)  # (B, W, n), W = C - n + 1
    idx = lengths[:, None] - (n - 1) + np.arange(n - 1)[None, :]  # (B, n-1): the current suffix
    suffix = np.take_along_axis(history, np.clip(idx, 0, cap - 1), axis=1)
    complete = np.arange(windows.shape[1])[None, :] + n <= lengths[:, None]  # (B, W)
    match = complete & np.all(windows[:, :, : n - 1] == suffix[:, None, :], axis=2)
    rows, starts = np.nonzero(match)
    return _unique_pairs(rows, windows[rows, starts, n - 1])


def not_in(pairs: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: which rows of ``pairs`` ``(N, 2)`` are not rows of ``other`` ``(M, 2)``."""
    if len(pairs) == 0 or len(other) == 0:
        return np.ones(len(pairs), dtype=bool)
    key = np.int64(1) << 32
    return ~np.isin(pairs[:, 0].astype(np.int64) * key + pairs[:, 1], other[:, 0].astype(np.int64) * key + other[:, 1])


def _unique_pairs(rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    pairs = np.stack([rows.astype(np.int64), tokens.astype(np.int64)], axis=1)  # (N, 2)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


@dataclass(frozen=True)
class VocabRules:
    """What a batch's rows share: tokens never drawn and where the byte pieces are.

    Attributes:
        static_ok: ``(V,)`` bool, False for tokens no row may draw (suppressed, unprintable).
        byte_of: ``(V,)`` int32 byte value of each byte piece ``<0xNN>``, 256 for other pieces.
        eos_id: the ``</s>`` id (banned per row by :attr:`DrawInputs.ban_eos`).
    """

    static_ok: np.ndarray
    byte_of: np.ndarray
    eos_id: int

    @classmethod
    def open(cls, vocab: int, eos_id: int = 1) -> VocabRules:
        """Every token allowed, no byte pieces."""
        return cls(np.ones(vocab, dtype=bool), np.full(vocab, 256, dtype=np.int32), eos_id)

    @functools.cached_property
    def banned_ids(self) -> np.ndarray:
        """``(K,)`` ids no row may draw."""
        return np.flatnonzero(~self.static_ok)

    @functools.cached_property
    def byte_tokens(self) -> np.ndarray:
        """``(256,)`` token id of each byte value, -1 where the vocabulary has none."""
        out = np.full(256, -1, dtype=np.int64)
        ids = np.flatnonzero(self.byte_of < 256)
        out[self.byte_of[ids]] = ids
        return out


@dataclass(frozen=True)
class DrawInputs:
    """One step's per-row settings and constraints (numpy, one entry per decoder row).

    Attributes:
        greedy: ``(R,)`` bool: take the best allowed token.
        temperature: ``(R,)`` float32 > 0 (below :data:`MIN_TEMPERATURE`: greedy).
        top_k: ``(R,)`` int32, 0 = no cut.
        top_p: ``(R,)`` float32 in (0, 1], 1 = no cut.
        uniforms: ``(R, DRAWS)`` float64 in [0, 1): the row's random numbers this step.
        allowed_bytes: ``(R, 257)`` bool: which byte values may come next, and (column 256)
            whether pieces that are not bytes may.
        ban_eos: ``(R,)`` bool: ``</s>`` not allowed (``min_new_tokens`` not reached).
        penalized: ``(N, 2)`` (row, token) pairs the repetition penalty applies to.
        penalty: ``(N,)`` float32 factor of each pair (> 1 discourages the token).
        banned: ``(M, 2)`` (row, token) pairs banned this step (repeated n-grams).
        idle: ``(R,)`` bool: rows whose token is not needed (they finished); drawn as token 0.
    """

    greedy: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    uniforms: np.ndarray
    allowed_bytes: np.ndarray
    ban_eos: np.ndarray
    penalized: np.ndarray
    penalty: np.ndarray
    banned: np.ndarray
    idle: np.ndarray

    @classmethod
    def make(
        cls,
        row_seeds: np.ndarray,
        step: int,
        *,
        greedy: Any = False,
        temperature: Any = 1.0,
        top_k: Any = 0,
        top_p: Any = 1.0,
        allowed_bytes: np.ndarray | None = None,
        ban_eos: Any = False,
        penalized: np.ndarray | None = None,
        penalty: np.ndarray | None = None,
        banned: np.ndarray | None = None,
        idle: Any = False,
    ) -> DrawInputs:
        """Inputs for ``len(row_seeds)`` rows; scalars apply to every row."""
        rows = len(row_seeds)

        def vec(value: Any, dtype: Any) -> np.ndarray:
            return np.broadcast_to(np.asarray(value, dtype=dtype), (rows,)).copy()

        return cls(
            greedy=vec(greedy, bool),
            temperature=vec(temperature, np.float32),
            top_k=vec(top_k, np.int32),
            top_p=vec(top_p, np.float32),
            uniforms=uniforms(row_seeds, step, DRAWS),
            allowed_bytes=np.ones((rows, BYTE_COLUMNS), dtype=bool) if allowed_bytes is None else allowed_bytes,
            ban_eos=vec(ban_eos, bool),
            penalized=np.zeros((0, 2), np.int32) if penalized is None else penalized.astype(np.int32),
            penalty=np.zeros(0, np.float32) if penalty is None else penalty.astype(np.float32),
            banned=np.zeros((0, 2), np.int32) if banned is None else banned.astype(np.int32),
            idle=vec(idle, bool),
        )


#: :class:`DrawInputs` fields that list ``(row, token)`` pairs, with the field of their per-pair values.
_PAIRED = {"penalized": "penalty", "banned": ""}


def take_rows(inputs: DrawInputs, lo: int, hi: int) -> DrawInputs:
    """The inputs of rows ``lo .. hi-1`` alone, as a batch of their own (rows renumbered from 0).

    Every field is a per-row array except the ``(row, token)`` pair lists (:data:`_PAIRED`),
    which keep their pairs of these rows and the matching values.
    """
    paired = {*_PAIRED, *_PAIRED.values()}
    parts = {f.name: getattr(inputs, f.name)[lo:hi] for f in fields(inputs) if f.name not in paired}
    for name, values in _PAIRED.items():
        pairs = getattr(inputs, name)
        sel = (pairs[:, 0] >= lo) & (pairs[:, 0] < hi)
        parts[name] = pairs[sel] - np.array([lo, 0], dtype=pairs.dtype)
        if values:
            parts[values] = getattr(inputs, values)[sel]
    return DrawInputs(**parts)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kogpt2-draw")


class Sampler(Protocol):
    """What :mod:`kogpt2.generation` needs from a sampler."""

    traces: int

    @property
    def xla_compiles(self) -> int: ...

    def draw(self, logits: Any, inputs: DrawInputs, rules: VocabRules) -> tuple[np.ndarray, np.ndarray]: ...


def sorted_draw(
    vals: np.ndarray, ids: np.ndarray, k: np.ndarray, top_p: np.ndarray, u: np.ndarray, total: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF draw from the nucleus of candidates already ranked (prob desc, id asc).

    Args:
        vals: ``(S, K)`` logits (temperature applied), ranked; -inf for no candidate.
        ids: ``(S, K)`` their token ids.
        k: ``(S,)`` candidates per row (the rest are ignored).
        top_p: ``(S,)`` nucleus mass.
        u: ``(S,)`` uniforms.
        total: ``(S,)`` mass of the whole row relative to its best token (``sum exp(z - max)``),
            when the candidates are only its best K; None: the candidates are all there is.

    Returns:
        ``(S,)`` int64 tokens, and ``(S,)`` bool: the nucleus closed within the candidates
        (always true without ``total``); rows where it did not need a wider draw.
    """
    rank = np.arange(vals.shape[1])[None, :]
    valid = (rank < k[:, None]) & np.isfinite(vals)
    top = np.where(np.isfinite(vals[:, :1]), vals[:, :1], 0.0)
    p = np.where(valid, np.exp(np.where(valid, vals - top, 0.0).astype(np.float64)), 0.0)  # (S, K)
    cum = np.cumsum(p, axis=1)
    whole = cum[:, -1] if total is None else total
    keep = valid & ((cum - p < top_p[:, None] * whole[:, None]) | (rank == 0))
    closed = np.ones(len(vals), dtype=bool) if total is None else ~keep[:, -1] | (cum[:, -1] >= top_p * whole)
    kept = np.cumsum(np.where(keep, p, 0.0), axis=1)
    pick = (kept <= (u * kept[:, -1])[:, None]).sum(axis=1)
    pick = np.minimum(pick, np.where(keep, rank, 0).max(axis=1))
    return ids[np.arange(len(vals)), pick].astype(np.int64), closed


class HostSampler:
    """The draw in numpy, from logits a decoder step left in TensorFlow (read without a copy).

    One pass per row computes ``exp(x - max)`` into a reused buffer: its row sums give the
    scores' log normalizer, and, after the constraints zero or rewrite their few entries,
    its 256-token block sums and the acceptance test give the top-p draw. Greedy, top-k,
    inside-a-character and unresolved rows are drawn exactly from a masked copy of their
    logits.

    Rows are independent, so a batch is cut into contiguous parts drawn side by side on
    ``threads`` threads (numpy releases the GIL in its loops); the tokens are the same as in
    one part (tested).

    Args:
        vocab: logits width ``V``.
        scores: compute the log-probability of each drawn token (False returns zeros).
        threads: threads for one batch; None: the CPUs this process may use. Each takes at
            least :data:`MIN_ROWS_PER_THREAD` rows.
    """

    traces = 0  # nothing is compiled
    xla_compiles = 0

    def __init__(self, vocab: int, *, scores: bool = True, threads: int | None = None) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r}: must be an integer >= 1")
        self.vocab = int(vocab)
        self.scores = scores
        self.threads = usable_cpus() if threads is None else threads
        self._buf = np.empty((0, self.vocab), dtype=np.float32)

    def draw(self, logits: Any, inputs: DrawInputs, rules: VocabRules) -> tuple[np.ndarray, np.ndarray]:
        """Draw one token per row.

        Args:
            logits: ``(R, V)`` float32 logits (a TensorFlow tensor or an array), raw from the model.
            inputs: the rows' settings, random numbers and constraints.
            rules: what the batch shares.

        Returns:
            ``(R,)`` int64 tokens and ``(R,)`` float64 log-probabilities of those tokens under
            the raw logits (before penalties, bans, temperature and cuts; zeros without scores).
        """
        x = np.asarray(logits, dtype=np.float32)  # (R, V); a view of the tensor: never written
        rows = x.shape[0]
        if self._buf.shape[0] < rows:
            self._buf = np.empty((rows, self.vocab), dtype=np.float32)
        parts = min(self.threads, rows // MIN_ROWS_PER_THREAD)
        if parts <= 1:
            return self._draw(x, inputs, rules, self._buf[:rows])
        bounds = [rows * i // parts for i in range(parts + 1)]
        futures = [
            _pool(self.threads).submit(self._draw, x[lo:hi], take_rows(inputs, lo, hi), rules, self._buf[lo:hi])
            for lo, hi in zip(bounds, bounds[1:], strict=False)
        ]
        drawn = [f.result() for f in futures]
        return np.concatenate([t for t, _ in drawn]), np.concatenate([lp for _, lp in drawn])

    def _draw(
        self, x: np.ndarray, inputs: DrawInputs, rules: VocabRules, buf: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`draw` for one part of a batch, ``buf`` its rows' scratch space."""
        rows = x.shape[0]
        sampling = ~inputs.greedy & (inputs.temperature >= MIN_TEMPERATURE) & ~inputs.idle
        top_k = sampling & (inputs.top_k > 0) & (inputs.top_k < self.vocab)
        inside = ~inputs.allowed_bytes[:, 256]  # rows inside a character: a few byte pieces allowed
        fast = sampling & ~top_k & ~inside
        inv_t = np.where(fast, 1.0 / np.maximum(inputs.temperature, MIN_TEMPERATURE), 1.0).astype(np.float32)
        top = x.max(axis=1)  # (R,)
        e = np.subtract(x, top[:, None], out=buf)  # (R, V)
        # The first index where x == top (x - top is exactly 0 there and only there): a greedy row's
        # token when no constraint touches it. Taken from e: numpy copies a read-only x to argmax it.
        best = e.argmax(axis=1)
        logz = np.zeros(rows)
        scaled = np.flatnonzero(inv_t != 1.0)  # rows drawn from exp((x - top) / T): their scores need exp(x - top)
        for r in scaled.tolist():  # row by row, in place: no copy of the rows
            if self.scores:
                logz[r] = top[r] + np.log(float(np.exp(e[r]).sum()))
            e[r] *= inv_t[r]
        np.exp(e, out=e)  # (R, V) in (0, 1]
        if self.scores:
            plain = inv_t == 1.0
            sums = e.sum(axis=1).astype(np.float64)  # float32, pairwise; every row (no copy), the plain ones used
            logz[plain] = top[plain] + np.log(sums[plain])
        tokens = np.full(rows, -1, dtype=np.int64)
        fast_rows = np.flatnonzero(fast)
        if len(fast_rows):
            self._constrain(e, x, top, inv_t, fast, inputs, rules)
            tokens[fast_rows] = self._nucleus(e, fast_rows, inputs)
        tokens[inputs.idle] = 0
        pending = np.flatnonzero(tokens < 0)
        stands = pending[_best_stands(best, pending, inputs, rules) & np.isfinite(top[pending])]
        tokens[stands] = best[stands]
        exact = np.flatnonzero(tokens < 0)
        if len(exact):
            tokens[exact] = self._exact(x, exact, inputs, rules)
        logprobs = x[np.arange(rows), tokens] - logz if self.scores else np.zeros(rows)
        return tokens, logprobs.astype(np.float64)

    def _constrain(
        self,
        e: np.ndarray,
        x: np.ndarray,
        top: np.ndarray,
        inv_t: np.ndarray,
        fast: np.ndarray,
        inputs: DrawInputs,
        rules: VocabRules,
    ) -> None:
        """Apply the penalties and bans to ``e`` (``exp((x - top) * inv_t)``) in place, for the ``fast`` rows."""
        pen = inputs.penalized[fast[inputs.penalized[:, 0]]] if len(inputs.penalized) else inputs.penalized
        if len(pen):
            r, t = pen[:, 0], pen[:, 1]
            factor = inputs.penalty[fast[inputs.penalized[:, 0]]]
            v = x[r, t]
            e[r, t] = np.exp((np.where(v > 0, v / factor, v * factor) - top[r]) * inv_t[r])
        if len(rules.banned_ids):
            e[:, rules.banned_ids] = 0.0
        for banned, same in _byte_bans(inputs.allowed_bytes, np.flatnonzero(fast), rules):
            e[np.ix_(same, banned)] = 0.0
        e[np.flatnonzero(fast & inputs.ban_eos), rules.eos_id] = 0.0
        if len(inputs.banned):
            e[inputs.banned[:, 0], inputs.banned[:, 1]] = 0.0

    def _nucleus(self, e: np.ndarray, rows: np.ndarray, inputs: DrawInputs) -> np.ndarray:
        """Top-p draws for ``rows`` of ``e`` (their unnormalized probabilities); -1 where unresolved."""
        vocab = self.vocab
        full = vocab // _BLOCK * _BLOCK
        sums = [e[:, :full].reshape(len(e), full // _BLOCK, _BLOCK).sum(axis=2)]  # (R, nb), every row: no copy
        if full < vocab:
            sums.append(e[:, full:].sum(axis=1)[:, None])
        block_sums = np.concatenate(sums, axis=1)[rows].astype(np.float64)  # (F, nb)
        cdf = np.cumsum(block_sums, axis=1)
        total = cdf[:, -1]
        last_block = np.where(block_sums > 0, np.arange(block_sums.shape[1])[None, :], 0).max(axis=1)
        out = np.full(len(rows), -1, dtype=np.int64)
        pending = np.flatnonzero(np.isfinite(total) & (total > _TINY))  # positions in rows
        top_p = inputs.top_p[rows].astype(np.float64)
        lane = np.arange(_BLOCK)
        for attempt in range(MAX_ATTEMPTS):
            if len(pending) == 0:
                break
            r = rows[pending]
            target = inputs.uniforms[r, attempt] * total[pending]  # (P,)
            blk = np.minimum((cdf[pending] <= target[:, None]).sum(axis=1), last_block[pending])
            cols = blk[:, None] * _BLOCK + lane[None, :]  # (P, 256)
            block = np.where(cols < vocab, e[r[:, None], np.minimum(cols, vocab - 1)], 0.0)
            before = np.where(blk > 0, cdf[pending, np.maximum(blk - 1, 0)], 0.0)
            within = before[:, None] + np.cumsum(block, axis=1, dtype=np.float64)
            j = (within <= target[:, None]).sum(axis=1)
            j = np.maximum(np.minimum(j, np.where(block > 0, lane[None, :], -1).max(axis=1)), 0)
            cand = blk * _BLOCK + j
            pc = block[np.arange(len(pending)), j]
            accept = top_p[pending] >= 1.0
            for i in np.flatnonzero(~accept).tolist():  # mass of the tokens ranked before the candidate
                row, c, v = e[r[i]], int(cand[i]), pc[i]
                mass = float(row @ (row > v).astype(np.float32)) + float(v) * np.count_nonzero(row[:c] == v)
                accept[i] = mass < top_p[pending[i]] * total[pending[i]]
            out[pending[accept]] = cand[accept]
            pending = pending[~accept]
        return out

    def _exact(self, x: np.ndarray, rows: np.ndarray, inputs: DrawInputs, rules: VocabRules) -> np.ndarray:
        """Greedy, top-k, inside-a-character and unresolved rows, drawn from a masked copy of their logits."""
        z = x[rows].copy()  # (S, V)
        position = np.full(len(x), -1)
        position[rows] = np.arange(len(rows))
        for pairs, factors in ((inputs.penalized, inputs.penalty), (inputs.banned, None)):
            i = position[pairs[:, 0]] if len(pairs) else np.zeros(0, dtype=np.int64)
            sel = i >= 0
            i, t = i[sel], pairs[sel, 1]
            if factors is None:
                z[i, t] = -np.inf
            elif len(i):
                v, f = z[i, t], factors[sel]
                z[i, t] = np.where(v > 0, v / f, v * f)
        if len(rules.banned_ids):
            z[:, rules.banned_ids] = -np.inf
        allowed = inputs.allowed_bytes[rows]  # (S, 257)
        for i in np.flatnonzero(~allowed[:, 256]).tolist():  # inside a character: only its next bytes
            z[i, ~allowed[i][rules.byte_of]] = -np.inf
        for banned, same in _byte_bans(allowed, np.flatnonzero(allowed[:, 256]), rules):  # elsewhere: a few bytes
            z[np.ix_(same, banned)] = -np.inf
        z[inputs.ban_eos[rows], rules.eos_id] = -np.inf
        out = np.argmax(z, axis=1).astype(np.int64)  # greedy rows, and rows with nothing allowed
        sampling = ~inputs.greedy[rows] & (inputs.temperature[rows] >= MIN_TEMPERATURE) & np.isfinite(z.max(axis=1))
        s = np.flatnonzero(sampling)
        if len(s):
            out[s] = self._sorted(z[s] / inputs.temperature[rows[s], None], rows[s], inputs)
        return out

    def _sorted(self, z: np.ndarray, rows: np.ndarray, inputs: DrawInputs) -> np.ndarray:
        """Exact draws for ``rows`` from their masked, tempered logits ``z`` ``(S, V)``: top-k, then top-p."""
        k = inputs.top_k[rows].astype(np.int64)
        top_p = inputs.top_p[rows].astype(np.float64)
        cut = (k > 0) & (k < self.vocab)
        u = np.where(cut, inputs.uniforms[rows, 0], inputs.uniforms[rows, MAX_ATTEMPTS])
        width = max(int(k[cut].max()) if cut.any() else 1, 1 if cut.all() else min(SORTED_CANDIDATES, self.vocab))
        vals, ids = _top_k(z, width)
        out = np.empty(len(rows), dtype=np.int64)
        if cut.any():
            c = np.flatnonzero(cut)
            out[c], _ = sorted_draw(vals[c], ids[c], k[c], top_p[c], u[c])
        if not cut.all():  # the nucleus of the whole row: among the best candidates if it fits there
            n = np.flatnonzero(~cut)
            out[n], closed = sorted_draw(vals[n], ids[n], np.full(len(n), width), top_p[n], u[n], _mass(z[n]))
            for i in n[~closed].tolist():  # it does not: sort the row
                order = np.argsort(-z[i], kind="stable")
                out[i] = sorted_draw(
                    z[i, order][None], order[None], np.array([self.vocab]), top_p[i, None], u[i, None]
                )[0][0]
        return out


def _best_stands(best: np.ndarray, rows: np.ndarray, inputs: DrawInputs, rules: VocabRules) -> np.ndarray:
    """``(len(rows),)`` bool: the row takes the best token and no constraint touches it.

    Such a row's token is ``best`` itself: the masked argmax of :meth:`HostSampler._exact`
    would only find it again after copying the whole row (the first maximum stays the first
    when only other tokens are masked or lowered). True for greedy rows whose best token is
    allowed (vocabulary, bytes, ``</s>``, n-gram bans) and not under the repetition penalty,
    in a row whose penalties only lower tokens (factors >= 1).
    """
    t = best[rows]
    ok = inputs.greedy[rows] | (inputs.temperature[rows] < MIN_TEMPERATURE)
    ok &= rules.static_ok[t]
    ok &= inputs.allowed_bytes[rows, rules.byte_of[t]]  # column 256: pieces that are not bytes
    ok &= ~(inputs.ban_eos[rows] & (t == rules.eos_id))
    position = np.full(len(best), -1)
    position[rows] = np.arange(len(rows))
    for pairs, touched in (
        (inputs.banned, lambda r, tok: tok == best[r]),
        (inputs.penalized, lambda r, tok: (tok == best[r]) | (inputs.penalty < 1.0)),
    ):
        if len(pairs):
            r, tok = pairs[:, 0], pairs[:, 1]
            at = position[r[touched(r, tok)]]
            ok[at[at >= 0]] = False
    return ok


def _byte_bans(allowed: np.ndarray, rows: np.ndarray, rules: VocabRules) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(banned byte-piece ids, rows)`` for each distinct allowed-byte pattern among ``rows`` of ``allowed``."""
    groups: dict[bytes, list[int]] = {}
    packed = np.packbits(allowed[rows, :256], axis=1)  # (n, 32): rows nearly always share one pattern
    for i, key in enumerate(packed):
        groups.setdefault(key.tobytes(), []).append(int(rows[i]))
    out = []
    for members in groups.values():
        pattern = allowed[members[0], :256]
        banned = rules.byte_tokens[~pattern & (rules.byte_tokens >= 0)]
        if len(banned):
            out.append((banned, np.array(members)))
    return out


def _top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(S, k)`` best values and ids per row, ranked (value desc, id asc), by TensorFlow's top-k kernel."""
    from kogpt2.tf_setup import import_tf

    vals, ids = import_tf().math.top_k(z, k=k, sorted=True)  # far faster than a numpy partition of 50,000
    return vals.numpy(), ids.numpy().astype(np.int64)


def _mass(z: np.ndarray) -> np.ndarray:
    """``(S,)`` ``sum exp(z - max)`` per row (float64)."""
    top = z.max(axis=1, keepdims=True)
    return np.exp(z - np.where(np.isfinite(top), top, 0.0)).sum(axis=1, dtype=np.float64)
