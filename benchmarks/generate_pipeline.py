"""Benchmark bulk generation: the Beam pipeline against its own library, and its memory.

    .venv/bin/python benchmarks/generate_pipeline.py                  # 10,000 and 30,000 real seeds
    .venv/bin/python benchmarks/generate_pipeline.py --sizes 200 2000 # smoke run

Seeds are real: the first two words of each movie review in
``../shared/data/nsmc_reviews_a.txt.gz`` (distinct, in file order), so prompt lengths vary
as in real jobs. Model: the ``--preset`` shape (default ``tiny``) with the real v1 tokenizer
(vocabulary 50,000), random weights, saved to a folder. Greedy, ``--max-new-tokens`` (16).

Each measurement runs in a fresh process (imports excluded from the timing, model load and
compiles included in both), one after the other, in ``--rounds`` alternating rounds (library
first, then pipeline first, ...: a machine whose speed drifts skews both sides alike):

- ``library``: ``Generator.from_folder`` + ``Generator.generate`` on all of the largest
  size's seeds in one call (the ideal batching).
- ``pipeline``: ``python -m pipelines.generate`` (DirectRunner / FnApiRunner) on the same
  seeds, from ``run()`` entry to its return; and once on the smallest size.

Printed: the medians' tokens/s of both and their ratio (target >= 0.9x); the pipeline's peak
RSS at both sizes and its growth per row (target < 1 KB per row). Both sizes span several
work units, so the decoder's compiled shapes (a bounded, one-off cost) are mostly the same in
both. Nothing else may run meanwhile.

``--mixed``: instead, two sampling pipelines on the same rows (a JSONL table, the smallest size,
run alternately ``--rounds`` times, medians): every row under the job's one setting (top-p 0.95),
and the rows cycling through four settings of their own (columns ``temperature``, ``top_p``,
``top_k``), decoded in shared batches. Target: mixed >= 0.9x the tokens/s of uniform.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from steal import pct, with_steal  # noqa: E402  (benchmarks/steal.py)

CHILD_LIBRARY = """
import json, resource, sys, time
import kogpt2
from kogpt2.generation import Generator, GenerationConfig
model, seeds_file, batch, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seeds = open(seeds_file, encoding="utf-8").read().splitlines()
started = time.perf_counter()
gen = Generator.from_folder(model, batch_size=batch)
samples = gen.generate(seeds, GenerationConfig(strategy="greedy", max_new_tokens=max_new))
seconds = time.perf_counter() - started
tokens = sum(s.new_tokens for s in samples)
print(json.dumps({"rows": len(samples), "tokens": tokens, "seconds": seconds,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_PIPELINE = """
import json, resource, sys, time
import kogpt2
from pipelines.generate import run
argv = sys.argv[1:]
started = time.perf_counter()
status = run(argv)
seconds = time.perf_counter() - started
out = argv[argv.index("--output") + 1]
from kogpt2 import outputs
info = outputs.open_committed(out).read_json("info.json")
print(json.dumps({"status": status, "rows": info["counts"]["rows"], "tokens": info["new_tokens"],
                  "seconds": seconds, "files": info["units"]["total"],
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def real_seeds(path: Path, n: int) -> list[str]:
    """The first ``n`` distinct two-word prefixes of the reviews, in file order."""
    seen: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if len(words) >= 1:
                seen.setdefault(" ".join(words[:2]), None)
                if len(seen) >= n:
                    break
    if len(seen) < n:
        raise SystemExit(f"{path} gives only {len(seen)} distinct seeds")
    return list(seen)


def child(code: str, args: list[str]) -> dict:
    """Run ``code`` in a fresh process; its last stdout line (JSON), with ``steal``: the share of the
    machine's CPU time the hypervisor gave to other guests meanwhile."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    proc, steal = with_steal(
        lambda: subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False, cwd=REPO
        )
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "steal": steal}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reviews", default=str(SHARED / "nsmc_reviews_a.txt.gz"))
    p.add_argument("--tokenizer", default=str(SHARED / "kogpt2_v1_tokenizer.spiece"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sizes", type=int, nargs=2, default=[10000, 30000], metavar=("SMALL", "LARGE"))
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=0, help="0: the pipeline's default")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--mixed", action="store_true", help="instead: rows mixing four settings vs one setting")
    p.add_argument("--rounds", type=int, default=0, help="alternating rounds, medians (0: 2, or 3 with --mixed)")
    args = p.parse_args(argv)

    import kogpt2  # noqa: F401
    from kogpt2.generation import DEFAULT_BATCH_SIZE
    from kogpt2.model import new_model, save_model
    from kogpt2.tokenizer import load_tokenizer

    batch = args.batch_size or DEFAULT_BATCH_SIZE
    small, large = sorted(args.sizes)
    work = Path(tempfile.mkdtemp(prefix="bench-genpipe-"))
    tok = load_tokenizer(args.tokenizer)
    model_dir = work / "model"
    save_model(new_model(args.preset, tok, seed=0), tok, model_dir, {"steps": 0})
    seeds = real_seeds(Path(args.reviews), large)
    files = {}
    for n in (small, large):
        files[n] = work / f"seeds-{n}.txt"
        files[n].write_text("\n".join(seeds[:n]) + "\n", encoding="utf-8")
    lengths = [len(tok.encode(s)) + 1 for s in seeds]
    print(
        f"{large} real seeds, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f}); "
        f"preset {args.preset}, vocab {tok.vocab_size}, greedy, {args.max_new_tokens} new tokens, batch {batch}"
    )

    def pipeline(n: int, tag: str) -> dict:
        out = work / f"out-{n}-{tag}"
        return child(
            CHILD_PIPELINE,
            ["--model", str(model_dir), "--seeds", str(files[n]), "--output", str(out), "--greedy",
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(batch), "--progress-seconds", "600"],
        )  # fmt: skip

    if args.mixed:
        return mixed_settings(args, work, model_dir, seeds[:small], batch)
    import statistics

    rounds = args.rounds or 2
    libs: list[dict] = []
    pipes: list[dict] = []
    for r in range(rounds):  # alternating order: a machine that drifts skews both sides alike
        for side in ("library", "pipeline") if r % 2 == 0 else ("pipeline", "library"):
            if side == "library":
                libs.append(
                    child(CHILD_LIBRARY, [str(model_dir), str(files[large]), str(batch), str(args.max_new_tokens)])
                )
            else:
                pipes.append(pipeline(large, str(r)))
        print(
            f"round {r + 1}: library {libs[-1]['tokens'] / libs[-1]['seconds']:,.0f} tokens/s, "
            f"pipeline {pipes[-1]['tokens'] / pipes[-1]['seconds']:,.0f} tokens/s "
            f"(stolen by the hypervisor: {pct(libs[-1]['steal'])} / {pct(pipes[-1]['steal'])})",
            flush=True,
        )
    little = pipeline(small, "small")
    lib_tps = statistics.median(x["tokens"] / x["seconds"] for x in libs)
    pipe_tps = statistics.median(x["tokens"] / x["seconds"] for x in pipes)
    big_rss = max(x["max_rss_mb"] for x in pipes)
    growth_kb = (big_rss - little["max_rss_mb"]) * 1024 / (large - little["rows"])
    figures = {
        "seeds": large,
        "batch_size": batch,
        "rounds": rounds,
        "library": libs,
        "pipeline": pipes,
        "pipeline_small": little,
        "tokens_per_second": {"library": round(lib_tps, 1), "pipeline": round(pipe_tps, 1)},
        "ratio": round(pipe_tps / lib_tps, 3),
        "rss_growth_kb_per_row": round(growth_kb, 3),
    }
    print(f"library : median {lib_tps:,.0f} tokens/s over {rounds} runs of {large} rows")
    print(f"pipeline: median {pipe_tps:,.0f} tokens/s over {rounds} runs of {large} rows ({pipes[0]['files']} files)")
    print(f"pipeline / library = {figures['ratio']:.3f}x (target >= 0.9x)")
    print(
        f"pipeline peak RSS: {little['max_rss_mb']:.0f} MB at {little['rows']} rows, {big_rss:.0f} MB at "
        f"{large} rows: {growth_kb:+.3f} KB per row (target < 1 KB)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


#: The four settings rows cycle through in ``--mixed`` (the uniform run uses the job's default, top-p 0.95).
MIXED = [
    {"temperature": 0.7},
    {"top_p": 0.8, "temperature": 1.2},
    {"top_k": 50},
    {"top_p": 0.9},
]


def mixed_settings(args: argparse.Namespace, work: Path, model_dir: Path, seeds: list[str], batch: int) -> int:
    """Pipelines on the same rows: one setting for all vs four settings mixed in shared batches."""
    import statistics

    uniform_file, mixed_file = work / "uniform.jsonl", work / "mixed.jsonl"
    uniform_file.write_text("".join(json.dumps({"seed": s}, ensure_ascii=False) + "\n" for s in seeds), "utf-8")
    mixed_file.write_text(
        "".join(json.dumps({"seed": s, **MIXED[i % 4]}, ensure_ascii=False) + "\n" for i, s in enumerate(seeds)),
        "utf-8",
    )
    print(f"{len(seeds)} rows, sampling, {args.max_new_tokens} new tokens, batch {batch}; mixed: four settings {MIXED}")
    runs: dict[str, list[dict]] = {"uniform": [], "mixed": []}
    rounds = args.rounds or 3
    for r in range(rounds):
        for name in ("uniform", "mixed") if r % 2 == 0 else ("mixed", "uniform"):
            seeds_file = uniform_file if name == "uniform" else mixed_file
            out = work / f"out-{name}-{r}"
            runs[name].append(
                child(
                    CHILD_PIPELINE,
                    [
                        "--model",
                        str(model_dir),
                        "--seeds",
                        str(seeds_file),
                        "--output",
                        str(out),
                        "--max-new-tokens",
                        str(args.max_new_tokens),
                        "--batch-size",
                        str(batch),
                        "--progress-seconds",
                        "600",
                    ],
                )  # fmt: skip
            )
    tps = {name: statistics.median(x["tokens"] / x["seconds"] for x in xs) for name, xs in runs.items()}
    ratio = tps["mixed"] / tps["uniform"]
    for name in ("uniform", "mixed"):
        print(f"{name:8}: median {tps[name]:,.0f} tokens/s over {rounds} runs")
    print(f"mixed / uniform = {ratio:.3f}x (target >= 0.9x)")
    if args.json:
        figures = {"rows": len(seeds), "batch_size": batch, "runs": runs, "tokens_per_second": tps,
                   "ratio": round(ratio, 3), "settings": MIXED}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
