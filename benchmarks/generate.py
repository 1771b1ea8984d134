"""Benchmark generation: our batched path vs the notebook's method vs one batched forward pass.

    .venv/bin/python benchmarks/generate.py                       # KoGPT2 shape, top-p 0.95, 100 new tokens, batch 64 and 256
    .venv/bin/python benchmarks/generate.py --cache-growth 32 16 0 --batch-size 64 128 --rounds 3
    .venv/bin/python benchmarks/generate.py --dtype float32 bfloat16 --sampler host graph --mixed-settings
    .venv/bin/python benchmarks/generate.py --preset tiny --batch-size 8 --max-new-tokens 10 \\
        --notebook-tokens 2 --ceiling-batch 2 --ceiling-len 16   # smoke run
    .venv/bin/python benchmarks/generate.py --quality runs/model  # bfloat16 vs float32 (or --quality base)

Measured, in one process, in turn (``--rounds`` rounds; every figure is the median of the
rounds, ours and the ceiling alike), random weights:

- ``notebook``: the notebook's ``generate_sent``: batch 1, no cache; every token re-encodes
  the text so far, re-runs the whole sequence through the transformers model (eager) and
  filters top-p by sorting the 50,000 logits (``tf_top_k_top_p_filtering``), then
  ``tf.random.categorical``. It is slow, so only ``--notebook-tokens`` steps are timed, at
  context lengths spread evenly over a ``--max-new-tokens`` generation (a step costs more
  as the text grows): their mean is the mean over the whole generation.
- ``ours``: :class:`kogpt2.generation.Generator` as the bulk pipeline uses it: batch-size
  rows (seed words x samples), ``--max-new-tokens`` new tokens each, top-p ``--top-p``; one
  variant per combination of ``--dtype``, ``--batch-size``, ``--cache-growth``, ``--sampler`` and
  ``--attention-splits``, their
  order rotating from round to round. Random weights rarely emit ``</s>``, so every row runs
  the full budget (the worst case: no batch compaction) and the nucleus holds most of the
  vocabulary. Each variant runs once untimed first (compiles: every shape it meets).
- ``ceiling``: one batched forward pass of the same transformers model (graph mode, fp32,
  logits included) on ``--ceiling-batch`` x ``--ceiling-len`` tokens; also without the LM
  head. Each round times 3 passes after a warm-up and keeps their median.
- ``step breakdown`` per variant: where a decode step's time goes, in two ways. In the run:
  the decoder (prefill, steps, cache growth), the sampler (the compiled draw) and the host
  (everything else) per step. Apart, at the middle slot of the run and its cache capacity
  (median of ``--piece-reps`` calls each): the attention (12 XLA calls), the dense part
  (layer norms, matmuls, GELU, residuals), the final layer norm + LM head, a whole step, and
  the draw.
- ``--mixed-settings``: the first variant's rows under four settings (top-p 0.95; top-p 0.9 at
  temperature 0.8; top-k 50 at temperature 0.7; temperature 1.2 with repetition penalty 1.2)
  in one call (mixed batches), against the same rows all under the first setting (uniform),
  and split into one call per setting (each setting's rows in batches of their own).
- ``steal``: the share of the VM's CPU time its hypervisor gave to other guests while each
  timed part ran (``/proc/stat``), printed per round. On this project's 2-core VM, in one run,
  rounds that lost 4-8% of the CPU time to steal ran 6-14% slower than one that lost 1%, and one
  that lost 36% ran 40% slower, so the report also gives each variant's
  ``/adjacent`` over the rounds where neither its run nor the ceiling pass after it lost more
  than ``--quiet-steal`` (1%): a filter measured apart from the figures, both sides alike.
  ``--until-quiet K`` goes on past ``--rounds`` until every variant has K quiet rounds (at most
  ``--max-rounds``); every round still counts in the all-rounds figures.
- ``--plain``: also the first variant without what the generation contract adds (no valid-UTF-8
  or special-token masks, no log-probability scores), to show their cost.

Targets: ours >= 100x notebook and >= 0.75x the ceiling with its LM head; mixed >= 0.9x
uniform. The machine may be shared: compare the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steal import pct, quiet_figures, with_steal  # noqa: E402  (benchmarks/steal.py)

from kogpt2.generation_config import ATTENTIONS, DTYPES, SAMPLERS  # noqa: E402  (no TensorFlow)

V1_TOKENIZER = REPO.parent / "shared" / "data" / "kogpt2_v1_tokenizer.spiece"
MIXED_SETTINGS = (
    {"top_p": 0.95},
    {"top_p": 0.9, "temperature": 0.8},
    {"top_p": 1.0, "top_k": 50, "temperature": 0.7},
    {"top_p": 1.0, "temperature": 1.2, "repetition_penalty": 1.2},
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", help="model shape (default base: 12 x 768, the KoGPT2 shape)")
    p.add_argument("--tokenizer", default=str(V1_TOKENIZER), help="tokenizer file (default: the real v1, 50,000)")
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[64, 256],
        help="rows decoded together (default: 64, the target's, and 256, the default)",
    )
    p.add_argument(
        "--cache-growth", type=int, nargs="+", default=None, help="cache slots added at a time; 0 = whole budget"
    )
    p.add_argument(
        "--attention-splits",
        type=int,
        nargs="+",
        default=[0],
        help="head groups of the cached attention run side by side; 0 = the decoder's default (one per CPU)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTIONS,
        nargs="+",
        default=["auto"],
        help="cached attention: the compiled kernel (native), XLA, or auto (native on a CPU where it builds)",
    )
    p.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"])
    p.add_argument("--sampler", choices=SAMPLERS, nargs="+", default=["host"], help="where the draw runs")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--notebook-tokens", type=int, default=5, help="tokens timed with the notebook method (0: skip)")
    p.add_argument("--ceiling-batch", type=int, default=8)
    p.add_argument("--ceiling-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="measure everything this many times; report medians")
    p.add_argument(
        "--until-quiet",
        type=int,
        default=0,
        metavar="K",
        help="after --rounds, go on until every variant has K quiet rounds (see --quiet-steal) or --max-rounds",
    )
    p.add_argument(
        "--max-rounds", type=int, default=0, help="with --until-quiet: at most this many rounds (default 3x --rounds)"
    )
    p.add_argument("--mixed-settings", action="store_true", help="also: four settings mixed in one batch vs one")
    p.add_argument("--plain", action="store_true", help="also: the first variant without masks and scores")
    p.add_argument(
        "--quiet-steal",
        type=float,
        default=0.01,
        help="a round is quiet when the hypervisor stole at most this share of the CPU time from it (default 0.01)",
    )
    p.add_argument("--piece-reps", type=int, default=10, help="calls timed per piece of the step breakdown (0: skip)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument(
        "--quality",
        metavar="MODEL",
        help="instead: compare bfloat16 with float32 decoding of a model folder (or a preset, random weights, with "
        "--tokenizer) on the bundled corpus and exit",
    )
    p.add_argument("--quality-lines", type=int, default=64, help="corpus lines for --quality (default 64)")
    return p.parse_args(argv)


def dtype_agreement(model: Any, tok: Any, texts: list[str]) -> dict[str, float]:
    """Teacher-forced next-token distributions of the float32 and bfloat16 decoders, compared.

    Returns:
        top-1 agreement, mean KL(fp32 || bf16) in nats, perplexity under each and the share of identical greedy continuations.
    """
    import numpy as np

    from kogpt2.decoder import Decoder

    seqs = [[tok.bos_id, *tok.encode(t)][:128] + [tok.eos_id] for t in texts]
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), tok.pad_id)
    mask = np.zeros((len(seqs), length - 1), dtype=bool)  # positions whose next token is real
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s) - 1] = True
    logp: dict[str, np.ndarray] = {}
    for dtype in ("float32", "bfloat16"):
        dec = Decoder(model, dtype)
        starts = np.zeros(len(seqs), dtype=np.int64)
        steps = [np.asarray(dec.prefill(ids[:, :1], starts, length))]  # (B, V) predicting ids[:, 1]
        for pos in range(1, length - 1):
            steps.append(np.asarray(dec.step(ids[:, pos], starts, pos)))
        logits = np.stack(steps, axis=1).astype(np.float64)  # (B, L-1, V)
        logits -= logits.max(axis=-1, keepdims=True)
        logp[dtype] = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    a, b = logp["float32"][mask], logp["bfloat16"][mask]  # (N, V)
    targets = ids[:, 1:][mask]
    rows = np.arange(len(targets))
    return {
        "positions": int(mask.sum()),
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "mean_kl_nats": float(np.mean(np.sum(np.exp(a) * (a - b), axis=-1))),
        "perplexity_float32": float(np.exp(-a[rows, targets].mean())),
        "perplexity_bfloat16": float(np.exp(-b[rows, targets].mean())),
        "greedy_identical": greedy_agreement(model, tok),
    }


def greedy_agreement(model: Any, tok: Any, new_tokens: int = 30) -> float:
    """Share of the bundled seed words whose greedy continuation is identical in float32 and bfloat16."""
    from kogpt2.generation import GenerationConfig, Generator

    seeds = (REPO / "kogpt2" / "data" / "seeds.txt").read_text(encoding="utf-8").split()
    config = GenerationConfig(strategy="greedy", max_new_tokens=new_tokens)
    runs = [Generator(model, tok, dtype=d).generate(seeds, config) for d in ("float32", "bfloat16")]
    return sum(a.text == b.text for a, b in zip(*runs, strict=True)) / len(seeds)


def notebook_tokens_per_s(model: Any, tok: Any, seed: str, n_tokens: int, top_p: float, max_new: int) -> float:
    """The notebook's ``generate_sent`` step, timed at ``n_tokens`` context lengths spread over a generation.

    One step of the notebook costs more as its text grows (it re-runs the whole sequence),
    so steps are timed on texts as long as the seed plus 0 .. ``max_new``-1 generated
    tokens (evenly spaced; the text is bundled-corpus prose) after one warm-up step:
    the mean over a ``max_new``-token generation.
    """
    import numpy as np

    from kogpt2.tf_setup import import_tf

    tf = import_tf()

    def top_p_filter(logits: Any, p: float, filter_value: float = -99999) -> Any:
        out = logits.numpy()
        sorted_logits = tf.sort(logits, direction="DESCENDING")
        sorted_indices = tf.argsort(logits, direction="DESCENDING")
        cumulative = tf.math.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = tf.concat([[False], (cumulative > p)[..., :-1]], axis=0)
        out[sorted_indices[remove].numpy().tolist()] = filter_value
        return tf.constant([out])

    def notebook_step(sent: str) -> str:
        input_ids = tf.constant([tok.bos_id, *tok.encode(sent)])[None, :]
        logits = model(input_ids)[0][:, -1, :]
        filtered = top_p_filter(logits[0], top_p)
        gen = int(tf.random.categorical(filtered, 1).numpy()[0][0])
        return sent if gen == tok.eos_id else sent + tok.id_to_piece(gen).replace("\u2581", " ")

    prose = tok.encode((REPO / "kogpt2" / "data" / "corpus.txt").read_text(encoding="utf-8").replace("\n", " "))
    lengths = np.linspace(0, max_new - 1, n_tokens).round().astype(int)
    notebook_step(seed)  # warm-up
    elapsed = 0.0
    for n in lengths:
        sent = seed + " " + tok.decode(prose[:n]) if n else seed
        start = time.perf_counter()
        notebook_step(sent)
        elapsed += time.perf_counter() - start
    return n_tokens / elapsed


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceiling_tokens_per_s(model: Any, batch: int, length: int, with_head: bool) -> float:
    """Tokens/s of one batched forward pass (graph mode): the median of 3 passes after a warm-up."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    ids = tf.fill([batch, length], 100)
    if with_head:
        fn = tf.function(lambda x: model(x, training=False).logits)
    else:
        fn = tf.function(lambda x: model.transformer(x, training=False)[0])
    return batch * length / median_seconds(lambda: fn(ids).numpy(), 3)


def step_pieces(gen: Any, rows: int, width: int, max_new: int, reps: int, config: Any) -> dict[str, float]:
    """Milliseconds of each piece of one decode step, apart, at the run's middle slot and its capacity.

    Returns:
        ``slot``, ``capacity`` and ms for ``attention`` (all layers), ``dense`` (every layer
        without its attention), ``head`` (final layer norm + LM head), ``step`` (a whole
        decoder step) and ``draw`` (the compiled sampler, with the run's masks).
    """
    import numpy as np

    from kogpt2.decode_loop import vocab_rules
    from kogpt2.sampling import DrawInputs
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    dec, tok = gen.decoder, gen.tokenizer
    starts = np.zeros(rows, dtype=np.int64)
    slot = width + max_new // 2
    dec.prefill(np.full((rows, width), tok.bos_id), starts, width + max_new - 1)
    if dec.cache_growth and slot >= dec.capacity:
        dec._grow(dec.level(slot + 1))
    tokens = np.full(rows, tok.bos_id)
    out: dict[str, float] = {"slot": slot, "capacity": dec.capacity}
    logits = dec.step(tokens, starts, slot)
    dt, emb = dec._dt, dec.n_embd
    qkv = tf.cast(tf.random.normal([rows, 3 * emb], dtype=tf.float32), dt)
    starts_t, slot_t = tf.constant(starts, tf.int32), tf.constant(slot, tf.int32)

    def attention_fn() -> Any:  # layer after layer, as in the step (each layer's head groups side by side)
        x = qkv
        for k_vars, v_vars in zip(dec._k, dec._v, strict=True):
            x = x + tf.reduce_sum(dec._attend_groups(k_vars, v_vars, x, starts_t, slot_t)) * 0
        return tf.reduce_sum(x)

    attention = tf.function(attention_fn)
    x = tf.cast(tf.random.normal([rows, emb]), dt)

    def dense_fn(x: Any) -> Any:
        for layer in dec._w["layers"]:
            x = dec._block(x, layer, lambda t: t[:, :emb])
        return x

    dense, head = tf.function(dense_fn), tf.function(dec._logits)
    seeds = np.arange(rows, dtype=np.uint64)
    rules = vocab_rules(tok, dec.vocab_size, config.suppress_tokens, config.valid_utf8)
    inputs = DrawInputs.make(seeds, 0, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    timed = {
        "attention": lambda: attention().numpy(),
        "dense": lambda: dense(x).numpy(),
        "head": lambda: head(x).numpy(),
        "step": lambda: dec.step(tokens, starts, slot).numpy(),
        "draw": lambda: gen.sampler.draw(logits, inputs, rules),
    }
    for name, fn in timed.items():
        out[name] = 1000 * median_seconds(fn, reps)
    dec.release()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quality:
        return quality(args)

    import kogpt2  # noqa: F401
    from kogpt2.decoder import DEFAULT_CACHE_GROWTH
    from kogpt2.generation import GenerationConfig, Generator, GenRow, prompt_bucket
    from kogpt2.model import new_model
    from kogpt2.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    model = new_model(args.preset, tok, seed=0)
    seeds = (REPO / "kogpt2" / "data" / "seeds.txt").read_text(encoding="utf-8").split()
    growths = args.cache_growth if args.cache_growth is not None else [DEFAULT_CACHE_GROWTH]
    config = GenerationConfig(top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    limit = model.config.n_positions - args.max_new_tokens

    def rows_for(batch: int) -> list[tuple[str, int]]:
        samples = -(-batch // len(seeds))
        return [(s, i) for i in range(samples) for s in seeds][:batch]

    variants: dict[str, dict[str, Any]] = {}
    combos = itertools.product(
        args.dtype, args.batch_size, growths, args.sampler, args.attention, args.attention_splits
    )
    for dtype, batch, growth, sampler, attention, splits in combos:
        gen = Generator(
            model,
            tok,
            dtype=dtype,
            batch_size=batch,
            cache_growth=growth,
            sampler=sampler,
            attention_splits=splits or None,
            attention=attention,
        )
        d = gen.decoder
        name = f"{dtype} b{batch} g{growth} {sampler} " + (
            "native" if d.attention == "native" else f"xla s{d.attention_splits}"
        )
        rows = rows_for(batch)
        start = time.perf_counter()
        gen.generate_rows(rows, config)  # every shape the run meets is compiled here
        first = time.perf_counter() - start
        gen.decoder.release()
        variants[name] = {
            "gen": gen,
            "rows": rows,
            "first_run_s": first,
            "compiles": gen.compiles,
            "tps": [],
            "ratios": [],
            "steal": [],  # (our run, the ceiling pass after it): shares of the CPU time stolen
        }
        print(f"{name}: first run (with compiles) {first:.1f} s, {gen.compiles} compiles", flush=True)

    first_name = next(iter(variants))
    first_v = variants[first_name]
    extra: dict[str, list[float]] = {"notebook": [], "ceiling": [], "ceiling_no_head": []}
    if args.plain:
        plain = Generator(
            model,
            tok,
            dtype=args.dtype[0],
            batch_size=len(first_v["rows"]),
            scores=False,
            cache_growth=growths[0],
            sampler=args.sampler[0],
        )
        plain_config = config.replace(valid_utf8=False, suppress_tokens=())
        plain.generate_rows(first_v["rows"], plain_config)
        extra["plain"] = []
    mixed_rows: dict[str, Any] = {}
    if args.mixed_settings:
        settings = [config.replace(**s) for s in MIXED_SETTINGS]
        base = first_v["rows"]
        mixed_rows = {
            "uniform": [GenRow(p, i, settings[0]) for p, i in base],
            "mixed": [GenRow(p, i, settings[n % 4]) for n, (p, i) in enumerate(base)],
        }
        first_v["gen"].generate_rows(mixed_rows["mixed"], config)  # compiles the sorted draw
        for n in range(4):  # and the split calls' smaller batch shapes
            first_v["gen"].generate_rows(mixed_rows["mixed"][n::4], config)
        first_v["gen"].decoder.release()
        for k in ("uniform", "mixed", "split"):
            extra[k] = []

    def run(gen: Any, rows: list[Any], cfg: Any) -> float:
        start = time.perf_counter()
        out = gen.generate_rows(rows, cfg)
        tps = sum(s.new_tokens for s in out) / (time.perf_counter() - start)
        gen.decoder.release()
        return tps

    for v in variants.values():
        v["gen"].timings.clear()
    names = list(variants)

    def quiet_enough(r: int) -> bool:
        if r < args.rounds:
            return False
        if not args.until_quiet or r >= (args.max_rounds or 3 * args.rounds):
            return True
        return all(
            quiet_figures(v["ratios"], v["steal"], args.quiet_steal)["quiet_rounds"] >= args.until_quiet
            for v in variants.values()
        )

    r = 0
    while not quiet_enough(r):
        if args.notebook_tokens:
            extra["notebook"].append(
                notebook_tokens_per_s(model, tok, seeds[0], args.notebook_tokens, args.top_p, args.max_new_tokens)
            )
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate which goes first
            v = variants[name]
            tps, ours_steal = with_steal(lambda v=v: run(v["gen"], v["rows"], config))
            # the ceiling right after each variant: this VM's speed drifts by tens of percent within
            # minutes, so each ratio compares two figures taken seconds apart
            ceiling, ceiling_steal = with_steal(
                lambda: ceiling_tokens_per_s(model, args.ceiling_batch, args.ceiling_len, True)
            )
            v["tps"].append(tps)
            v["ratios"].append(tps / ceiling)
            v["steal"].append((ours_steal, ceiling_steal))
        if args.plain:
            extra["plain"].append(run(plain, first_v["rows"], plain_config))
        if args.mixed_settings:
            g = first_v["gen"]
            extra["uniform"].append(run(g, mixed_rows["uniform"], config))
            extra["mixed"].append(run(g, mixed_rows["mixed"], config))
            start, tokens = time.perf_counter(), 0
            for n in range(4):
                tokens += sum(s.new_tokens for s in g.generate_rows(mixed_rows["mixed"][n::4], config))
            extra["split"].append(tokens / (time.perf_counter() - start))
            g.decoder.release()
        extra["ceiling"].append(ceiling_tokens_per_s(model, args.ceiling_batch, args.ceiling_len, True))
        extra["ceiling_no_head"].append(ceiling_tokens_per_s(model, args.ceiling_batch, args.ceiling_len, False))
        line = ", ".join(f"{n} {variants[n]['tps'][-1]:.1f}" for n in names)
        stolen = ", ".join(f"{n} {pct(variants[n]['steal'][-1][0])}/{pct(variants[n]['steal'][-1][1])}" for n in names)
        print(f"round {r + 1}: {line}; " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in extra.items() if v), flush=True)
        print(f"  stolen by the hypervisor (run/ceiling after it): {stolen}", flush=True)
        r += 1

    med = {k: statistics.median(v) for k, v in extra.items() if v}
    result: dict[str, Any] = {
        "preset": args.preset,
        "vocab_size": tok.vocab_size,
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "rounds": r,
        "statistic": "median of rounds (ceiling: each round the median of 3 passes)",
        "quiet_steal": args.quiet_steal,
        **{f"{k}_tokens_per_s": round(v, 2) for k, v in med.items()},
        "variants": {},
    }
    for name, v in variants.items():
        gen = v["gen"]
        tps = statistics.median(v["tps"])
        steps = max(gen.timings.get("steps", 0.0), 1.0)
        width = prompt_bucket(max(1 + len(tok.encode(s)) for s, _ in v["rows"]), limit)
        figures = {
            "tokens_per_s": round(tps, 1),
            "vs_ceiling": round(tps / med["ceiling"], 3),
            "vs_adjacent_ceiling": round(statistics.median(v["ratios"]), 3),
            "adjacent_ratios": [round(x, 3) for x in v["ratios"]],
            "steal_shares": [[None if x is None else round(x, 4) for x in pair] for pair in v["steal"]],
            **quiet_figures(v["ratios"], v["steal"], args.quiet_steal),
            "vs_ceiling_no_head": round(tps / med["ceiling_no_head"], 3),
            "vs_notebook": round(tps / med["notebook"], 1) if "notebook" in med else None,
            "first_run_s": round(v["first_run_s"], 1),
            "compiles": v["compiles"],
            "in_run_ms_per_step": {
                k: round(1000 * gen.timings.get(k, 0.0) / steps, 2) for k in ("decoder", "sampler", "host")
            },
        }
        if args.piece_reps:
            pieces = step_pieces(gen, len(v["rows"]), width, args.max_new_tokens, args.piece_reps, config)
            figures["pieces_ms"] = {k: round(x, 2) for k, x in pieces.items()}
        result["variants"][name] = figures
    if "plain" in med:
        result["contract_cost"] = round(1 - result["variants"][first_name]["tokens_per_s"] / med["plain"], 3)
    if args.mixed_settings:
        result["mixed_vs_uniform"] = round(med["mixed"] / med["uniform"], 3)
        result["mixed_vs_split"] = round(med["mixed"] / med["split"], 3)
    print_report(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def print_report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The figures as a readable table."""
    print(
        f"\nGeneration ({args.preset}, vocab {result['vocab_size']}), {args.max_new_tokens} new tokens, "
        f"top-p {args.top_p}, median of {result['rounds']} round(s):"
    )
    if "notebook_tokens_per_s" in result:
        print(f"  notebook method (batch 1, no cache)   {result['notebook_tokens_per_s']:>9} tokens/s")
    print(
        f"  ceiling: one batched forward pass     {result['ceiling_tokens_per_s']:>9} tokens/s "
        f"({args.ceiling_batch} x {args.ceiling_len}, fp32, logits included)\n"
        f"  ceiling without the LM head           {result['ceiling_no_head_tokens_per_s']:>9} tokens/s\n"
    )
    head = (
        f"  {'variant':<24} {'tokens/s':>9} {'/ceiling':>9} {'/adjacent':>10} {'/no head':>9} {'/notebook':>10} "
        f"{'1st run s':>10} {'compiles':>9} {'/adj quiet (rounds)':>20}"
    )
    print(head)
    for name, v in result["variants"].items():
        print(
            f"  {name:<24} {v['tokens_per_s']:>9} {v['vs_ceiling']:>9} {v['vs_adjacent_ceiling']:>10} "
            f"{v['vs_ceiling_no_head']:>9} {v['vs_notebook'] if v['vs_notebook'] is not None else '-':>10} "
            f"{v['first_run_s']:>10} {v['compiles']:>9} "
            f"{str(v['vs_adjacent_ceiling_quiet'] or '-') + ' (' + str(v['quiet_rounds']) + ')':>20}"
        )
    print(
        "  (/ceiling: medians of the rounds; /adjacent: the median of each round's tokens/s over a ceiling pass "
        "measured right after it; /adj quiet: the same over the rounds where the hypervisor stole at most "
        f"{pct(args.quiet_steal)} of the CPU time from either)"
    )
    print("\n  step breakdown, ms per step (in the run: decoder / sampler / host; apart, at the middle slot:")
    print("  attention, dense, head, whole step, draw)")
    print(
        f"  {'variant':<24} {'decoder':>8} {'sampler':>8} {'host':>6} | {'slot/cap':>8} {'attn':>7} {'dense':>7} {'head':>7} {'step':>7} {'draw':>7}"
    )
    for name, v in result["variants"].items():
        r = v["in_run_ms_per_step"]
        p = v.get("pieces_ms")
        apart = (
            f"{p['slot']:>4.0f}/{p['capacity']:<3.0f} {p['attention']:>7} {p['dense']:>7} {p['head']:>7} {p['step']:>7} {p['draw']:>7}"
            if p
            else "(skipped)"
        )
        print(f"  {name:<24} {r['decoder']:>8} {r['sampler']:>8} {r['host']:>6} | {apart}")
    if "contract_cost" in result:
        print(
            f"\n  without masks and scores: {result['plain_tokens_per_s']} tokens/s "
            f"(masks and scores cost {100 * result['contract_cost']:.1f}%)"
        )
    if "mixed_vs_uniform" in result:
        print(
            f"\n  four settings mixed in one batch: {result['mixed_tokens_per_s']} tokens/s; the same rows under one "
            f"setting: {result['uniform_tokens_per_s']}; split into one call per setting: {result['split_tokens_per_s']}\n"
            f"  mixed / uniform {result['mixed_vs_uniform']} (target >= 0.9), mixed / split {result['mixed_vs_split']}"
        )
    print(flush=True)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """``--quality``: bfloat16 against float32 on a model folder, or on a preset with random weights."""
    from kogpt2.model import PRESETS, load_model, new_model
    from kogpt2.tokenizer import load_tokenizer

    if args.quality in PRESETS and not Path(args.quality).exists():
        qtok = load_tokenizer(args.tokenizer)
        qmodel = new_model(args.quality, qtok, seed=0)
    else:
        qmodel, qtok = load_model(args.quality)
    corpus = (REPO / "kogpt2" / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    report = dtype_agreement(qmodel, qtok, [line for line in corpus if line.strip()][-args.quality_lines :])
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
