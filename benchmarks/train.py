"""Benchmark the training job against the notebook's way, in useful (non-pad) target tokens/s.

    .venv/bin/python benchmarks/train.py                                    # tiny preset, bundled corpus
    .venv/bin/python benchmarks/train.py --steps 4 --warmup 2 --rounds 1 --lines 200 --vocab-size 2000  # smoke
    .venv/bin/python benchmarks/train.py --preset small --peak-tflops 989   # on a GPU: also MFU

Same preset, tokenizer, corpus, optimizer (Adam 1e-4) and batch size (16) for every variant:

- ``notebook``: the notebook's way: ``<s> ids </s>`` pre-padded to 30 in numpy arrays
  (``pad_sequences``) fed from memory, cross-entropy averaged over every position, padding
  included (``SparseCategoricalCrossentropy``), ``accuracy`` metric. Only its non-pad
  targets count as useful.
- ``padded[LEN][_xla]`` / ``packed[LEN][_xla]``: our job's train step
  (:class:`kogpt2.trainer.LMTrainer`: masked loss, masked accuracy, perplexity) fed by
  :func:`kogpt2.dataset.make_dataset` from gzip TFRecord shards on disk, padded
  (one sentence a row) or packed (blocks of LEN, default 30), optionally XLA-compiled.
- ``synthetic:V``: variant V fed random in-memory batches of the same shape and real-token
  share (:func:`synthetic_dataset`, below): the model alone.
- ``streaming:V``: variant V with the in-memory record cache off (every epoch re-reads and
  gunzips the shards; what data sets over 512 MiB get).
- ``V_bf16``: variant V under the ``mixed_bfloat16`` policy (``--mixed-precision bf16``);
  each pair ``V`` / ``V_bf16`` is reported side by side: tokens/s ratio, and the validation
  loss each reaches after the same steps (``--val-lines N`` holds out N corpus lines for it).
  Precision comparison only::

      .venv/bin/python benchmarks/train.py --variants packed128,packed128_bf16 --val-lines 200

Every variant is built and warmed up first (``--warmup`` steps: tracing, XLA compilation),
then ``--rounds`` rounds run ``--steps`` timed steps of each variant in turn (each through
the Keras train function, the step ``fit`` runs; the order rotates every round), so load
from other processes spreads over all variants. Ratios are medians over rounds of the
ratio within a round. Targets: ours >= 2x notebook; ours on
shards >= 0.95x ours on synthetic batches. The shards are written here with
``tf.io.TFRecordWriter`` in the preprocessing format (info.json, committed by its manifest).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kogpt2  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from kogpt2 import records  # noqa: E402
from kogpt2.tf_setup import import_keras, import_tf  # noqa: E402

tf = import_tf()
keras = import_keras()
tf.get_logger().setLevel("ERROR")  # one train function per variant: TF's retracing warning is noise here

NOTEBOOK_LEN = 30
V1_TOKENIZER = REPO.parent / "shared" / "data" / "kogpt2_v1_tokenizer.spiece"
CORPUS = REPO / "kogpt2" / "data" / "corpus.txt"
DEFAULT_VARIANTS = "notebook,padded,padded_xla,packed,packed_xla,packed128,packed128_xla,synthetic:packed128_xla,streaming:packed128_xla"


# ----------------------------------------------------------------------------- inputs


def load_lines(path: Path, n: int | None) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if n:
        lines = (lines * (n // len(lines) + 1))[:n]
    return lines


def write_shards(
    folder: Path,
    tokenizer: Any,
    lines: list[str],
    max_len: int,
    packing: bool,
    num_shards: int = 4,
    val_lines: list[str] | None = None,
) -> Path:
    """A shard folder in the preprocessing format (all lines in ``train``; ``val_lines``, or 1 row, in ``validation``),
    committed as the pipeline commits it (:mod:`kogpt2.outputs`)."""
    from kogpt2 import outputs

    out = folder
    lease = outputs.Lease(str(out), "preprocess").acquire()
    claim = outputs.begin(str(out), "preprocess", {"bench": len(lines), "max_len": max_len, "packing": packing},
                          lease, overwrite=True)  # fmt: skip
    folder = Path(claim.work)

    def rows_of(texts: list[str]) -> list[tuple[list[int], int]]:
        seqs = [records.frame(ids, tokenizer.bos_id, tokenizer.eos_id) for ids in tokenizer.encode_batch(texts)]
        if packing:
            return list(records.pack(seqs, max_len, tokenizer.pad_id))
        return [records.pad(records.truncate(s, max_len), max_len, tokenizer.pad_id) for s in seqs]

    rows = rows_of(lines)
    splits = {"train": rows, "validation": rows_of(val_lines) if val_lines else rows[:1]}
    names: dict[str, list[str]] = {}
    digests: dict[str, str] = {}
    for split, split_rows in splits.items():
        n = min(num_shards, len(split_rows))
        names[split] = [records.shard_name(split, k, n) for k in range(n)]
        for k, name in enumerate(names[split]):
            examples = [records.serialize_example(ids, length) for ids, length in split_rows[k::n]]
            with tf.io.TFRecordWriter(str(folder / name), options="GZIP") as w:
                for data in examples:
                    w.write(data)
            digests[name] = records.shard_digest(examples)
    counts = {split: len(split_rows) for split, split_rows in splits.items()}
    tokens = {s: sum(n for _, n in r) for s, r in splits.items()}
    info = {
        "schema_version": 1,
        "created_by": "benchmarks/train.py",
        "data_fingerprint": records.data_fingerprint(digests),  # as preprocessing computes it
        "tokenizer": tokenizer.describe(),
        "max_len": max_len,
        "packing": packing,
        "val_fraction": 0.0,
        "inputs": [str(CORPUS)],
        "counts": {"lines_read": len(lines), "kept": len(lines), "filtered": {}, "rejected": 0, "truncated": 0,
                   "examples": counts, "tokens": tokens, "unk_tokens": 0, "unk_rate": 0.0},
        "shards": names,
    }  # fmt: skip
    (folder / "info.json").write_text(json.dumps(info), encoding="utf-8")
    outputs.commit(claim, [*names["train"], *names["validation"], "info.json"])
    lease.release()
    return out


def synthetic_dataset(
    vocab_size: int, seq_len: int, batch_size: int, *, real_fraction: float = 1.0, seed: int = 0
) -> Any:
    """An endless in-memory dataset of one fixed random batch, shaped like :func:`kogpt2.dataset.make_dataset`'s.

    It costs nothing to produce, so a job fed from it measures the model alone.

    Args:
        vocab_size: ids are drawn from ``[0, vocab_size)``.
        seq_len: shard ``max_len``; batches are ``(B, seq_len - 1)``.
        batch_size: rows per batch.
        real_fraction: share of each row's targets that are real (the rest is padding).
        seed: numpy seed of the random ids.

    Returns:
        A repeating ``tf.data.Dataset`` of ``(inputs, targets)``.

    Raises:
        ValueError: ``real_fraction`` outside (0, 1].
    """
    import numpy as np

    from kogpt2.dataset import shift_targets

    if not 0.0 < real_fraction <= 1.0:
        raise ValueError(f"real_fraction={real_fraction}: must be in (0, 1]")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int64)  # (B, T)
    length = np.full((batch_size,), max(2, round(seq_len * real_fraction)), dtype=np.int64)  # (B,)
    inputs, targets = shift_targets(tf.constant(ids), tf.constant(length))
    return tf.data.Dataset.from_tensors((inputs, targets)).repeat()


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way of training, ready to step: ``step()`` runs one train step, ``tokens()`` counts useful targets."""

    name: str
    lm: Any
    seq: int
    step: Callable[[], Any]
    tokens: Callable[[], float]
    rounds: list[dict[str, float]] = field(default_factory=list)
    val_loss: Callable[[], float] | None = None


def notebook_variant(preset: str, tokenizer: Any, lines: list[str], batch_size: int) -> Variant:
    """The notebook's way: pad_sequences to 30, numpy arrays in memory, unmasked loss."""
    import numpy as np

    from kogpt2.model import new_model

    seqs = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(lines)]
    data = keras.preprocessing.sequence.pad_sequences(seqs, maxlen=NOTEBOOK_LEN, padding="post", value=tokenizer.pad_id)
    x, y = data[:, :-1], data[:, 1:]  # (N, 29) each
    share = float(np.mean([min(len(s), NOTEBOOK_LEN) - 1 for s in seqs]) / (NOTEBOOK_LEN - 1))
    lm = new_model(preset, tokenizer, seed=0)

    class NotebookModel(keras.Model):  # as the notebook: call() returns the logits
        def __init__(self, gpt2: Any):
            super().__init__()
            self.gpt2 = gpt2

        def call(self, inputs: Any, training: bool = False) -> Any:
            return self.gpt2(inputs, training=training)[0]

    model = NotebookModel(lm)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4, epsilon=1e-8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # What fit(x, y, batch_size=16) does with numpy arrays: shuffled slices of in-memory tensors.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(batch_size, drop_remainder=True)
    it = iter(ds.repeat().prefetch(2))
    fn = model.make_train_function()
    done = [0]

    def step() -> Any:
        done[0] += 1
        return fn(it)

    return Variant("notebook", lm, NOTEBOOK_LEN - 1, step, lambda: done[0] * batch_size * (NOTEBOOK_LEN - 1) * share)


def ours_variant(name: str, preset: str, tokenizer: Any, shards_dir: Path, batch_size: int, *, xla: bool,
                 synthetic: bool = False, cache: bool | None = None, bf16: bool = False) -> Variant:  # fmt: skip
    """Our job's train step on shards, or on synthetic batches shaped like them (built under bf16 if asked)."""
    from kogpt2.precision import dtype_policy

    with dtype_policy("mixed_bfloat16" if bf16 else "float32"):  # layers keep the policy they are built with
        return _ours_variant(name, preset, tokenizer, shards_dir, batch_size, xla=xla, synthetic=synthetic,
                             cache=cache)  # fmt: skip


def _ours_variant(name: str, preset: str, tokenizer: Any, shards_dir: Path, batch_size: int, *, xla: bool,
                  synthetic: bool = False, cache: bool | None = None) -> Variant:  # fmt: skip
    from kogpt2.dataset import make_dataset, open_shards
    from kogpt2.model import new_model
    from kogpt2.trainer import LMTrainer

    shards = open_shards(str(shards_dir))
    if synthetic:
        n = shards.num_examples("train")
        share = (shards.info["counts"]["tokens"]["train"] - n) / (n * (shards.max_len - 1))
        ds = synthetic_dataset(tokenizer.vocab_size, shards.max_len, batch_size, real_fraction=share)
    else:
        ds = make_dataset(shards, "train", batch_size, training=True, epochs=10_000, cache=cache, drop_remainder=xla)
    lm = new_model(preset, tokenizer, seed=0)
    trainer = LMTrainer(lm)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4, epsilon=1e-8), jit_compile=xla)
    it = iter(ds)
    fn = trainer.make_train_function()
    scorer = LMTrainer(lm)
    scorer.compile()

    def val_loss() -> float:
        return float(
            scorer.evaluate(make_dataset(shards, "validation", batch_size), verbose=0, return_dict=True)["loss"]
        )

    return Variant(name, lm, shards.max_len - 1, lambda: fn(it), lambda: float(trainer.train_tokens.numpy()), [],
                   val_loss)  # fmt: skip


def flops_per_token(lm: Any, seq: int) -> float:
    """Training FLOPs per processed token: 6 x (parameters + the tied LM head) + attention."""
    cfg = lm.config
    params = sum(int(tf.size(w)) for w in lm.trainable_weights)  # wte counted once; the head reuses it
    return 6 * (params + cfg.vocab_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * seq


def time_steps(v: Variant, steps: int, batch_size: int) -> dict[str, float]:
    before = v.tokens()
    start = time.perf_counter()
    for _ in range(steps):
        logs = v.step()
    float(logs["loss"].numpy())  # wait for the last step
    seconds = time.perf_counter() - start
    useful = v.tokens() - before
    processed = steps * batch_size * v.seq
    return {"seconds": seconds, "useful": useful, "share": useful / processed, "processed": processed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--corpus", type=Path, default=CORPUS, help="one sentence a line (default: the bundled corpus)")
    p.add_argument("--lines", type=int, default=None, help="use N lines (repeat/cut the corpus)")
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="default: the KoGPT2 v1 tokenizer if present, else trained"
    )
    p.add_argument(
        "--vocab-size", type=int, default=8000, help="vocabulary of a trained tokenizer (no v1 / smoke runs)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (tracing, XLA compilation)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=6, help="rounds over all variants; medians count")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak (e.g. 989 for H100 bf16) for MFU")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument(
        "--val-lines", type=int, default=0, help="hold out the corpus' last N lines as validation (bf16 vs fp32 loss)"
    )
    args = p.parse_args(argv)

    from kogpt2.tokenizer import load_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="kogpt2-bench-train-"))
    lines = load_lines(args.corpus, args.lines)
    val_lines: list[str] = []
    if args.val_lines:
        if args.val_lines >= len(lines):
            raise SystemExit(f"--val-lines {args.val_lines}: must be below the {len(lines)} corpus lines")
        lines, val_lines = lines[: -args.val_lines], lines[-args.val_lines :]
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif V1_TOKENIZER.is_file() and not args.lines and args.vocab_size == 8000:
        tok = load_tokenizer(V1_TOKENIZER)
    else:
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = train_tokenizer([corpus], args.vocab_size, work / "tok")
    devices = [d.name for d in tf.config.list_logical_devices()]
    print(f"preset {args.preset}, tokenizer {tok.path.name} (vocab {tok.vocab_size}), {len(lines)} lines, "
          f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} timed steps after {args.warmup}; {devices}",
          flush=True)  # fmt: skip

    shard_dirs: dict[tuple[str, int], Path] = {}
    variants: list[Variant] = []
    for spec in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if spec == "notebook":
            variants.append(notebook_variant(args.preset, tok, lines, args.batch_size))
            continue
        mode, _, base = spec.rpartition(":")
        m = re.fullmatch(r"(padded|packed)(\d+)?(_xla)?(_bf16)?", base)
        if mode not in ("", "synthetic", "streaming") or not m:
            raise SystemExit(
                f"unknown variant {spec!r}: notebook, [synthetic:|streaming:](padded|packed)[LEN][_xla][_bf16]"
            )
        key = (m.group(1), int(m.group(2) or NOTEBOOK_LEN))
        if key not in shard_dirs:
            shard_dirs[key] = write_shards(work / f"{key[0]}{key[1]}", tok, lines, key[1], packing=key[0] == "packed",
                                           val_lines=val_lines)  # fmt: skip
        variants.append(ours_variant(spec, args.preset, tok, shard_dirs[key], args.batch_size, xla=bool(m.group(3)),
                                     synthetic=mode == "synthetic", cache=False if mode == "streaming" else None,
                                     bf16=bool(m.group(4))))  # fmt: skip

    for v in variants:  # build, trace, compile; fill the record caches
        start = time.perf_counter()
        time_steps(v, args.warmup, args.batch_size)
        print(f"warmed up {v.name} in {time.perf_counter() - start:.1f}s", flush=True)
    for r in range(args.rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order each round
            v.rounds.append(time_steps(v, args.steps, args.batch_size))
        print(f"round {r + 1}: " + ", ".join(f"{v.name} {v.rounds[-1]['useful'] / v.rounds[-1]['seconds']:.0f}" for v in variants), flush=True)  # fmt: skip

    results = []
    for v in variants:
        med = sorted(v.rounds, key=lambda t: t["useful"] / t["seconds"])[len(v.rounds) // 2]
        fpt = flops_per_token(v.lm, v.seq)
        row = {
            "variant": v.name,
            "useful_tokens_per_s": round(med["useful"] / med["seconds"], 1),
            "steps_per_s": round(args.steps / med["seconds"], 3),
            "useful_share": round(med["share"], 4),
            "tflops": round(med["processed"] * fpt / med["seconds"] / 1e12, 4),
            "rounds_tokens_per_s": [round(t["useful"] / t["seconds"], 1) for t in v.rounds],
        }
        if args.peak_tflops:
            row["mfu"] = round(row["tflops"] / args.peak_tflops, 4)
        if v.val_loss is not None and ":" not in v.name:
            row["val_loss"] = round(v.val_loss(), 4)  # after warmup + rounds x steps, the same for every variant
        results.append(row)
    summary: dict[str, Any] = {"preset": args.preset, "vocab": tok.vocab_size, "lines": len(lines), "devices": devices}
    rates = {v.name: [t["useful"] / t["seconds"] for t in v.rounds] for v in variants}

    def paired(a: str, b: str) -> float:
        """Median over rounds of a/b within the same round: robust to load that drifts between rounds."""
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    plain = [v.name for v in variants if v.name != "notebook" and ":" not in v.name]
    if plain and "notebook" in rates:
        summary["vs_notebook"] = {name: paired(name, "notebook") for name in plain}
        summary["best"] = max(plain, key=lambda name: summary["vs_notebook"][name])
        summary["best_vs_notebook"] = summary["vs_notebook"][summary["best"]]
    for name in plain:
        if f"synthetic:{name}" in rates:  # the input pipeline's cost: shards vs in-memory batches, same step
            summary[f"{name}_shards_vs_synthetic"] = paired(name, f"synthetic:{name}")
            if f"streaming:{name}" in rates:
                summary[f"{name}_streaming_vs_synthetic"] = paired(f"streaming:{name}", f"synthetic:{name}")
    by_name = {r["variant"]: r for r in results}
    for name in plain:  # bf16 beside fp32, same steps
        if name.endswith("_bf16") and name[: -len("_bf16")] in by_name:
            fp32 = name[: -len("_bf16")]
            summary.setdefault("bf16_vs_fp32", {})[fp32] = {
                "tokens_per_s_ratio": paired(name, fp32),
                "val_loss_fp32": by_name[fp32].get("val_loss"),
                "val_loss_bf16": by_name[name].get("val_loss"),
                "steps": args.warmup + args.rounds * args.steps,
            }
    print("\n| variant | useful tokens/s (median) | steps/s | useful share | TFLOP/s | val loss | rounds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rounds = ", ".join(f"{x:.0f}" for x in r["rounds_tokens_per_s"])
        val = f"{r['val_loss']:.4f}" if "val_loss" in r else ""
        print(f"| {r['variant']} | {r['useful_tokens_per_s']:.0f} | {r['steps_per_s']:.2f} | {r['useful_share']:.2f} | {r['tflops']:.4f} | {val} | {rounds} |")  # fmt: skip
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({**summary, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
