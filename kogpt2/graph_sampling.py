"""The token draw as one XLA function (``--sampler graph``): for accelerators, where logits should stay put.

Same inputs, rules and algorithm as the host sampler (inverse CDF over 256-token block sums,
acceptance when the mass ranked before the candidate is < top_p, an exact sorted draw for
top-k rows and for the few nucleus rows still unresolved after :data:`MAX_ATTEMPTS` tries),
so both draw the same tokens up to floating-point rounding; here the logits never leave
TensorFlow, so on a GPU worker the ``(batch, 50,000)`` logits of each step are not copied to
the host (51 MB a step at batch 256). On the 2-core CPU this project measures on, XLA ran
these passes single-threaded and its compare-and-sum pass slower than numpy's (16.6-17.7
against 9.3 ms a step, docs/BENCHMARKS.md), so the host sampler is the default; it was not
measured on a GPU. ``benchmarks/generate.py --sampler host graph`` compares them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kogpt2.sampling import BYTE_COLUMNS, DRAWS, MAX_ATTEMPTS, MIN_TEMPERATURE, DrawInputs, VocabRules, not_in

_BLOCK = 256


class GraphSampler:
    """Compiled token selection over ``(R, V)`` logits held by TensorFlow.

    Three functions, each traced once (shapes are dynamic): an optional graph-mode edit
    (repetition penalty, banned n-grams: sparse updates), the main draw as one XLA function
    (masks, temperature, log normalizer, greedy and the top-p draw; compiled once per batch
    size), and a graph-mode sorted draw for the rows that need it.

    Args:
        vocab: logits width ``V``.
        scores: compute the log-probability of each drawn token (False returns zeros).
    """

    def __init__(self, vocab: int, *, scores: bool = True) -> None:
        from kogpt2.tf_setup import import_tf

        tf = self._tf = import_tf()
        self.vocab = int(vocab)
        self.scores = scores
        self.traces = 0  # graph traces (each function once: shapes are dynamic)
        self._sizes: set[int] = set()  # batch sizes the XLA draw has seen (one compile each)
        f32, i32, f64, b = tf.float32, tf.int32, tf.float64, tf.bool
        rows_v = tf.TensorSpec([None, self.vocab], f32)
        rules = [tf.TensorSpec([self.vocab], b), tf.TensorSpec([self.vocab], i32), tf.TensorSpec([], i32)]
        self._edit = tf.function(
            self._edit_fn,
            input_signature=[
                rows_v,  # logits (R, V)
                tf.TensorSpec([None, 2], i32),  # penalized (N, 2)
                tf.TensorSpec([None], f32),  # penalty (N,)
                tf.TensorSpec([None, 2], i32),  # banned (M, 2)
            ],
        )
        self._draw = tf.function(
            self._draw_fn,
            jit_compile=True,
            input_signature=[
                rows_v,  # raw logits x (R, V): scores are under the model's own distribution
                rows_v,  # edited logits y (R, V)
                tf.TensorSpec([None], b),  # edited (R,): y differs from x in this row
                *rules,  # static_ok (V,), byte_of (V,), eos_id
                tf.TensorSpec([None, BYTE_COLUMNS], b),  # allowed_bytes (R, 257)
                tf.TensorSpec([None], b),  # ban_eos (R,)
                tf.TensorSpec([None], b),  # sample (R,): draw from the nucleus
                tf.TensorSpec([None], b),  # idle (R,): no token needed; else (not sampled) the best
                tf.TensorSpec([None], f32),  # temperature (R,)
                tf.TensorSpec([None], f32),  # top_p (R,)
                tf.TensorSpec([None, DRAWS], f64),  # uniforms (R, DRAWS)
            ],
        )
        self._sorted = tf.function(
            self._sorted_fn,
            input_signature=[
                rows_v,  # x
                rows_v,  # y
                tf.TensorSpec([None], i32),  # rows (S,): which rows of x / y
                *rules,
                tf.TensorSpec([None, BYTE_COLUMNS], b),  # allowed_bytes (S, 257)
                tf.TensorSpec([None], b),  # ban_eos (S,)
                tf.TensorSpec([None], f32),  # temperature (S,)
                tf.TensorSpec([None], i32),  # k (S,): candidates per row
                tf.TensorSpec([None], f32),  # top_p (S,)
                tf.TensorSpec([None], f64),  # uniform (S,)
                tf.TensorSpec([], i32),  # kmax
            ],
        )

    @property
    def xla_compiles(self) -> int:
        """XLA compiles of the draw so far: one per batch size."""
        return len(self._sizes)

    # -- graph pieces -------------------------------------------------------------
    def _allowed(self, static_ok: Any, byte_of: Any, eos_id: Any, allowed_bytes: Any, ban_eos: Any) -> Any:
        """``(R, V)`` bool: the tokens each row may draw."""
        tf = self._tf
        ok = static_ok[None, :] & tf.gather(allowed_bytes, byte_of, axis=1)  # (R, V)
        is_eos = tf.range(self.vocab) == eos_id  # (V,)
        return ok & ~(ban_eos[:, None] & is_eos[None, :])

    def _edit_fn(self, x: Any, penalized: Any, penalty: Any, banned: Any) -> Any:
        """``x`` with penalized and banned entries rewritten (one copy; the pairs are distinct)."""
        tf = self._tf
        self.traces += 1
        vals = tf.gather_nd(x, penalized)  # (N,)
        new = tf.where(vals > 0, vals / penalty, vals * penalty)
        updates = tf.concat([new, tf.fill(tf.shape(banned)[:1], -np.inf)], 0)
        return tf.tensor_scatter_nd_update(x, tf.concat([penalized, banned], 0), updates)  # (R, V)

    def _draw_fn(
        self,
        x: Any,
        y: Any,
        edited: Any,
        static_ok: Any,
        byte_of: Any,
        eos_id: Any,
        allowed_bytes: Any,
        ban_eos: Any,
        sample: Any,
        idle: Any,
        temperature: Any,
        top_p: Any,
        u: Any,
    ) -> Any:
        tf = self._tf
        self.traces += 1
        f64, i32 = tf.float64, tf.int32
        rows, vocab = tf.shape(x)[0], self.vocab
        full, blocks = vocab // _BLOCK, -(-vocab // _BLOCK)
        ok = self._allowed(static_ok, byte_of, eos_id, allowed_bytes, ban_eos)  # (R, V)
        ym = tf.where(ok, y, -np.inf)
        top = tf.reduce_max(ym, axis=1)  # (R,) best allowed logit
        top = tf.where(tf.math.is_finite(top), top, 0.0)
        inv_t = tf.where(sample, 1.0 / temperature, 1.0)  # (R,)
        e = tf.exp((y - top[:, None]) * inv_t[:, None])  # (R, V): <= 1 where allowed
        p = tf.where(ok, e, 0.0)
        if self.scores:  # log normalizer of the raw logits, from the same exp where the row allows it
            shared = top + tf.math.log(tf.reduce_sum(e, axis=1))
            own = ~edited & (inv_t == 1.0) & tf.math.is_finite(shared)
            logz = tf.cond(
                tf.reduce_all(own), lambda: shared, lambda: tf.where(own, shared, tf.reduce_logsumexp(x, axis=1))
            )
        else:
            logz = tf.zeros([rows])
        sums = [tf.reduce_sum(tf.reshape(p[:, : full * _BLOCK], [rows, full, _BLOCK]), axis=2)]
        if full < blocks:
            sums.append(tf.reduce_sum(p[:, full * _BLOCK :], axis=1, keepdims=True))
        block_sums = tf.cast(tf.concat(sums, axis=1), f64)  # (R, nb)
        cdf = tf.math.cumsum(block_sums, axis=1)
        total = cdf[:, -1]  # (R,)
        last_block = tf.reduce_max(tf.where(block_sums > 0, tf.range(blocks)[None, :], 0), axis=1)
        ids = tf.range(vocab)[None, :]
        top_p64 = tf.cast(top_p, f64)
        pending = sample & (total > 0)
        best = tf.cond(
            tf.reduce_any(~pending & ~idle),
            lambda: tf.argmax(ym, axis=1, output_type=i32),  # ties to the lowest id
            lambda: tf.zeros([rows], i32),
        )
        tokens = tf.where(pending, -1, tf.where(idle, 0, best))

        def candidate(a: Any) -> tuple[Any, Any]:
            """Inverse-CDF token at mass ``u[:, a] * total``, and its probability."""
            target = u[:, a] * total  # (R,)
            blk = tf.minimum(tf.reduce_sum(tf.cast(cdf <= target[:, None], i32), axis=1), last_block)
            cols = blk[:, None] * _BLOCK + tf.range(_BLOCK)[None, :]  # (R, 256)
            block = tf.where(cols < vocab, tf.gather(p, tf.minimum(cols, vocab - 1), batch_dims=1), 0.0)
            before = tf.where(blk > 0, tf.gather(cdf, tf.maximum(blk - 1, 0), batch_dims=1), 0.0)
            within = before[:, None] + tf.math.cumsum(tf.cast(block, f64), axis=1)  # (R, 256)
            j = tf.reduce_sum(tf.cast(within <= target[:, None], i32), axis=1)
            last = tf.reduce_max(tf.where(block > 0, tf.range(_BLOCK)[None, :], -1), axis=1)
            j = tf.maximum(tf.minimum(j, last), 0)  # rounding at the very end of the mass
            return blk * _BLOCK + j, tf.gather(block, j, batch_dims=1)

        def attempt(a: Any, tokens: Any, pending: Any) -> Any:
            cand, pc = candidate(a)

            def mass_before() -> Any:  # mass of the tokens ranked before each candidate
                ranked = (p > pc[:, None]) | ((p == pc[:, None]) & (ids < cand[:, None]))
                return tf.reduce_sum(tf.where(ranked, tf.cast(p, f64), 0.0), axis=1)

            need_rank = tf.reduce_any(pending & (top_p < 1.0))
            mass = tf.cond(need_rank, mass_before, lambda: tf.zeros([rows], f64))
            accept = pending & ((top_p >= 1.0) | (mass < top_p64 * total))
            return a + 1, tf.where(accept, cand, tokens), pending & ~accept

        _, tokens, _ = tf.while_loop(
            lambda a, t, pend: (a < MAX_ATTEMPTS) & tf.reduce_any(pend), attempt, [tf.constant(0), tokens, pending]
        )
        x_at = tf.gather(x, tf.maximum(tokens, 0), batch_dims=1)
        return tokens, x_at, logz  # (R,) -1 where unresolved, (R,), (R,)

    def _sorted_fn(
        self,
        x: Any,
        y: Any,
        rows: Any,
        static_ok: Any,
        byte_of: Any,
        eos_id: Any,
        allowed_bytes: Any,
        ban_eos: Any,
        temperature: Any,
        k: Any,
        top_p: Any,
        u: Any,
        kmax: Any,
    ) -> Any:
        """Exact draw among each row's ``k`` best tokens, within their top-p nucleus."""
        tf = self._tf
        self.traces += 1
        f64, i32 = tf.float64, tf.int32
        yr = tf.gather(y, rows)  # (S, V)
        ok = self._allowed(static_ok, byte_of, eos_id, allowed_bytes, ban_eos)
        z = tf.where(ok, yr, -np.inf) / temperature[:, None]
        vals, cand = tf.math.top_k(z, k=kmax, sorted=True)  # (S, K): prob desc, id asc
        rank = tf.range(kmax)[None, :]
        valid = (rank < k[:, None]) & (vals > -np.inf)
        top = vals[:, :1]
        p = tf.where(valid, tf.exp(tf.cast(vals - tf.where(tf.math.is_finite(top), top, 0.0), f64)), 0.0)
        cum = tf.math.cumsum(p, axis=1)  # (S, K)
        keep = valid & ((cum - p < tf.cast(top_p, f64)[:, None] * cum[:, -1:]) | (rank == 0))
        kept = tf.math.cumsum(tf.where(keep, p, 0.0), axis=1)
        pick = tf.reduce_sum(tf.cast(kept <= (u * kept[:, -1])[:, None], i32), axis=1)
        pick = tf.minimum(pick, tf.reduce_max(tf.where(keep, rank, 0), axis=1))
        tokens = tf.gather(cand, pick, batch_dims=1)
        return tokens, tf.gather_nd(x, tf.stack([rows, tokens], axis=1))  # (S,), (S,)

    # -- public -------------------------------------------------------------------
    def draw(self, logits: Any, inputs: DrawInputs, rules: VocabRules) -> tuple[np.ndarray, np.ndarray]:
        """Draw one token per row (see :meth:`kogpt2.sampling.HostSampler.draw`)."""
        tf = self._tf
        x = tf.convert_to_tensor(logits, tf.float32)
        rows = int(x.shape[0])
        y = x
        edited = np.zeros(rows, dtype=bool)
        if len(inputs.penalized) or len(inputs.banned):
            keep = not_in(inputs.penalized, inputs.banned)  # a banned token needs no penalty
            y = self._edit(
                x,
                tf.constant(inputs.penalized[keep], tf.int32),
                tf.constant(inputs.penalty[keep], tf.float32),
                tf.constant(inputs.banned, tf.int32),
            )
            edited[inputs.penalized[:, 0]] = True
            edited[inputs.banned[:, 0]] = True
        sampling = ~inputs.greedy & (inputs.temperature >= MIN_TEMPERATURE) & ~inputs.idle
        top_k = (inputs.top_k > 0) & (inputs.top_k < self.vocab) & sampling
        inside = sampling & ~top_k & ~inputs.allowed_bytes[:, 256]  # a character open: a few byte pieces allowed
        rule_args = (
            tf.constant(rules.static_ok, tf.bool),
            tf.constant(rules.byte_of, tf.int32),
            tf.constant(rules.eos_id, tf.int32),
        )
        self._sizes.add(rows)
        tok, x_at, logz = self._draw(
            x,
            y,
            tf.constant(edited),
            *rule_args,
            tf.constant(inputs.allowed_bytes, tf.bool),
            tf.constant(inputs.ban_eos, tf.bool),
            tf.constant(sampling & ~top_k & ~inside),
            tf.constant(inputs.idle),
            tf.constant(np.where(sampling, inputs.temperature, 1.0), tf.float32),
            tf.constant(inputs.top_p, tf.float32),
            tf.constant(inputs.uniforms, tf.float64),
        )
        tokens, raw = tok.numpy().astype(np.int64), x_at.numpy().astype(np.float64)
        # exact sorted draws: top-k rows, rows inside a character (among the byte pieces: the best 256
        # hold them all), then the nucleus rows the tries did not resolve
        last = inputs.uniforms[:, MAX_ATTEMPTS]
        for sel, k, u in (
            (np.flatnonzero(top_k), inputs.top_k, inputs.uniforms[:, 0]),
            (np.flatnonzero(inside), np.full(rows, min(256, self.vocab), np.int32), last),
            (np.flatnonzero(tokens < 0), np.full(rows, self.vocab, np.int32), last),
        ):
            if len(sel) == 0:
                continue
            t, xs = self._sorted(
                x,
                y,
                tf.constant(sel, tf.int32),
                *rule_args,
                tf.constant(inputs.allowed_bytes[sel], tf.bool),
                tf.constant(inputs.ban_eos[sel], tf.bool),
                tf.constant(inputs.temperature[sel], tf.float32),
                tf.constant(k[sel], tf.int32),
                tf.constant(inputs.top_p[sel], tf.float32),
                tf.constant(u[sel], tf.float64),
                tf.constant(int(k[sel].max()), tf.int32),
            )
            tokens[sel], raw[sel] = t.numpy(), xs.numpy()
        logprobs = raw - logz.numpy().astype(np.float64) if self.scores else np.zeros(rows)
        return tokens, logprobs
