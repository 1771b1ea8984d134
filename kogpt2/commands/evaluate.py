"""``kogpt2 evaluate``: loss, perplexity and accuracy of a model folder on a shard split."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model folder")
    p.add_argument("--data", required=True, metavar="DIR", help="preprocessing output (info.json, shards, COMPLETED)")
    p.add_argument("--split", choices=["train", "validation"], default="validation", help="default validation")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch (default 32)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from kogpt2.evaluate import evaluate_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be positive")
    result = evaluate_model(args.model, args.data, args.split, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.summary())
    return 0
