"""Benchmark the preprocessing pipeline against a raw encode loop and a plain loop doing its work.

    # the reference figures: the shared review corpus, v1 tokenizer, --max-len 64 (quiet machine!)
    .venv/bin/python benchmarks/preprocess.py --corpus ../shared/data/nsmc_reviews_a.txt.gz \
        --tokenizer ../shared/data/kogpt2_v1_tokenizer.spiece --max-len 64 --json pre.json
    # smoke runs
    .venv/bin/python benchmarks/preprocess.py --corpus ../shared/data/nsmc_reviews_a.txt.gz \
        --tokenizer ../shared/data/kogpt2_v1_tokenizer.spiece --max-len 64 --lines 20000 --memory-scale 2
    .venv/bin/python benchmarks/preprocess.py --lines 5000        # generated corpus, trained tokenizer

With ``--corpus`` it reads a real corpus (all its lines, or the first ``--lines`` copied into the
work folder); without, it generates a Korean corpus (deterministic, seeded) and trains a tokenizer
on it (or takes ``--tokenizer``). Then, each in a fresh process, side by side in one run:

- ``raw_encode``: what the tokenizer alone costs: read, NFKC, ``SentencePieceProcessor.encode``
  on batches of 4,096 lines;
- ``loop``: the project's plain loop: read, decode, normalize, filter, encode (``encode_batch``),
  frame, split, fit, pad, serialize and write gzip TFRecords, with the same pure functions as the
  pipeline, one line at a time;
- ``pipeline_1_worker`` / ``pipeline_2_workers``: the whole command, ``python -m
  pipelines.preprocess`` (DirectRunner/FnApiRunner, ``in_memory`` with 1 worker,
  ``--direct_running_mode=multi_processing --direct_num_workers=2``), into a fresh folder;
- ``memory_1x`` / ``memory_Nx``: peak RSS of the 1-worker command on 1x and N x the corpus
  (N copies of it), every process of the command counted.

``seconds`` is the wall time of each process from its start to its exit (interpreter start,
imports, tokenizer loading, runner start-up and the whole job included). The raw encode and the
two pipeline runs alternate for ``--repeat`` rounds (default 3) and each is reported by its
median round (this virtual machine's speed drifts by 10-20% over minutes). Targets: the
1-worker pipeline at >= 0.35x the raw encode loop's lines/s; 2 workers >= 1.4x one worker;
peak RSS at 10x within 1.3x of 1x.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 30
VAL_FRACTION = 0.1


def generate_lines(n: int, seed: int = 0) -> list[str]:
    """n deterministic, distinct Korean lines (the project's one generator; ``seed`` picks the stretch)."""
    from kogpt2.synthetic import korean_sentences

    return korean_sentences(n, start=seed * n)


def write_corpus(folder: Path, lines: int, copies: int) -> str:
    """Write ``copies`` files of ``lines`` lines each (different seeds); return their glob."""
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        path = folder / f"part-{c:03d}.txt"
        if not path.exists():
            path.write_text("\n".join(generate_lines(lines, seed=c)) + "\n", encoding="utf-8")
    return str(folder / "part-*.txt")


# --- children (each runs in its own process) -------------------------------------------


def _inputs(pattern: str) -> list[str]:
    import glob

    return sorted(glob.glob(pattern))


def _open(path: str):  # noqa: ANN202
    import gzip

    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def child_raw_encode(pattern: str, tokenizer: str, batch: int = 4096) -> dict:
    """Read, NFKC and ``SentencePieceProcessor.encode`` on batches of lines: the tokenizer's own speed."""
    import unicodedata

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    lines = tokens = 0
    texts: list[str] = []
    for path in _inputs(pattern):
        with _open(path) as f:
            for raw in f:
                lines += 1
                texts.append(unicodedata.normalize("NFKC", raw.decode("utf-8", "replace").rstrip("\r\n")))
                if len(texts) == batch:
                    tokens += sum(map(len, sp.encode(texts)))
                    texts = []
    if texts:
        tokens += sum(map(len, sp.encode(texts)))
    return {"lines": lines, "tokens": tokens}


def child_loop(pattern: str, tokenizer: str, output: str, max_len: int) -> dict:
    """The plain loop: the same work as the pipeline, in one process, no Beam, one line at a time."""
    import kogpt2  # noqa: F401
    from kogpt2 import records
    from kogpt2 import text as textlib
    from kogpt2.tf_setup import import_tf
    from kogpt2.tokenizer import load_tokenizer

    tf = import_tf()
    tok = load_tokenizer(tokenizer)
    os.makedirs(output, exist_ok=True)
    opts = tf.io.TFRecordOptions(compression_type="GZIP")
    writers = {s: tf.io.TFRecordWriter(os.path.join(output, records.shard_name(s, 0, 1)), opts) for s in records.SPLITS}
    lines_read = 0
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tok.encode_batch(batch), strict=True):
            framed = records.frame(ids, tok.bos_id, tok.eos_id)
            split = records.assign_split(records.stable_hash(text), VAL_FRACTION)
            for piece in records.fit(framed, max_len):
                writers[split].write(records.serialize_example(*records.pad(piece, max_len, tok.pad_id)))
        batch.clear()

    for path in _inputs(pattern):
        with _open(path) as f:
            for index, raw in enumerate(f):
                lines_read += 1
                try:
                    text = textlib.decode_line(raw.rstrip(b"\r\n"), "utf-8", file_start=index == 0)
                except UnicodeDecodeError:
                    continue
                norm = textlib.normalize_text(text)
                if textlib.filter_reason(norm, 1) is None:
                    batch.append(norm)
                    if len(batch) >= 512:
                        flush()
    flush()
    for w in writers.values():
        w.close()
    return {"lines": lines_read}


def child_command(pattern: str, tokenizer: str, output: str, workers: int, max_len: int) -> dict:
    """The command itself, as ``python -m pipelines.preprocess`` runs it, into a fresh folder."""
    import shutil

    from pipelines import preprocess

    shutil.rmtree(output, ignore_errors=True)  # a finished same run would be reported complete, not rerun
    mode = "in_memory" if workers == 1 else "multi_processing"
    argv = ["--input", pattern, "--tokenizer", tokenizer, "--output", output, "--max-len", str(max_len)]
    argv += [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    from pipelines.common import freeze_heap

    code = preprocess.run(argv)  # what `python -m pipelines.preprocess` runs, the frozen heap at exit included
    freeze_heap()
    assert code == 0, code
    from kogpt2 import outputs

    info = outputs.open_committed(output).read_json("info.json")
    return {"lines": info["counts"]["lines_read"], "tensorflow_imported": "tensorflow" in sys.modules}


def _child_main(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    start = time.perf_counter()
    if args.child == "raw_encode":
        result = child_raw_encode(args.pattern, args.tokenizer)
    elif args.child == "loop":
        result = child_loop(args.pattern, args.tokenizer, args.out, args.max_len)
    else:
        result = child_command(args.pattern, args.tokenizer, args.out, args.workers, args.max_len)
    result["work_seconds"] = time.perf_counter() - start  # after this script's own imports
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["max_rss_mib"] = max(me.ru_maxrss, kids.ru_maxrss) / 1024  # the largest process (workers too)
    result["cpu_seconds"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print("RESULT " + json.dumps(result))


def run_child(kind: str, pattern: str, tokenizer: str, out: Path, workers: int = 1, max_len: int = MAX_LEN) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--pattern", pattern, "--tokenizer", tokenizer]
    cmd += ["--out", str(out), "--workers", str(workers), "--max-len", str(max_len)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"seconds": seconds, **json.loads(line[len("RESULT ") :])}
    raise RuntimeError(f"{kind} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its own figures, so they stay consistent), with every round's seconds."""
    ranked = sorted(runs, key=lambda r: r["seconds"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_seconds": [r["seconds"] for r in runs]}


def corpus_copies(corpus: Path, work: Path, lines: int, copies: int) -> str:
    """``copies`` files holding ``corpus`` (its first ``lines`` lines, or all of it); return their glob."""
    import gzip

    folder = work / f"corpus-{copies}x"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".txt.gz" if corpus.name.endswith(".gz") else ".txt"
    first = folder / f"part-000{suffix}"
    if not first.exists():
        if lines:
            with _open(str(corpus)) as src:
                head = b"".join(itertools.islice(src, lines))
            first.write_bytes(gzip.compress(head, 6, mtime=0) if suffix == ".txt.gz" else head)
        else:
            first.symlink_to(corpus.resolve())
    for c in range(1, copies):
        path = folder / f"part-{c:03d}{suffix}"
        if not path.exists():
            path.symlink_to(first.resolve())
    return str(folder / f"part-*{suffix}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="a real corpus file (.txt or .txt.gz) instead of a generated one")
    p.add_argument(
        "--lines", type=int, help="lines of the 1x corpus (generated: default 200,000; --corpus: default all)"
    )
    p.add_argument("--max-len", type=int, default=MAX_LEN, help=f"--max-len of every run (default {MAX_LEN})")
    p.add_argument("--memory-scale", type=int, default=10, help="the big corpus is this many times 1x (default 10)")
    p.add_argument(
        "--repeat", type=int, default=3, help="rounds of raw encode / 1 / 2 workers, alternated; medians (default 3)"
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the N x peak RSS run")
    p.add_argument("--skip-loop", action="store_true", help="skip the project's plain loop (it imports TensorFlow)")
    p.add_argument("--workdir", default="runs/bench-preprocess", help="corpus, tokenizer and outputs go here")
    p.add_argument("--tokenizer", help="tokenizer to use (default: train one on the corpus, vocab 4000)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--child", choices=["raw_encode", "loop", "pipeline"], help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child_main(args)
        return

    if args.corpus:
        corpus = Path(args.corpus).resolve()
        work = Path(args.workdir).resolve() / f"{corpus.name}-{args.lines or 'all'}"
        one = corpus_copies(corpus, work, args.lines or 0, 1)
    else:
        lines = args.lines or 200_000
        work = Path(args.workdir).resolve() / f"lines-{lines}"
        one = write_corpus(work / "corpus-1x", lines, 1)
    tokenizer = args.tokenizer
    if not tokenizer:
        sys.path.insert(0, str(REPO))
        from kogpt2.tokenizer import train_tokenizer

        tok_dir = work / "tokenizer"
        if not (tok_dir / "tokenizer.spiece").exists():
            sample = _inputs(one)[0]
            if sample.endswith(".gz"):
                plain = work / "tokenizer-sample.txt"
                with _open(sample) as src:
                    plain.write_bytes(b"".join(itertools.islice(src, 200_000)))
                sample = str(plain)
            train_tokenizer([sample], 4000, tok_dir)
        tokenizer = str(tok_dir / "tokenizer.spiece")
    tokenizer = str(Path(tokenizer).resolve())

    size = sum(os.path.getsize(f) for f in _inputs(one))
    print(f"corpus: {one} ({size / 2**20:.1f} MiB), tokenizer {tokenizer}, --max-len {args.max_len}")
    # the compared runs alternate, round after round (a drift of the machine hits them all alike);
    # each is reported by its median round
    rounds: dict[str, list[dict]] = {"raw_encode": [], "pipeline_1_worker": [], "pipeline_2_workers": []}
    for _ in range(args.repeat):
        rounds["raw_encode"].append(run_child("raw_encode", one, tokenizer, work / "out-raw", max_len=args.max_len))
        rounds["pipeline_1_worker"].append(run_child("pipeline", one, tokenizer, work / "out-1w", 1, args.max_len))
        rounds["pipeline_2_workers"].append(run_child("pipeline", one, tokenizer, work / "out-2w", 2, args.max_len))
    results: dict[str, dict] = {"raw_encode": median_run(rounds["raw_encode"])}
    if not args.skip_loop:
        results["loop"] = run_child("loop", one, tokenizer, work / "out-loop", max_len=args.max_len)
    results["pipeline_1_worker"] = median_run(rounds["pipeline_1_worker"])
    results["pipeline_2_workers"] = median_run(rounds["pipeline_2_workers"])
    if not args.skip_memory:
        if args.corpus:
            big = corpus_copies(Path(args.corpus).resolve(), work, args.lines or 0, args.memory_scale)
        else:
            big = write_corpus(work / f"corpus-{args.memory_scale}x", args.lines or 200_000, args.memory_scale)
        results["memory_1x"] = results["pipeline_1_worker"]
        results[f"memory_{args.memory_scale}x"] = run_child(
            "pipeline", big, tokenizer, work / "out-big", 1, args.max_len
        )

    raw_rate = results["raw_encode"]["lines"] / results["raw_encode"]["seconds"]
    loop_rate = results["loop"]["lines"] / results["loop"]["seconds"] if "loop" in results else float("nan")
    print(
        f"\n{'run':<20}{'lines':>10}{'seconds':>9}{'work s':>8}{'CPU s':>8}{'lines/s':>10}"
        f"{'vs raw':>8}{'vs loop':>8}{'peak RSS MiB':>14}"
    )
    for name, r in results.items():
        rate = r["lines"] / r["seconds"]
        r.update(lines_per_s=rate, vs_raw_encode=rate / raw_rate, vs_loop=rate / loop_rate)
        print(
            f"{name:<20}{r['lines']:>10}{r['seconds']:>9.2f}{r['work_seconds']:>8.2f}{r['cpu_seconds']:>8.1f}"
            f"{rate:>10.0f}{rate / raw_rate:>7.2f}x{rate / loop_rate:>7.2f}x{r['max_rss_mib']:>14.0f}"
        )
    for name, runs in rounds.items():
        print(f"  {name}: median of {len(runs)} rounds, seconds " + ", ".join(f"{r['seconds']:.2f}" for r in runs))
    one_worker = results["pipeline_1_worker"]["lines_per_s"]
    summary = {
        "pipeline_1_worker_vs_raw_encode": results["pipeline_1_worker"]["vs_raw_encode"],  # target >= 0.35
        "pipeline_2_workers_vs_1_worker": results["pipeline_2_workers"]["lines_per_s"] / one_worker,  # >= 1.4
        "pipeline_1_worker_vs_loop": results["pipeline_1_worker"]["vs_loop"],
        "loop_vs_raw_encode": loop_rate / raw_rate,
    }
    if not args.skip_memory:
        big_key = f"memory_{args.memory_scale}x"
        summary["rss_ratio_big_vs_1x"] = results[big_key]["max_rss_mib"] / results["memory_1x"]["max_rss_mib"]  # <= 1.3
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        doc = {"corpus": one, "tokenizer": tokenizer, "max_len": args.max_len, "results": results, "summary": summary}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
