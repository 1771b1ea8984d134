"""Benchmark generation: our batched path vs the notebook's method vs one batched forward pass.

    .venv/bin/python benchmarks/generate.py                       # KoGPT2 shape, top-p 0.95, 100 new tokens
    .venv/bin/python benchmarks/generate.py --dtype bfloat16      # bfloat16 decoder (ceiling stays fp32)
    .venv/bin/python benchmarks/generate.py --preset tiny --batch-size 8 --max-new-tokens 10 \\
        --notebook-tokens 2 --ceiling-batch 2 --ceiling-len 16   # smoke run

Measured, in one process, in turn (``--rounds`` rounds; the median counts), random weights:

- ``notebook``: the notebook's ``generate_sent``: batch 1, no cache; every token re-encodes
  the text so far, re-runs the whole sequence through the transformers model (eager) and
  filters top-p by sorting the 50,000 logits (``tf_top_k_top_p_filtering``), then
  ``tf.random.categorical``. It is slow, so only ``--notebook-tokens`` steps are timed, at
  context lengths spread evenly over a ``--max-new-tokens`` generation (a step costs more
  as the text grows): their mean is the mean over the whole generation.
- ``ours``: :class:`kogpt2.generation.Generator` as the bulk pipeline uses it: ``--batch-size``
  rows (seed words x samples), ``--max-new-tokens`` new tokens each, top-p ``--top-p``.
  Random weights rarely emit ``</s>``, so every row runs the full budget (the worst case:
  no batch compaction) and the nucleus holds most of the vocabulary (the worst case for
  the sampler). Compile time (tracing and XLA compiles on the run's shapes) is measured
  apart, before the timed runs.
- ``ceiling``: one batched forward pass of the same transformers model (graph mode, fp32,
  logits included) on ``--ceiling-batch`` x ``--ceiling-len`` tokens; also without the LM head.

- ``plain``: ours without what the generation contract adds (no valid-UTF-8 or
  special-token masks, no log-probability scores), to show their cost.

Targets: ours >= 100x notebook and >= 0.5x ceiling. The machine may be shared:
compare the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V1_TOKENIZER = REPO.parent / "shared" / "data" / "kogpt2_v1_tokenizer.spiece"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", help="model shape (default base: 12 x 768, the KoGPT2 shape)")
    p.add_argument("--tokenizer", default=str(V1_TOKENIZER), help="tokenizer file (default: the real v1, 50,000)")
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together (default 64, the pipeline's)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--notebook-tokens", type=int, default=5, help="tokens timed with the notebook method")
    p.add_argument("--ceiling-batch", type=int, default=8)
    p.add_argument("--ceiling-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="measure everything this many times; report medians")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument(
        "--quality",
        metavar="MODEL_DIR",
        help="instead: compare bfloat16 with float32 decoding of a model folder on the bundled corpus and exit",
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
        steps = [dec.prefill(ids[:, :1], starts, length)]  # (B, V) predicting ids[:, 1]
        for pos in range(1, length - 1):
            steps.append(dec.step(ids[:, pos], starts, pos))
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


def ceiling_tokens_per_s(model: Any, batch: int, length: int, with_head: bool) -> float:
    """Tokens/s of one batched forward pass (graph mode), best of 3 after a warm-up."""
    from kogpt2.tf_setup import import_tf

    tf = import_tf()
    ids = tf.fill([batch, length], 100)
    if with_head:
        fn = tf.function(lambda x: model(x, training=False).logits)
    else:
        fn = tf.function(lambda x: model.transformer(x, training=False)[0])
    fn(ids).numpy()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(ids).numpy()
        best = min(best, time.perf_counter() - start)
    return batch * length / best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import numpy as np

    if args.quality:
        from kogpt2.model import load_model

        qmodel, qtok = load_model(args.quality)
        corpus = (REPO / "kogpt2" / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()
        report = dtype_agreement(qmodel, qtok, [line for line in corpus if line.strip()][-args.quality_lines :])
        print(json.dumps(report, indent=2))
        return report

    import kogpt2  # noqa: F401
    from kogpt2.generation import GenerationConfig, Generator, prompt_bucket
    from kogpt2.model import new_model
    from kogpt2.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    model = new_model(args.preset, tok, seed=0)
    seeds = (REPO / "kogpt2" / "data" / "seeds.txt").read_text(encoding="utf-8").split()
    samples = -(-args.batch_size // len(seeds))
    rows = [(s, i) for i in range(samples) for s in seeds][: args.batch_size]
    config = GenerationConfig(top_p=args.top_p, max_new_tokens=args.max_new_tokens, num_samples=samples)
    gen = Generator(model, tok, dtype=args.dtype, batch_size=args.batch_size)
    # the same without what the generation contract adds: no UTF-8 or special-token masks, no scores
    plain = Generator(model, tok, dtype=args.dtype, batch_size=args.batch_size, scores=False)
    plain_config = config.replace(valid_utf8=False, suppress_tokens=())

    # Compile on the run's shapes: one prefill and one step (tracing + XLA compiles).
    limit = model.config.n_positions - args.max_new_tokens
    width = prompt_bucket(max(1 + len(tok.encode(s)) for s, _ in rows), limit)
    start = time.perf_counter()
    ids = np.full((len(rows), width), tok.bos_id)
    starts = np.zeros(len(rows), dtype=np.int64)
    gen.decoder.prefill(ids, starts, width + args.max_new_tokens - 1)
    gen.decoder.step(np.full(len(rows), tok.bos_id), starts, width)
    compile_s = time.perf_counter() - start
    plain.decoder.prefill(ids, starts, width + args.max_new_tokens - 1)
    plain.decoder.step(np.full(len(rows), tok.bos_id), starts, width)

    figures: dict[str, list[float]] = {"notebook": [], "ours": [], "plain": [], "ceiling": [], "ceiling_no_head": []}
    for r in range(args.rounds):
        figures["notebook"].append(
            notebook_tokens_per_s(model, tok, seeds[0], args.notebook_tokens, args.top_p, args.max_new_tokens)
        )
        # ours and plain alternate which goes first, so neither always follows the notebook's eager run
        pair = [("ours", gen, config), ("plain", plain, plain_config)]
        for name, g, c in pair if r % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            out = g.generate_rows(rows, c)
            figures[name].append(sum(s.new_tokens for s in out) / (time.perf_counter() - start))
        figures["ceiling"].append(ceiling_tokens_per_s(model, args.ceiling_batch, args.ceiling_len, True))
        figures["ceiling_no_head"].append(ceiling_tokens_per_s(model, args.ceiling_batch, args.ceiling_len, False))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()), flush=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    result = {
        "preset": args.preset,
        "vocab_size": tok.vocab_size,
        "dtype": args.dtype,
        "batch_size": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "rounds": args.rounds,
        "notebook_tokens_per_s": round(med["notebook"], 2),
        "ours_tokens_per_s": round(med["ours"], 1),
        "plain_tokens_per_s": round(med["plain"], 1),
        "contract_cost": round(1 - med["ours"] / med["plain"], 3),
        "ceiling_tokens_per_s": round(med["ceiling"], 1),
        "ceiling_no_head_tokens_per_s": round(med["ceiling_no_head"], 1),
        "ours_vs_notebook": round(med["ours"] / med["notebook"], 1),
        "ours_vs_ceiling": round(med["ours"] / med["ceiling"], 3),
        "ours_vs_ceiling_no_head": round(med["ours"] / med["ceiling_no_head"], 3),
        "compile_seconds": round(compile_s, 2),
        "compiles": gen.compiles,
        "graph_traces": gen.decoder.traces,
        "xla_compiles": gen.decoder.xla_compiles,
    }
    print(
        f"\nKoGPT2-shape generation ({args.preset}, vocab {tok.vocab_size}, {args.dtype}), "
        f"{args.max_new_tokens} new tokens, top-p {args.top_p}, median of {args.rounds} round(s):\n"
        f"  notebook method (batch 1, no cache)    {result['notebook_tokens_per_s']:>9} tokens/s\n"
        f"  {'ours (batch ' + str(len(rows)) + ')':<38} {result['ours_tokens_per_s']:>9} tokens/s\n"
        f"  ours without masks and scores          {result['plain_tokens_per_s']:>9} tokens/s "
        f"(masks and scores cost {100 * result['contract_cost']:.1f}%)\n"
        f"  ceiling: one batched forward pass      {result['ceiling_tokens_per_s']:>9} tokens/s "
        f"({args.ceiling_batch} x {args.ceiling_len}, fp32, logits included)\n"
        f"  ceiling without the LM head            {result['ceiling_no_head_tokens_per_s']:>9} tokens/s\n"
        f"  ours / notebook                        {result['ours_vs_notebook']:>9}x   (target >= 100x)\n"
        f"  ours / ceiling                         {result['ours_vs_ceiling']:>9}    (target >= 0.5)\n"
        f"  ours / ceiling without the LM head     {result['ours_vs_ceiling_no_head']:>9}\n"
        f"  compile (first prefill + step)         {result['compile_seconds']:>9} s\n"
        f"  compiles (graph traces + XLA)          {result['compiles']:>9}",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
