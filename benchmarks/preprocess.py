"""Benchmark the preprocessing pipeline against a plain single-process loop doing the same work.

    .venv/bin/python benchmarks/preprocess.py                # 200,000 lines, memory at 1x and 10x
    .venv/bin/python benchmarks/preprocess.py --lines 5000   # a quick smoke run

It generates a Korean corpus (deterministic, seeded), trains a tokenizer on it (or takes
``--tokenizer``), then runs, each in a fresh subprocess:

- ``loop``: read, decode, normalize, filter, encode (``encode_batch``), frame, split, fit,
  pad, serialize and write gzip TFRecords, with the same pure functions as the pipeline;
- the pipeline on the DirectRunner (FnApiRunner) with 1 worker (``in_memory``) and 2 workers
  (``multi_processing``);
- the pipeline with 1 worker on 1x and 10x the corpus, for peak RSS (``ru_maxrss`` of the
  single process).

Times exclude interpreter start and module imports (TensorFlow and Beam are imported before
the clock starts in every child); they include pipeline construction, runner and worker
start-up. Targets (issue 3): 1 worker >= 0.7x the loop; peak RSS at 10x within 1.3x of 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 30
VAL_FRACTION = 0.1

_SUBJECTS = [
    "그는",
    "그녀는",
    "아이들은",
    "어머니는",
    "노인은",
    "우리는",
    "사람들은",
    "김첨지는",
    "마을 사람들은",
    "낯선 손님은",
    "동생은",
    "선생님은",
    "할머니는",
    "그 젊은이는",
    "우체부는",
]
_TIMES = [
    "이때",
    "그날 밤",
    "마침내",
    "새벽녘에",
    "비가 그친 뒤",
    "해 질 무렵",
    "오랜만에",
    "어느 봄날",
    "한참 뒤에",
    "겨울 아침에",
    "",
]
_PLACES = [
    "시장에서",
    "강가에서",
    "학교 앞에서",
    "비 오는 거리에서",
    "기차역에서",
    "작은 방에서",
    "산길에서",
    "부엌에서",
    "정거장 앞에서",
    "골목 어귀에서",
    "다리 위에서",
    "바닷가에서",
]
_OBJECTS = [
    "편지를",
    "밥을",
    "노래를",
    "하늘을",
    "창밖을",
    "사진을",
    "책을",
    "꽃을",
    "우산을",
    "인력거를",
    "설렁탕을",
    "약을",
]
_VERBS = [
    "오래 바라보았다",
    "조용히 읽었다",
    "천천히 지었다",
    "다시 불렀다",
    "말없이 보았다",
    "힘껏 끌었다",
    "몰래 숨겼다",
    "한참 기다렸다",
    "끝내 잊지 못했다",
    "가만히 쥐었다",
]
_TAILS = [
    "",
    "",
    "",
    " 그리고 다시는 그곳에 가지 않았다.",
    " 바람이 불어 모든 것이 흔들리고 있었다.",
    " 그것은 누구도 예상하지 못한 일이었다.",
    " 마음 한구석이 이상하게 허전하였다.",
]


def generate_lines(n: int, seed: int = 0) -> list[str]:
    """n deterministic Korean lines of varied length (some longer than MAX_LEN tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        when = rng.choice(_TIMES)
        parts = [when] if when else []
        parts += [rng.choice(_SUBJECTS), rng.choice(_PLACES), rng.choice(_OBJECTS), rng.choice(_VERBS) + "."]
        line = " ".join(parts) + rng.choice(_TAILS)
        if rng.random() < 0.3:
            line += f" 그것이 {i % 997}번째 일이었다."
        out.append(line)
    return out


def write_corpus(folder: Path, lines: int, copies: int) -> str:
    """Write ``copies`` files of ``lines`` lines each (different seeds); return their glob."""
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        path = folder / f"part-{c:03d}.txt"
        if not path.exists():
            path.write_text("\n".join(generate_lines(lines, seed=c)) + "\n", encoding="utf-8")
    return str(folder / "part-*.txt")


# --- children (each runs in its own process) -------------------------------------------


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_loop(pattern: str, tokenizer: str, output: str) -> dict:
    """The plain loop: the same work as the pipeline, in one process, no Beam."""
    import glob

    import kogpt2  # noqa: F401
    from kogpt2 import records
    from kogpt2 import text as textlib
    from kogpt2.tf_setup import import_tf
    from kogpt2.tokenizer import load_tokenizer

    tf = import_tf()
    cpu, start = _cpu(), time.perf_counter()
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
            for piece in records.fit(framed, MAX_LEN):
                writers[split].write(records.serialize_example(*records.pad(piece, MAX_LEN, tok.pad_id)))
        batch.clear()

    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
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
    return {"seconds": time.perf_counter() - start, "lines": lines_read, "cpu_before": cpu}


def child_pipeline(pattern: str, tokenizer: str, output: str, workers: int) -> dict:
    """The pipeline through its command-line entry point, 1 worker in-process or N processes."""
    import kogpt2  # noqa: F401
    from kogpt2.tf_setup import import_tf
    from pipelines import preprocess

    import_tf()
    mode = "in_memory" if workers == 1 else "multi_processing"
    argv = [
        "--input",
        pattern,
        "--tokenizer",
        tokenizer,
        "--output",
        output,
        "--max-len",
        str(MAX_LEN),
        "--overwrite",
        f"--direct_running_mode={mode}",
        f"--direct_num_workers={workers}",
    ]
    cpu, start = _cpu(), time.perf_counter()
    info = preprocess.run(argv)
    return {"seconds": time.perf_counter() - start, "lines": info["counts"]["lines_read"], "cpu_before": cpu}


def _child_main(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    if args.child == "loop":
        result = child_loop(args.pattern, args.tokenizer, args.out)
    else:
        result = child_pipeline(args.pattern, args.tokenizer, args.out, args.workers)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["max_rss_mib"] = me.ru_maxrss / 1024
    result["cpu_seconds"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - result.pop("cpu_before")
    print("RESULT " + json.dumps(result))


def run_child(kind: str, pattern: str, tokenizer: str, out: Path, workers: int = 1) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--pattern",
        pattern,
        "--tokenizer",
        tokenizer,
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{kind} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=200_000, help="lines of the 1x corpus (default 200,000)")
    p.add_argument("--memory-scale", type=int, default=10, help="the big corpus is this many times 1x (default 10)")
    p.add_argument("--skip-memory", action="store_true", help="skip the 1x / 10x peak RSS runs")
    p.add_argument("--workdir", default="runs/bench-preprocess", help="corpus, tokenizer and outputs go here")
    p.add_argument("--tokenizer", help="tokenizer to use (default: train one on the corpus, vocab 4000)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--child", choices=["loop", "pipeline"], help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child_main(args)
        return

    work = Path(args.workdir).resolve() / f"lines-{args.lines}"
    one = write_corpus(work / "corpus-1x", args.lines, 1)
    tokenizer = args.tokenizer
    if not tokenizer:
        sys.path.insert(0, str(REPO))
        from kogpt2.tokenizer import train_tokenizer

        tok_dir = work / "tokenizer"
        if not (tok_dir / "tokenizer.spiece").exists():
            train_tokenizer([one.replace("part-*", "part-000")], 4000, tok_dir)
        tokenizer = str(tok_dir / "tokenizer.spiece")

    results: dict[str, dict] = {}
    print(
        f"corpus: {args.lines} lines ({os.path.getsize(one.replace('part-*', 'part-000')) / 2**20:.1f} MiB), tokenizer {tokenizer}"
    )
    results["loop"] = run_child("loop", one, tokenizer, work / "out-loop")
    results["pipeline_1_worker"] = run_child("pipeline", one, tokenizer, work / "out-1w", 1)
    results["pipeline_2_workers"] = run_child("pipeline", one, tokenizer, work / "out-2w", 2)
    if not args.skip_memory:
        big = write_corpus(work / f"corpus-{args.memory_scale}x", args.lines, args.memory_scale)
        results["memory_1x"] = results["pipeline_1_worker"]
        results[f"memory_{args.memory_scale}x"] = run_child("pipeline", big, tokenizer, work / "out-big", 1)

    loop_rate = results["loop"]["lines"] / results["loop"]["seconds"]
    print(f"\n{'run':<22}{'lines':>10}{'seconds':>10}{'CPU s':>8}{'lines/s':>12}{'vs loop':>9}{'peak RSS MiB':>14}")
    for name, r in results.items():
        rate = r["lines"] / r["seconds"]
        r["lines_per_s"] = rate
        r["vs_loop"] = rate / loop_rate
        print(
            f"{name:<22}{r['lines']:>10}{r['seconds']:>10.2f}{r['cpu_seconds']:>8.1f}{rate:>12.0f}{rate / loop_rate:>8.2f}x{r['max_rss_mib']:>14.0f}"
        )
    summary = {
        "pipeline_1_worker_vs_loop": results["pipeline_1_worker"]["vs_loop"],
        "pipeline_2_workers_vs_loop": results["pipeline_2_workers"]["vs_loop"],
    }
    if not args.skip_memory:
        big_key = f"memory_{args.memory_scale}x"
        summary["rss_ratio_big_vs_1x"] = results[big_key]["max_rss_mib"] / results["memory_1x"]["max_rss_mib"]
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"lines": args.lines, "results": results, "summary": summary}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
