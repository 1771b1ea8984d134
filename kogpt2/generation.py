"""Batched, cached, reproducible text generation.

``generate(model, tokenizer, prompts, config)`` continues each prompt as the notebook
did (``<s>`` + the prompt, then one token at a time until ``</s>`` or
``max_new_tokens``), but for a whole batch at once: prompts are left-padded into
length buckets, run through a compiled decoder with a key/value cache
(:mod:`kogpt2.decoder`), and each next token is drawn in the graph by
:class:`kogpt2.sampling.TokenSampler`.

Rows of one batch may have different settings (:class:`GenRow`): temperature, top-k, top-p,
greedy or not, repetition penalty, n-gram bans, token budgets, stop strings and seed are
per-row; only ``suppress_tokens`` and ``valid_utf8`` are shared by a batch (rows that differ
there are batched apart).

Reproducible: row ``(prompt, sample_index)`` draws its random numbers from a seed
derived from ``(prompt, sample_index, config.seed)``, so it gives the same text in any
batch, next to rows of any settings, and in any order (up to floating-point near-ties
between candidate tokens, which batch shapes can perturb in the last bit).
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kogpt2.decode_loop import DecodedRow, RowSettings, padded_batch, rows_per_batch, vocab_rules  # noqa: F401  (padded_batch: API)
from kogpt2.decode_loop import decode_batch as _decode_batch  # a module name: tests replace it to simulate failures
from kogpt2.decoder import DEFAULT_CACHE_GROWTH, DTYPES, Decoder
from kogpt2.generation_config import (  # noqa: F401  (re-exported: the generation API)
    DECODING_STRATEGIES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOP_P,
    GENERATION_CONFIG_FILE,
    GenerationConfig,
    write_generation_config,
)
from kogpt2.sampling import SAMPLERS, HostSampler, Sampler
from kogpt2.tokenizer import Tokenizer
from kogpt2.validate import is_int

log = logging.getLogger(__name__)

#: Padded prompt lengths; a batch is padded to the bucket of its longest prompt. A seed word is
#: mostly 2-4 tokens with ``<s>`` (84% of the first words of 356,238 real reviews), so the first
#: bucket is 4: every padded slot is run in the prefill and read by every step's attention. A
#: new width compiles nothing (the prefill's shapes are dynamic, the XLA attention's are
#: (batch, cache level)).
PROMPT_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class BatchFailedError(RuntimeError):
    """Decoding a batch raised (see :meth:`Generator.stream_rows` to go on past failures)."""


@dataclass(frozen=True)
class GenRow:
    """One output to generate, with its own settings.

    Attributes:
        prompt: the prompt text.
        sample_index: which sample of the prompt; with ``config.seed`` it fixes the row's random seed.
        config: the row's settings (typically the job's defaults with the row's overrides:
            ``job_config.replace(temperature=0.7)``); None = the config of the call.
        key: anything hashable the caller joins results back with; carried into :attr:`Sample.key`.
    """

    prompt: str
    sample_index: int = 0
    config: GenerationConfig | None = None
    key: Hashable = None


#: A row of :meth:`Generator.stream_rows`: ``(prompt, sample_index)`` under the call's config, or a :class:`GenRow`.
Row = tuple[str, int] | GenRow


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
        key: the :attr:`GenRow.key` of the row (None for ``(prompt, sample_index)`` rows).
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
    key: Hashable = None


@dataclass(frozen=True)
class BatchOutcome:
    """One decoded batch of :meth:`Generator.stream_rows`.

    Attributes:
        rows: the rows this batch answers, as given (``(prompt, sample_index)`` tuples or :class:`GenRow`).
        samples: one :class:`Sample` per row, in the same order (empty when the batch failed).
        new_tokens: tokens decoded (each decoded sequence counted once).
        seconds: wall time of the batch.
        error: ``"ExceptionType: message"`` when decoding raised, else None.
    """

    rows: list[Row]
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


def batch_key(config: GenerationConfig) -> tuple[Any, ...]:
    """The settings rows must share to be decoded in one batch (the rest are per-row vectors)."""
    return (config.suppress_tokens, config.valid_utf8)


@dataclass(frozen=True)
class _Unit:
    """One decoded sequence: rows with the same prompt, settings and sample index share it."""

    prompt: str
    sample_index: int  # 0 for greedy rows: their output does not depend on it
    config: GenerationConfig


@dataclass(frozen=True)
class _Resolved:
    """An input row with its settings resolved."""

    row: Row
    prompt: str
    sample_index: int
    config: GenerationConfig
    key: Hashable


class Generator:
    """A tokenizer, a compiled decoder and sampler: what a pipeline worker loads once and reuses.

    Args:
        model: a ``TFGPT2LMHeadModel``.
        tokenizer: its tokenizer.
        dtype: ``float32`` or ``bfloat16`` computation.
        batch_size: rows decoded together.
        scores: compute ``Sample.logprob_sum`` / ``logprob_mean`` (False leaves them 0).
        cache_growth: key/value cache slots added at a time (0: the whole budget from the start);
            see :class:`kogpt2.decoder.Decoder`.
        sampler: ``host`` (numpy, the default) or ``graph`` (one XLA function; to compare, see
            :mod:`kogpt2.graph_sampling`).
        attention_splits: head groups whose XLA attention runs side by side; None: as many as
            the CPUs (see :class:`kogpt2.decoder.Decoder`). The logits do not depend on it.
        attention: ``auto`` (the compiled kernel on a CPU where it builds, else XLA), ``native``
            or ``xla``; see :class:`kogpt2.decoder.Decoder`.
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
        sampler: str = "host",
        attention_splits: int | None = None,
        attention: str = "auto",
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self.tokenizer = tokenizer
        self.decoder = Decoder(
            model, dtype, cache_growth=cache_growth, attention_splits=attention_splits, attention=attention
        )
        self.sampler = make_sampler(sampler, self.decoder.vocab_size, scores=scores)
        self._sampler_base = (self.sampler.traces, self.sampler.xla_compiles)  # shared: count from here
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.n_positions = int(model.config.n_positions)
        #: Seconds spent so far in the decoder (prefill, steps, cache growth and compaction), in
        #: the sampler, and on the host (the rest of each step), for a profile of where time goes.
        self.timings = {"decoder": 0.0, "sampler": 0.0, "host": 0.0, "steps": 0.0}

    @classmethod
    def from_folder(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_growth: int = DEFAULT_CACHE_GROWTH,
        sampler: str = "host",
        attention: str = "auto",
    ) -> Generator:
        """Load a model folder (see :func:`kogpt2.model.load_model`) into a generator."""
        from kogpt2.model import load_model

        model, tokenizer = load_model(path)
        return cls(
            model,
            tokenizer,
            dtype=dtype,
            batch_size=batch_size,
            cache_growth=cache_growth,
            sampler=sampler,
            attention=attention,
        )

    @property
    def compiles(self) -> int:
        """Graph traces plus XLA compiles since this generator was made (decoder and sampler).

        The sampler and the attention function are shared by the process's generators of the
        same shape, so a shape another generator compiled costs nothing here.
        """
        d, s = self.decoder, self.sampler
        return d.traces + d.xla_compiles + s.traces + s.xla_compiles - sum(self._sampler_base)

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> list[Sample]:
        """``num_samples`` outputs per prompt, prompt-major (prompt 0's samples first)."""
        rows = [(p, i) for p in prompts for i in range(config.num_samples)]
        return self.generate_rows(rows, config)

    def generate_rows(self, rows: Sequence[Row], config: GenerationConfig) -> list[Sample]:
        """Generate one output per row, in the order given.

        Args:
            rows: ``(prompt, sample_index)`` pairs (under ``config``; its ``num_samples`` is not
                used here) or :class:`GenRow` (under their own config, ``config`` if None).
            config: the settings of rows that bring none.

        Returns:
            One :class:`Sample` per row.

        Raises:
            ValueError: a prompt is not a string, or a ``max_new_tokens`` does not fit the model.
            BatchFailedError: decoding a batch raised (the first such error).
        """
        out: list[Sample | None] = [None] * len(rows)
        for outcome, positions in self._stream(rows, config):
            if outcome.error is not None:
                raise BatchFailedError(f"a batch of {len(outcome.rows)} rows failed: {outcome.error}")
            for pos, sample in zip(positions, outcome.samples, strict=True):
                out[pos] = sample
        return [s for s in out if s is not None]

    def run_rows(self, rows: Sequence[Row], config: GenerationConfig) -> list[BatchOutcome]:
        """:meth:`stream_rows` as a list (what crosses a process boundary, for shared models)."""
        return list(self.stream_rows(rows, config))

    def stream_rows(self, rows: Sequence[Row], config: GenerationConfig) -> Iterator[BatchOutcome]:
        """Decode ``rows`` in full, length-bucketed batches; yield each batch's outcome as it finishes.

        Rows are sorted by prompt length, so every batch but the last of each length bucket
        holds ``batch_size`` rows, whatever mix of per-row settings they carry (rows that
        differ in ``suppress_tokens`` or ``valid_utf8`` are batched apart: :func:`batch_key`).
        A batch whose decoding raises yields its rows with the error message (``samples``
        empty) and the next batch goes on: callers decide what a failure means. Duplicate
        rows are decoded once; greedy rows of one prompt and settings too.

        Args:
            rows: ``(prompt, sample_index)`` pairs (under ``config``) or :class:`GenRow`.
            config: the settings of rows that bring none.

        Raises:
            ValueError: a prompt is not a string, or a ``max_new_tokens`` does not fit the model.
        """
        for outcome, _ in self._stream(rows, config):
            yield outcome

    def _stream(self, rows: Sequence[Row], config: GenerationConfig) -> Iterator[tuple[BatchOutcome, list[int]]]:
        """:meth:`stream_rows`, with the positions in ``rows`` each outcome's samples answer."""
        resolved = [_resolve(row, config) for row in rows]
        tok = self.tokenizer
        limits = {
            r.config.max_new_tokens: max_prompt_tokens(self.n_positions, r.config.max_new_tokens) for r in resolved
        }
        full: dict[str, list[int]] = {}
        for r in resolved:
            if r.prompt not in full:
                full[r.prompt] = [tok.bos_id, *tok.encode(r.prompt)]
        self._warn_cuts(resolved, full, limits)
        # Greedy outputs do not depend on the sample index or the seed: decode each prompt once.
        members: dict[_Unit, list[int]] = {}
        for pos, r in enumerate(resolved):
            unit = (
                _Unit(r.prompt, 0, _greedy_key(r.config))
                if r.config.greedy
                else _Unit(r.prompt, r.sample_index, r.config)
            )
            members.setdefault(unit, []).append(pos)
        groups = {key: n for n, key in enumerate(dict.fromkeys(batch_key(u.config) for u in members))}
        configs = {c: n for n, c in enumerate(dict.fromkeys(u.config for u in members))}

        def prompt_ids(unit: _Unit) -> tuple[list[int], bool]:
            ids, limit = full[unit.prompt], limits[unit.config.max_new_tokens]
            return ([tok.bos_id, *ids[len(ids) - limit + 1 :]], True) if len(ids) > limit else (ids, False)

        encoded = {u: prompt_ids(u) for u in members}
        width = {u: prompt_bucket(len(encoded[u][0]), limits[u.config.max_new_tokens]) for u in members}
        unique = sorted(
            members,
            key=lambda u: (
                groups[batch_key(u.config)],
                width[u],
                u.config.max_new_tokens,
                len(encoded[u][0]),
                u.prompt,
                u.sample_index,
                configs[u.config],
            ),
        )

        def slots(unit: _Unit) -> int:  # the cache slots a row needs: its padded prompt and new tokens
            return width[unit] + unit.config.max_new_tokens - 1

        for batch in self._batches(unique, lambda u: (groups[batch_key(u.config)], width[u]), slots):
            started = time.perf_counter()
            positions = [pos for u in batch for pos in members[u]]
            batch_rows = [resolved[pos].row for pos in positions]
            try:
                with self.decoder.lock:
                    outs = _decode_batch(
                        self.decoder,
                        tok,
                        [encoded[u][0] for u in batch],
                        width[batch[0]],
                        RowSettings.of(
                            [u.config for u in batch], [u.config.row_seed(u.prompt, u.sample_index) for u in batch]
                        ),
                        vocab_rules(tok, self.decoder.vocab_size, *batch_key(batch[0].config)),
                        self.sampler,
                        max_batch=rows_per_batch(self.batch_size, max(slots(u) for u in batch)),
                        timings=self.timings,
                    )
            except Exception as exc:  # noqa: BLE001 - reported per batch; the caller dead-letters the rows
                log.warning("a batch of %d rows failed: %s: %s", len(batch_rows), type(exc).__name__, exc)
                failed = BatchOutcome(batch_rows, [], 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
                yield failed, positions
                continue
            samples = []
            for unit, out in zip(batch, outs, strict=True):
                prompt_ids_, cut = encoded[unit]
                for pos in members[unit]:
                    r = resolved[pos]
                    seed = r.config.row_seed(r.prompt, r.sample_index)
                    samples.append(_make_sample(tok, r, prompt_ids_, out, seed, cut))
            new_tokens = sum(len(out.new) for out in outs)
            yield BatchOutcome(batch_rows, samples, new_tokens, time.perf_counter() - started, None), positions

    def _warn_cuts(self, resolved: list[_Resolved], full: dict[str, list[int]], limits: dict[int, int]) -> None:
        """Warn once per prompt-length limit about the prompts cut to fit it."""
        for max_new, limit in sorted(limits.items()):
            rows = [r for r in resolved if r.config.max_new_tokens == max_new]
            n_cut = sum(1 for r in rows if len(full[r.prompt]) > limit)
            if n_cut:
                msg = (
                    f"{n_cut} of {len(rows)} prompts are longer than {limit} tokens (the model's {self.n_positions} "
                    f"positions minus max_new_tokens={max_new}); cut from the left"
                )
                warnings.warn(msg, stacklevel=4)
                log.warning(msg)

    def _batches(self, units: list[_Unit], group: Any, slots: Callable[[_Unit], int]) -> list[list[_Unit]]:
        """Split sorted units into batches sharing ``group(unit)``, each of at most :func:`rows_per_batch`
        rows for the cache slots its longest row needs (``slots(unit)``)."""
        batches: list[list[_Unit]] = []
        current: list[_Unit] = []
        need = 0  # slots of the current batch's longest row
        for unit in units:
            need = max(need, slots(unit))
            if current and (group(unit) != group(current[-1]) or len(current) >= rows_per_batch(self.batch_size, need)):
                batches.append(current)
                current, need = [], slots(unit)
            current.append(unit)
        if current:
            batches.append(current)
        return batches


_GRAPH_SAMPLERS: dict[tuple[int, bool], Sampler] = {}


def make_sampler(kind: str, vocab: int, *, scores: bool = True) -> Sampler:
    """A sampler of this kind for ``vocab``-wide logits.

    A ``graph`` sampler is shared by the process's generators of this width (its compiled
    shapes are reused); a ``host`` sampler keeps a buffer, so each generator has its own.

    Raises:
        ValueError: unknown kind.
    """
    if kind not in SAMPLERS:
        raise ValueError(f"sampler={kind!r}: must be one of {SAMPLERS}")
    if kind == "host":
        return HostSampler(vocab, scores=scores)
    key = (int(vocab), bool(scores))
    if key not in _GRAPH_SAMPLERS:
        from kogpt2.graph_sampling import GraphSampler

        _GRAPH_SAMPLERS[key] = GraphSampler(vocab, scores=scores)
    return _GRAPH_SAMPLERS[key]


def _resolve(row: Row, config: GenerationConfig) -> _Resolved:
    """An input row with its prompt, sample index, settings and key checked."""
    if isinstance(row, GenRow):
        prompt, index, cfg, key = row.prompt, row.sample_index, row.config or config, row.key
    else:
        (prompt, index), cfg, key = row, config, None
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {prompt!r}: must be a string")
    if not is_int(index) or index < 0:
        raise ValueError(f"sample_index={index!r}: must be an integer >= 0")
    if not isinstance(cfg, GenerationConfig):
        raise ValueError(f"config {cfg!r}: must be a GenerationConfig")
    return _Resolved(row, prompt, int(index), cfg, key)


def _greedy_key(config: GenerationConfig) -> GenerationConfig:
    """A greedy config without what greedy output does not depend on (the seed)."""
    return config if config.seed == 0 else config.replace(seed=0)


def _make_sample(tok: Tokenizer, r: _Resolved, prompt_ids: list[int], row: DecodedRow, seed: int, cut: bool) -> Sample:
    new = row.new
    text = tok.decode(prompt_ids + new)
    prefix = tok.decode(prompt_ids)
    continuation = text[len(prefix) :] if text.startswith(prefix) else tok.decode(new)
    mean = row.logprob_sum / len(new) if new else 0.0
    return Sample(
        r.prompt,
        r.sample_index,
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
        r.key,
    )


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
