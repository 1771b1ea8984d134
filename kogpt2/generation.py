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
import math
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kogpt2.decoder import DTYPES, Decoder
from kogpt2.sampling import apply_repetition_penalty, ban_repeated_ngrams, row_seed, select_tokens
from kogpt2.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STRATEGIES = ("greedy", "sample")
#: Padded prompt lengths; a batch is padded to the bucket of its longest prompt.
PROMPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZE = 64


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue prompts. Invalid values raise ``ValueError`` naming the field.

    Attributes:
        strategy: ``greedy`` (best token each step) or ``sample``.
        temperature: divides the logits before sampling (> 0); 1.0 for greedy.
        top_k: sample among the k best tokens; 0 = no cut.
        top_p: sample within the smallest set of best tokens holding this mass, in (0, 1]; 1.0 = no cut.
        repetition_penalty: > 0; > 1 discourages tokens already in the prompt or output.
        no_repeat_ngram_size: forbid repeating any n-gram of this size; 0 = off.
        num_samples: outputs per prompt.
        max_new_tokens: generation budget per output (the notebook's 100).
        seed: run seed; with the prompt and sample index it fixes each output.
    """

    strategy: str = "sample"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_samples: int = 1
    max_new_tokens: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"GenerationConfig.strategy={self.strategy!r}: must be one of {STRATEGIES}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"GenerationConfig.temperature={self.temperature!r}: must be a finite number > 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k={self.top_k!r}: must be an integer >= 0 (0 = no top-k cut)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p={self.top_p!r}: must be in (0, 1] (1.0 = no nucleus cut)")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"GenerationConfig.repetition_penalty={self.repetition_penalty!r}: must be a finite number > 0 "
                "(1.0 = none)"
            )
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"GenerationConfig.no_repeat_ngram_size={self.no_repeat_ngram_size!r}: must be an integer >= 0 (0 = off)"
            )
        if not _is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"GenerationConfig.num_samples={self.num_samples!r}: must be an integer >= 1")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"GenerationConfig.seed={self.seed!r}: must be an integer in [0, 2**63)")
        if self.strategy == "greedy":
            for name, neutral in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if getattr(self, name) != neutral:
                    raise ValueError(
                        f"GenerationConfig.{name}={getattr(self, name)!r} has no effect with strategy='greedy': "
                        f"leave it at {neutral!r} or use strategy='sample'"
                    )

    @property
    def greedy(self) -> bool:
        return self.strategy == "greedy"

    def row_seed(self, prompt: str, sample_index: int) -> int:
        """The random seed of output ``(prompt, sample_index)`` in this run."""
        return row_seed(prompt, sample_index, self.seed)

    def describe(self) -> dict[str, Any]:
        """The config as plain JSON-able values (the strategy columns of the Parquet output)."""
        return asdict(self)


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
        finish_reason: ``eos`` (stopped at ``</s>``) or ``length`` (``max_new_tokens`` reached).
        row_seed: the random seed of this output.
        prompt_tokens: tokens fed as the prompt (``<s>`` included, after any cut).
        truncated: the prompt was cut from the left to fit the model's positions.
        new_ids: the generated token ids (``</s>`` included when it ended the output).
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
    """

    def __init__(
        self, model: Any, tokenizer: Tokenizer, *, dtype: str = "float32", batch_size: int = DEFAULT_BATCH_SIZE
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, dtype)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.n_positions = int(model.config.n_positions)

    @classmethod
    def from_folder(cls, path: str, *, dtype: str = "float32", batch_size: int = DEFAULT_BATCH_SIZE) -> Generator:
        """Load a model folder (see :func:`kogpt2.model.load_model`) into a generator."""
        from kogpt2.model import load_model

        model, tokenizer = load_model(path)
        return cls(model, tokenizer, dtype=dtype, batch_size=batch_size)

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
                    )
            except Exception as exc:  # noqa: BLE001 - reported per batch; the caller dead-letters the rows
                log.warning("a batch of %d rows failed: %s: %s", len(batch_rows), type(exc).__name__, exc)
                yield BatchOutcome(batch_rows, [], 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
                continue
            samples = []
            for key, (new, reason) in zip(batch, outs, strict=True):
                prompt_ids, cut = encoded[key[0]]
                for prompt, index in members[key]:
                    samples.append(
                        _make_sample(tok, prompt, index, prompt_ids, new, reason, config.row_seed(prompt, index), cut)
                    )
            new_tokens = sum(len(new) for new, _ in outs)
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


def _make_sample(
    tok: Tokenizer, prompt: str, index: int, prompt_ids: list[int], new: list[int], reason: str, seed: int, cut: bool
) -> Sample:
    text = tok.decode(prompt_ids + new)
    prefix = tok.decode(prompt_ids)
    continuation = text[len(prefix) :] if text.startswith(prefix) else tok.decode(new)
    return Sample(prompt, index, text, continuation, len(new), reason, seed, len(prompt_ids), cut, tuple(new))


def _decode_batch(
    decoder: Decoder, tok: Tokenizer, prompts: list[list[int]], seeds: np.ndarray, config: GenerationConfig, limit: int
) -> list[tuple[list[int], str]]:
    """Decode one batch of prompt ids (each <= ``limit`` tokens); return (new ids, finish reason) per row."""
    batch = len(prompts)
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
    reasons = ["length"] * batch
    rows = np.arange(batch)  # (R,) original row of each decoder row; shrinks as rows finish
    alive = np.ones(batch, dtype=bool)  # (R,) decoder rows still generating
    logits = decoder.prefill(ids, starts, width + max_new - 1)  # (R, V)
    for step in range(max_new):
        idx = np.nonzero(alive)[0]
        lg = logits if len(idx) == len(rows) else logits[idx]  # (A, V)
        live = rows[idx]  # (A,) original rows
        hist, hl = history[live], hlen[live]
        if config.repetition_penalty != 1.0:
            apply_repetition_penalty(lg, hist, hl, config.repetition_penalty)
        if config.no_repeat_ngram_size:
            ban_repeated_ngrams(lg, hist, hl, config.no_repeat_ngram_size)
        chosen = select_tokens(
            lg,
            greedy=config.greedy,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            row_seeds=seeds[live],
            step=step,
        )
        for r, t in zip(live.tolist(), chosen.tolist(), strict=True):
            out[r].append(t)
            history[r, hlen[r]] = t
            hlen[r] += 1
            if t == tok.eos_id:
                reasons[r] = "eos"
        alive[idx[chosen == tok.eos_id]] = False
        if step == max_new - 1 or not alive.any():
            break
        feed = np.full(len(rows), tok.pad_id, dtype=np.int64)  # finished rows are fed <pad>, never read
        feed[idx] = chosen
        keep = _compaction(alive)
        if keep is not None:
            decoder.select_rows(keep)
            rows, alive, feed = rows[keep], alive[keep], feed[keep]
        logits = decoder.step(feed, starts[rows], width + step)
    return [(out[r], reasons[r]) for r in range(batch)]


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
