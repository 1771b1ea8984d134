"""A compiled GPT-2 decoder with a fixed-size key/value cache, for fast batched generation.

transformers' own TF ``generate`` re-concatenates the cache every step and computes
logits for the whole prompt; on a CPU its sampling path sorts 50,000 logits per row
and step. This decoder reads the weights of a ``TFGPT2LMHeadModel`` and runs two
graph functions, traced once each (every shape is dynamic):

- ``prefill(ids, starts, capacity)``: the left-padded prompts ``(B, T)`` in one pass;
  fills the cache slots ``0 .. T-1`` and returns the last position's logits ``(B, V)``.
- ``step(tokens, starts, slot)``: one new token per row; writes its key/value into
  cache slot ``slot`` in place and returns logits ``(B, V)``.

Row ``b`` holds its prompt in slots ``starts[b] .. T-1``; its position ids count from
``starts[b]``, so left padding changes nothing but the slots attended.

The cache holds what is filled, not the whole budget: its capacity grows in steps of
``cache_growth`` slots (levels are multiples of it), padded when a step crosses a level.
A step's attention reads every slot of the current capacity, so its cost follows the
tokens generated so far instead of the budget (measured on the KoGPT2 shape, batch 64: all
12 layers' attention took 41 ms per step at capacity 107, 22 ms at 64, 13 ms at 32), and
the compiled shapes stay few: one per (batch, level).

Measured on a 2-core AVX-512 CPU (KoGPT2 shape, batch 64): the dense layers run fastest
in graph mode (oneDNN kernels; XLA was no faster in float32 and 2x slower in bfloat16),
the cached attention fastest in a compiled kernel of our own, else as one small XLA function
per layer call (below).

The cached attention has two implementations (``attention``):

- ``native``, the default on a CPU: a compiled kernel (:mod:`kogpt2.native_ops`, built on first use
  with the machine's C++ compiler) writes the new key/value in place and reads only the filled slots
  ``starts[b] .. slot`` of each row, split over TensorFlow's intra-op threads. Measured on the KoGPT2
  shape (64 rows, slot 54 of 64): the 12 layers in 15-18 ms against 24-29 for the XLA attention.
- ``xla``: one small XLA function per layer call (it updates the cache variables in place; graph-mode
  ``scatter_nd_update`` switches a variable to copy-on-read, and the batched matmul over the cache was
  4x slower). It is used on a GPU, and on a CPU where the kernel cannot be built (a warning says why).
  It compiles once per (batch, cache capacity) shape: prompt length buckets and capacity levels bound
  that. One call runs on one core (measured: the same time pinned to one core as on two), so the
  heads are split into groups (``attention_splits``, by default as many as the CPUs this process may
  use, dividing the heads evenly), each with its own cache variables and its own call: the step
  graph's executor runs a layer's groups side by side. Each head's arithmetic is the same whatever
  the split, so the logits are identical bit for bit (tested).

The two agree to float32 rounding (about 1e-6; tested), not bit for bit: a sampled token can differ
where two candidates are within rounding of the draw's boundary.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from kogpt2.generation_config import ATTENTIONS, DTYPES  # re-exported: the decoder's choices
from kogpt2.native_ops import NativeOpError, cached_attention_op
from kogpt2.tf_setup import import_tf, usable_cpus

log = logging.getLogger(__name__)

#: Cache slots added at a time; 0 allocates the whole budget at prefill.
DEFAULT_CACHE_GROWTH = 32
_NEG = -1e9  # additive mask for slots a row must not attend


class Decoder:
    """Batched GPT-2 decoding with a KV cache held in TF variables (one per layer).

    One decoder runs one batch at a time (a lock guards the cache); make one per
    thread for concurrency, or share it and let calls queue.

    Args:
        model: a built ``TFGPT2LMHeadModel`` (GPT-2 architecture).
        dtype: ``float32`` or ``bfloat16`` weights and matrix products (layer norms,
            softmax, the key/value cache and the logits stay float32).
        cache_growth: cache slots added at a time (capacity levels are its multiples, up to
            the model's positions); 0 allocates the whole capacity given to :meth:`prefill`.
        attention_splits: head groups whose XLA attention runs side by side (must divide the
            heads); None: :func:`default_attention_splits`. The native kernel takes all heads at
            once (it splits the work over threads itself): only None or 1 go with it.
        attention: ``native``, ``xla`` or ``auto`` (native on a CPU when the kernel builds, else
            xla with a warning).

    Raises:
        ValueError: unknown dtype or attention, a negative ``cache_growth``, ``attention_splits``
            not a divisor of the heads (or above 1 with the native attention), or an unsupported
            model configuration.
        NativeOpError: ``attention="native"`` and the kernel cannot be built here.
    """

    def __init__(
        self,
        model: Any,
        dtype: str = "float32",
        *,
        cache_growth: int = DEFAULT_CACHE_GROWTH,
        attention_splits: int | None = None,
        attention: str = "auto",
    ) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r}: must be one of {ATTENTIONS}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
        if not isinstance(cache_growth, int) or cache_growth < 0:
            raise ValueError(f"cache_growth={cache_growth!r}: must be an integer >= 0 (0 = no growth)")
        tf = self._tf = import_tf()
        cfg = model.config
        act = getattr(cfg, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"model activation_function={act!r}: the decoder supports gelu_new and gelu")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(cfg, flag, False):
                raise ValueError(f"model config {flag}=True is not supported by the decoder")
        self.dtype = dtype
        self.cache_growth = cache_growth
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.attention, self._native = _choose_attention(attention, attention_splits)
        if self._native is not None:
            splits = 1  # the kernel takes every head of a layer (and splits the work over threads)
        else:
            splits = default_attention_splits(cfg.n_head) if attention_splits is None else attention_splits
        if not isinstance(splits, int) or splits < 1 or cfg.n_head % splits:
            raise ValueError(f"attention_splits={splits!r}: must be a positive divisor of n_head={cfg.n_head}")
        self.attention_splits = splits
        self._group = cfg.n_head // splits  # heads per group
        self.n_positions = cfg.n_positions
        self.vocab_size = cfg.vocab_size
        self._approx_gelu = act != "gelu"
        self._eps = float(cfg.layer_norm_epsilon)
        self._dt = tf.bfloat16 if dtype == "bfloat16" else tf.float32
        # The cache stays float32 in bfloat16 mode too: XLA's bfloat16 dots are slow on CPU.
        self._cache_dt = tf.float32
        self._w = self._collect_weights(model)
        shape = tf.TensorShape(None)
        empty = tf.zeros([0, self._group, 0, self.head_dim], self._cache_dt)

        def group_vars() -> list[Any]:
            return [tf.Variable(empty, shape=shape, trainable=False) for _ in range(splits)]

        # [layer][group]: (B, heads per group, S, D) each
        self._k = [group_vars() for _ in range(self.n_layer)]
        self._v = [group_vars() for _ in range(self.n_layer)]
        self._cache = [var for layer in self._k + self._v for var in layer]
        self.lock = threading.Lock()
        self.traces = 0  # graph traces: prefill, step, row selection; once each (shapes are dynamic)
        self._shapes: set[tuple[int, int]] = set()  # (batch, cache capacity) shapes stepped so far
        self._capacity = 0  # slots the current batch may use (prompt + tokens to be fed)
        self._allocated = 0  # slots the cache holds now
        i32 = tf.int32
        self._prefill = tf.function(
            self._prefill_fn,
            input_signature=[
                tf.TensorSpec([None, None], i32),  # ids (B, T), left-padded
                tf.TensorSpec([None], i32),  # starts (B,): first real slot per row
                tf.TensorSpec([], i32),  # capacity S: cache slots
            ],
        )
        self._attend = _cached_attention(self.n_head, self._group, self.head_dim, dtype)
        self._select = tf.function(self._select_fn, input_signature=[tf.TensorSpec([None], i32)])
        self._step = tf.function(
            self._step_fn,
            input_signature=[
                tf.TensorSpec([None], i32),  # tokens (B,)
                tf.TensorSpec([None], i32),  # starts (B,)
                tf.TensorSpec([], i32),  # slot: where this token's key/value go
            ],
        )

    def _collect_weights(self, model: Any) -> dict[str, Any]:
        tf, tr = self._tf, model.transformer

        def cast(v: Any) -> Any:
            # float32: the model's own variables (no copy); bfloat16: one cast copy.
            return v if self._dt == tf.float32 else tf.cast(v, self._dt)

        layers = []
        for block in tr.h:
            layers.append(
                {
                    "ln1": (block.ln_1.gamma, block.ln_1.beta),
                    "attn": (cast(block.attn.c_attn.weight), cast(block.attn.c_attn.bias)),
                    "proj": (cast(block.attn.c_proj.weight), cast(block.attn.c_proj.bias)),
                    "ln2": (block.ln_2.gamma, block.ln_2.beta),
                    "fc": (cast(block.mlp.c_fc.weight), cast(block.mlp.c_fc.bias)),
                    "fc_proj": (cast(block.mlp.c_proj.weight), cast(block.mlp.c_proj.bias)),
                }
            )
        return {
            "wte": cast(tr.wte.embeddings),  # (V, E)
            "head": tf.transpose(cast(tr.wte.embeddings)),  # (E, V): a plain matmul is faster than transpose_b
            "wpe": cast(tr.wpe.embeddings),  # (P, E)
            "ln_f": (tr.ln_f.gamma, tr.ln_f.beta),
            "layers": layers,
        }

    # -- graph pieces -------------------------------------------------------------
    def _ln(self, x: Any, gb: tuple[Any, Any]) -> Any:
        tf = self._tf
        x32 = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x32, axes=[-1], keepdims=True)
        y = (x32 - mean) * tf.math.rsqrt(var + self._eps) * gb[0] + gb[1]
        return tf.cast(y, self._dt)

    def _dense(self, x: Any, wb: tuple[Any, Any]) -> Any:
        # bias_add, not +: Grappler fuses MatMul + BiasAdd into one oneDNN kernel (measured: the 12
        # layers' dense part of a 64-row step in 85 ms instead of 91, median of 8 alternations)
        tf = self._tf
        return tf.nn.bias_add(tf.matmul(x, wb[0]), tf.reshape(wb[1], [-1]))

    def _block(self, x: Any, layer: dict[str, Any], attention: Callable[[Any], Any]) -> Any:
        """One transformer block on ``x`` ``(N, E)`` (N = every position of every row fed).

        ``attention`` maps the block's ``(N, 3E)`` query/key/value projections to the
        ``(N, E)`` attention output: the full causal pass in prefill, the cached one in step.
        """
        tf = self._tf
        att = attention(self._dense(self._ln(x, layer["ln1"]), layer["attn"]))  # (N, E)
        x = x + self._dense(att, layer["proj"])
        h = tf.nn.gelu(self._dense(self._ln(x, layer["ln2"]), layer["fc"]), approximate=self._approx_gelu)
        return x + self._dense(h, layer["fc_proj"])

    def _logits(self, x: Any) -> Any:
        """``(B, V)`` float32 next-token logits of the final hidden states ``x`` ``(B, E)``."""
        tf = self._tf
        h = self._ln(x, self._w["ln_f"])  # (B, E)
        return tf.cast(tf.matmul(h, self._w["head"]), tf.float32)  # (B, V)

    def _prefill_fn(self, ids: Any, starts: Any, capacity: Any) -> Any:
        tf = self._tf
        self.traces += 1
        batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
        heads, hd, emb = self.n_head, self.head_dim, self.n_embd
        slots = tf.range(length)
        pos = tf.maximum(slots[None, :] - starts[:, None], 0)  # (B, T)
        x = tf.gather(self._w["wte"], ids) + tf.gather(self._w["wpe"], pos)  # (B, T, E)
        # key j visible to query i: j <= i and j is a real token of the row
        visible = (slots[None, :] <= slots[:, None])[None] & (slots[None, None, :] >= starts[:, None, None])
        bias = tf.where(visible, 0.0, _NEG)[:, None]  # (B, 1, T, T)
        group = self._group
        pad = tf.zeros([batch, group, capacity - length, hd], self._cache_dt)

        def full_attention(k_vars: list[Any], v_vars: list[Any]) -> Callable[[Any], Any]:
            def attend(qkv: Any) -> Any:  # (B*T, 3E) -> (B*T, E); fills the cache
                qkv = tf.transpose(tf.reshape(qkv, [batch, length, 3, heads, hd]), [2, 0, 3, 1, 4])  # (3, B, H, T, D)
                q, k, v = qkv[0], qkv[1], qkv[2]
                for g, (k_var, v_var) in enumerate(zip(k_vars, v_vars, strict=True)):  # (B, H/splits, S, D) each
                    heads_g = slice(g * group, (g + 1) * group)
                    k_var.assign(tf.concat([tf.cast(k[:, heads_g], self._cache_dt), pad], axis=2))
                    v_var.assign(tf.concat([tf.cast(v[:, heads_g], self._cache_dt), pad], axis=2))
                scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) / math.sqrt(hd) + bias  # (B, H, T, T)
                att = tf.matmul(tf.cast(tf.nn.softmax(scores, axis=-1), self._dt), v)  # (B, H, T, D)
                return tf.reshape(tf.transpose(att, [0, 2, 1, 3]), [-1, emb])  # (B*T, E)

            return attend

        x = tf.reshape(x, [-1, emb])  # (B*T, E)
        for layer, k_vars, v_vars in zip(self._w["layers"], self._k, self._v, strict=True):
            x = self._block(x, layer, full_attention(k_vars, v_vars))
        return self._logits(tf.reshape(x, [batch, length, emb])[:, -1])

    def _step_fn(self, tokens: Any, starts: Any, slot: Any) -> Any:
        tf = self._tf
        self.traces += 1
        batch = tf.shape(tokens)[0]
        emb = self.n_embd
        x = tf.gather(self._w["wte"], tokens) + tf.gather(self._w["wpe"], slot - starts)  # (B, E)

        def cached_attention(k_vars: list[Any], v_vars: list[Any]) -> Callable[[Any], Any]:
            def attend(qkv: Any) -> Any:  # (B, 3E) -> (B, E); writes this token's key/value
                return tf.reshape(self._attend_groups(k_vars, v_vars, qkv, starts, slot), [batch, emb])

            return attend

        for layer, k_vars, v_vars in zip(self._w["layers"], self._k, self._v, strict=True):
            x = self._block(x, layer, cached_attention(k_vars, v_vars))
        return self._logits(x)

    def _attend_groups(self, k_vars: list[Any], v_vars: list[Any], qkv: Any, starts: Any, slot: Any) -> Any:
        """One layer's cached attention, ``qkv`` ``(B, 3E)`` -> ``(B, H, D)`` (or ``(B, E)``).

        Native: one kernel call. XLA: one call per head group, independent of each other (the graph's
        executor runs them side by side); each slices its heads out of ``qkv`` itself (slices outside
        XLA cost a graph op each)."""
        tf = self._tf
        if self._native is not None:
            out32 = self._native(k_vars[0].handle, v_vars[0].handle, tf.cast(qkv, tf.float32), starts, slot)
            return tf.cast(out32, self._dt)
        out = [
            self._attend(k_var, v_var, qkv, starts, slot, tf.constant(g * self._group, tf.int32))
            for g, (k_var, v_var) in enumerate(zip(k_vars, v_vars, strict=True))
        ]
        return out[0] if len(out) == 1 else tf.concat(out, axis=1)

    # -- public -------------------------------------------------------------------
    def level(self, slots: int) -> int:
        """The capacity level holding ``slots`` slots: the next multiple of ``cache_growth``, at most n_positions."""
        g = self.cache_growth
        return min(-(-slots // g) * g, self.n_positions)

    def prefill(self, ids: np.ndarray, starts: np.ndarray, capacity: int) -> Any:
        """Run left-padded prompts and fill the cache.

        Args:
            ids: ``(B, T)`` int token ids, each row right-aligned (left-padded).
            starts: ``(B,)`` index of each row's first real token.
            capacity: cache slots ``S >= T`` the batch may use (prompt plus the tokens to be
                fed). With ``cache_growth`` the cache starts at the level holding ``T + 1``
                slots and grows as steps need.

        Returns:
            ``(B, V)`` float32 logits of each row's next token (a TensorFlow tensor).

        Raises:
            ValueError: ``capacity`` out of range.
        """
        tf = self._tf
        length = ids.shape[1]
        if capacity > self.n_positions or capacity < length:
            raise ValueError(f"capacity={capacity}: must be in [{length}, n_positions={self.n_positions}]")
        allocated = self.level(length + 1) if self.cache_growth else capacity
        out = self._prefill(tf.constant(ids, tf.int32), tf.constant(starts, tf.int32), tf.constant(allocated, tf.int32))
        self._capacity, self._allocated = capacity, allocated
        return out

    def step(self, tokens: np.ndarray, starts: np.ndarray, slot: int) -> Any:
        """Feed one token per row at cache slot ``slot``; return ``(B, V)`` float32 next-token logits.

        Raises:
            ValueError: ``slot`` outside the capacity given to :meth:`prefill`.
        """
        tf = self._tf
        if not 0 <= slot < self._capacity:
            raise ValueError(f"slot={slot}: must be in [0, {self._capacity}) (the cache filled by prefill)")
        if slot >= self._allocated:
            self._grow(self.level(slot + 1))
        if self._native is None:
            self._shapes.add((len(tokens), self._allocated))
        return self._step(tf.constant(tokens, tf.int32), tf.constant(starts, tf.int32), tf.constant(slot, tf.int32))

    def _grow(self, allocated: int) -> None:
        """Pad every layer's cache to ``allocated`` slots, one layer at a time (a copy per level)."""
        tf = self._tf
        pad = [[0, 0], [0, 0], [0, allocated - self._allocated], [0, 0]]
        for var in self._cache:
            var.assign(tf.pad(var, pad))
        self._allocated = allocated

    @property
    def capacity(self) -> int:
        """Slots the cache holds now."""
        return self._allocated

    @property
    def xla_compiles(self) -> int:
        """(batch, cache capacity) shapes stepped so far with the XLA attention: at most one XLA compile
        each (the attention function is shared by the process's decoders of this shape, so fewer when
        another compiled it). The native kernel compiles nothing per shape: 0."""
        return len(self._shapes)

    def select_rows(self, rows: np.ndarray) -> None:
        """Keep only these batch rows of the cache (in this order), e.g. once others finished."""
        self._select(self._tf.constant(rows, self._tf.int32))

    def _select_fn(self, rows: Any) -> Any:
        tf = self._tf
        self.traces += 1
        for var in self._cache:
            var.assign(tf.gather(var.read_value(), rows))
        return tf.constant(0)

    def release(self) -> None:
        """Free the cache memory (the variables keep their graphs)."""
        tf = self._tf
        empty = tf.zeros([0, self._group, 0, self.head_dim], self._cache_dt)
        for var in self._cache:
            var.assign(empty)


def _choose_attention(attention: str, splits: int | None) -> tuple[str, Any]:
    """``(name, native op or None)`` for the ``attention`` asked for (see :class:`Decoder`)."""
    if attention == "xla":
        return "xla", None
    gpu = bool(import_tf().config.list_logical_devices("GPU"))
    if attention == "auto":
        if splits not in (None, 1) or gpu:
            return "xla", None  # head groups are the XLA attention's; on a GPU the cache lives on the device
        try:
            return "native", cached_attention_op()
        except NativeOpError as e:
            _warn_fallback(str(e))
            return "xla", None
    if splits not in (None, 1):
        raise ValueError(f"attention_splits={splits}: head groups are the XLA attention's; the native kernel takes 1")
    if gpu:
        raise ValueError("attention='native': the kernel runs on the CPU and the cache lives on the GPU here; use xla")
    return "native", cached_attention_op()


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning("the compiled attention kernel is not available, using the slower XLA attention: %s", reason)


def default_attention_splits(heads: int, cpus: int | None = None) -> int:
    """Head groups for the cached attention: 1 with a GPU, else the largest divisor of ``heads``
    up to the CPUs this process may use (one XLA attention call runs on one core here).

    Args:
        heads: the model's attention heads.
        cpus: CPUs to use; None: those this process may run on.
    """
    if cpus is None:
        if import_tf().config.list_logical_devices("GPU"):
            return 1  # one call runs on the device; more would add launches (not measured on a GPU)
        cpus = usable_cpus()
    return max(d for d in range(1, max(1, min(heads, cpus)) + 1) if heads % d == 0)


@functools.cache
def _cached_attention(n_head: int, heads: int, hd: int, dtype: str) -> Any:
    """Cached attention of one layer for one new token per row: write its key/value, attend.

    One XLA function serves every layer of every decoder of this shape in the process (the
    cache variables are arguments), compiled once per (batch, cache capacity) shape. Every
    slot of the capacity is read, masked as needed: slicing the filled slots out measured
    slower (the slice gets copied), so the capacity itself grows with the filled slots
    (:meth:`Decoder.step`).
    """
    tf = import_tf()
    cache_dt, dt = tf.float32, (tf.bfloat16 if dtype == "bfloat16" else tf.float32)

    def attend(k_var: Any, v_var: Any, qkv: Any, starts: Any, slot: Any, first: Any) -> Any:
        # qkv: (B, 3E), its heads first .. first+heads-1 this group's; the cache variables: (B, heads, S, D)
        batch = tf.shape(qkv)[0]
        part = tf.slice(tf.reshape(qkv, [batch, 3, n_head, hd]), [0, 0, first, 0], [-1, -1, heads, -1])
        q, k, v = (tf.cast(part[:, i], cache_dt) for i in range(3))  # (B, heads, D) each
        bh = tf.stack(tf.meshgrid(tf.range(batch), tf.range(heads), indexing="ij"), axis=-1)  # (B, H, 2)
        where = tf.concat([bh, tf.fill([batch, heads, 1], slot)], axis=-1)  # (B, H, 3)
        # XLA aliases the variable buffers: the cache is updated in place
        k_var.assign(tf.tensor_scatter_nd_update(k_var.read_value(), where, k))
        v_var.assign(tf.tensor_scatter_nd_update(v_var.read_value(), where, v))
        keys, values = k_var.read_value(), v_var.read_value()  # (B, H, S, D)
        cols = tf.range(tf.shape(keys)[2])
        visible = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= slot)  # (B, S)
        bias = tf.where(visible, 0.0, _NEG)[:, None, None, :]  # (B, 1, 1, S)
        scores = tf.cast(tf.matmul(q[:, :, None, :], keys, transpose_b=True), tf.float32) / math.sqrt(hd)
        att = tf.matmul(tf.cast(tf.nn.softmax(scores + bias, axis=-1), cache_dt), values)  # (B, H, 1, D)
        return tf.cast(att[:, :, 0], dt)

    return tf.function(attend, jit_compile=True)
