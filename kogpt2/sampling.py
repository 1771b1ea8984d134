"""Pure logits processors and per-row reproducible token selection (numpy).

Everything here works on a batch of next-token logits ``(B, V)`` float32 and is a
function of each row alone: a row's choice depends on its logits, its history and
its ``row_seed`` (plus the step number), never on the other rows of the batch.
Random draws come from a counter-based hash of ``(row_seed, step, attempt)``, so
the same row gives the same token whatever batch it lands in.

Nucleus (top-p) sampling without a sort over the vocabulary: a token is drawn from
the full distribution by inverse CDF and accepted when it belongs to the nucleus
(the probability mass of the tokens ranked before it is < top_p: the nucleus is the smallest set of best tokens holding top_p). The accepted
token is an exact draw from the renormalized nucleus; acceptance has probability
>= top_p, so it takes about 1/top_p tries. Rows still unresolved after
:data:`MAX_ATTEMPTS` tries (a small top_p) fall back to an exact sort.

Tokens are ranked by probability, descending, then by id, ascending: this decides
ties at the nucleus boundary and makes ``top_k=1`` and a tiny ``top_p`` greedy.
"""

from __future__ import annotations

import hashlib

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAX_ATTEMPTS = 16
#: Below this temperature, sampling is greedy: dividing float32 logits by a smaller one
#: overflows to inf (and inf - inf is NaN), while the limit of softmax(x / T) as T -> 0
#: is the argmax anyway.
MIN_TEMPERATURE = 1e-4
_BLOCK = 256
_INT63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


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


def uniforms(row_seeds: np.ndarray, step: int, attempt: int = 0) -> np.ndarray:
    """One uniform draw in [0, 1) per row, a pure function of ``(row_seed, step, attempt)``.

    Args:
        row_seeds: ``(B,)`` non-negative integer seeds.
        step: generation step (0-based).
        attempt: retry number within a step (0 .. 1023).

    Returns:
        ``(B,)`` float64 values in [0, 1).
    """
    seeds = np.asarray(row_seeds, dtype=np.uint64)
    counter = np.uint64(((int(step) * 1024 + int(attempt) + 1) * _GOLDEN) & ((1 << 64) - 1))
    z = _mix64(_mix64(seeds) + counter)
    return (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, lengths: np.ndarray, penalty: float) -> None:
    """Penalize tokens already in each row's history, in place (CTRL / transformers rule).

    A seen token's logit is divided by ``penalty`` when positive and multiplied when
    negative, so ``penalty > 1`` makes repeats less likely.

    Args:
        logits: ``(B, V)`` float logits, modified in place.
        history: ``(B, C)`` token ids; row ``b`` holds ``lengths[b]`` real ids at the front.
        lengths: ``(B,)`` number of real ids per row.
        penalty: 1.0 = no change.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return
    valid = np.arange(history.shape[1])[None, :] < lengths[:, None]  # (B, C)
    rows = np.nonzero(valid)[0]
    toks = history[valid]
    vals = logits[rows, toks]
    logits[rows, toks] = np.where(vals > 0, vals / penalty, vals * penalty)


def ban_repeated_ngrams(logits: np.ndarray, history: np.ndarray, lengths: np.ndarray, n: int) -> None:
    """Forbid tokens that would repeat an n-gram already in each row's history, in place.

    Args:
        logits: ``(B, V)`` float logits; banned entries become ``-inf``.
        history: ``(B, C)`` token ids, ``lengths[b]`` real ids at the front of row ``b``.
        lengths: ``(B,)`` number of real ids per row.
        n: n-gram size; 0 = off.
    """
    cap = history.shape[1]
    if n <= 0 or cap < n:
        return
    windows = sliding_window_view(history, n, axis=1)  # (B, W, n), W = C - n + 1
    idx = lengths[:, None] - (n - 1) + np.arange(n - 1)[None, :]  # (B, n-1): the current suffix
    suffix = np.take_along_axis(history, np.clip(idx, 0, cap - 1), axis=1)
    complete = np.arange(windows.shape[1])[None, :] + n <= lengths[:, None]  # (B, W)
    match = complete & np.all(windows[:, :, : n - 1] == suffix[:, None, :], axis=2)
    rows, starts = np.nonzero(match)
    logits[rows, windows[rows, starts, n - 1]] = -np.inf


def _search(cdf: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the first index whose cumulative mass exceeds ``targets[row]`` (clamped to the row)."""
    out = np.empty(cdf.shape[0], dtype=np.int64)
    last = cdf.shape[1] - 1
    for r in range(cdf.shape[0]):
        out[r] = min(int(np.searchsorted(cdf[r], targets[r], side="right")), last)
    return out


class _BlockCDF:
    """Inverse-CDF lookups over ``(B, V)`` probabilities without a full cumulative sum.

    Block sums (``_BLOCK`` tokens each) locate the block; a cumulative sum inside that
    one block locates the token. Same result as a full cumsum, up to rounding.
    """

    def __init__(self, p: np.ndarray) -> None:
        batch, vocab = p.shape
        full = vocab // _BLOCK * _BLOCK
        sums = [p[:, :full].reshape(batch, full // _BLOCK, _BLOCK).sum(axis=2, dtype=np.float64)]  # (B, nb)
        if full < vocab:
            sums.append(p[:, full:].sum(axis=1, dtype=np.float64)[:, None])
        self.p = p
        self.block_cdf = np.cumsum(np.concatenate(sums, axis=1), axis=1)  # (B, nb[+1])
        self.total = self.block_cdf[:, -1]  # (B,)

    def search(self, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Token id per row in ``rows`` at cumulative mass ``targets`` (a row-local computation)."""
        out = np.empty(len(rows), dtype=np.int64)
        vocab = self.p.shape[1]
        for i, (r, t) in enumerate(zip(rows.tolist(), targets.tolist(), strict=True)):
            cdf = self.block_cdf[r]
            b = min(int(np.searchsorted(cdf, t, side="right")), len(cdf) - 1)
            lo = b * _BLOCK
            within = np.cumsum(self.p[r, lo : min(lo + _BLOCK, vocab)], dtype=np.float64)
            within += cdf[b - 1] if b else 0.0
            j = lo + min(int(np.searchsorted(within, t, side="right")), len(within) - 1)
            if self.p[r, j] <= 0:  # rounding at the very end of the mass: the last possible token
                j = int(np.flatnonzero(self.p[r])[-1])
            out[i] = j
        return out


def _exp_rows(x: np.ndarray) -> np.ndarray:
    """Unnormalized probabilities ``exp(x - max)`` per row; rows with no finite logit get all zeros."""
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.exp(x - m).astype(np.float32, copy=False)


def _draw_sorted(p_sorted: np.ndarray, ids_sorted: np.ndarray, top_p: float, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw from the nucleus of candidates already ranked (prob desc, id asc).

    Args:
        p_sorted: ``(R, K)`` unnormalized probabilities, ranked.
        ids_sorted: ``(R, K)`` token ids, same order.
        top_p: nucleus mass relative to the candidates' total.
        u: ``(R,)`` uniforms.
    """
    cum = np.cumsum(p_sorted, axis=1, dtype=np.float64)  # (R, K)
    total = cum[:, -1]
    before = cum - p_sorted  # mass ranked before each candidate
    keep = before < top_p * total[:, None]
    keep[:, 0] = True
    kept = np.where(keep, p_sorted, 0.0)
    kept_cdf = np.cumsum(kept, axis=1, dtype=np.float64)
    pick = _search(kept_cdf, u * kept_cdf[:, -1])
    return ids_sorted[np.arange(len(pick)), pick]


def _nucleus_by_sort(x: np.ndarray, top_p: float, u: np.ndarray) -> np.ndarray:
    """Exact nucleus draw by a full sort (fallback for small top_p)."""
    order = np.argsort(-x, axis=1, kind="stable")  # prob desc, id asc
    p = _exp_rows(np.take_along_axis(x, order, axis=1))
    return _draw_sorted(p, order, top_p, u)


def sample_nucleus(x: np.ndarray, top_p: float, row_seeds: np.ndarray, step: int) -> np.ndarray:
    """Draw one token per row from the top-p nucleus of ``softmax(x)`` (top_p = 1: plain sampling).

    Args:
        x: ``(B, V)`` logits (temperature already applied).
        top_p: nucleus mass in (0, 1].
        row_seeds: ``(B,)`` per-row seeds.
        step: generation step.

    Returns:
        ``(B,)`` int64 token ids.
    """
    batch = x.shape[0]
    p = _exp_rows(x)  # (B, V)
    cdf = _BlockCDF(p)
    tokens = np.full(batch, -1, dtype=np.int64)
    empty = cdf.total <= 0  # every token banned
    if empty.any():
        tokens[empty] = np.argmax(x[empty], axis=1)
    pending = np.nonzero(~empty)[0]
    for attempt in range(MAX_ATTEMPTS if top_p < 1.0 else 1):
        if len(pending) == 0:
            break
        cand = cdf.search(pending, uniforms(row_seeds[pending], step, attempt) * cdf.total[pending])
        if top_p >= 1.0:
            tokens[pending] = cand
            pending = pending[:0]
            break
        mass_before = np.empty(len(pending), dtype=np.float64)
        for i, (r, c) in enumerate(zip(pending.tolist(), cand.tolist(), strict=True)):
            row = p[r]  # (V,)
            pc = row[c]
            # mass of the tokens ranked before c: higher probability, or equal and a lower id
            mass_before[i] = float(row @ (row > pc).astype(np.float32)) + float(pc) * np.count_nonzero(row[:c] == pc)
        accept = mass_before < top_p * cdf.total[pending]
        tokens[pending[accept]] = cand[accept]
        pending = pending[~accept]
    if len(pending):
        tokens[pending] = _nucleus_by_sort(x[pending], top_p, uniforms(row_seeds[pending], step, MAX_ATTEMPTS))
    return tokens


def sample_top_k(x: np.ndarray, top_k: int, top_p: float, row_seeds: np.ndarray, step: int) -> np.ndarray:
    """Draw one token per row among its ``top_k`` best, then within their top-p nucleus.

    Args:
        x: ``(B, V)`` logits (temperature already applied).
        top_k: candidates per row (< V).
        top_p: nucleus mass among the candidates, in (0, 1].
        row_seeds: ``(B,)`` per-row seeds.
        step: generation step.

    Returns:
        ``(B,)`` int64 token ids.
    """
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    # TF's top-k kernel is far faster than a numpy partition over 50,000 logits, and
    # ranks equal values by the lower index first, as the rest of this module does.
    vals, ids_sorted = tf.math.top_k(x, k=top_k, sorted=True)  # (B, k), prob desc, id asc
    p_sorted = _exp_rows(vals.numpy())
    return _draw_sorted(p_sorted, ids_sorted.numpy().astype(np.int64), top_p, uniforms(row_seeds, step, 0))


def select_tokens(
    logits: np.ndarray,
    *,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    row_seeds: np.ndarray,
    step: int,
) -> np.ndarray:
    """Pick the next token of every row (after penalties and bans were applied to ``logits``).

    Args:
        logits: ``(B, V)`` float32 logits.
        greedy: take the best token (ties: the lowest id).
        temperature: divides the logits before sampling; below :data:`MIN_TEMPERATURE`
            the best token is taken (the limit of sampling as the temperature goes to 0).
        top_k: 0 = no cut.
        top_p: 1.0 = no cut.
        row_seeds: ``(B,)`` per-row seeds.
        step: generation step.

    Returns:
        ``(B,)`` int64 token ids.
    """
    if greedy or temperature < MIN_TEMPERATURE:
        return np.argmax(logits, axis=1).astype(np.int64)
    x = logits / np.float32(temperature) if temperature != 1.0 else logits
    if 0 < top_k < x.shape[1]:
        return sample_top_k(x, top_k, top_p, row_seeds, step)
    return sample_nucleus(x, top_p, row_seeds, step)
