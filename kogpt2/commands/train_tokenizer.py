"""``kogpt2 train-tokenizer``: train a SentencePiece tokenizer with KoGPT2's special ids."""

from __future__ import annotations

import argparse
import glob


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", action="append", required=True, metavar="GLOB", help="text files, one sentence a line (repeatable)"
    )
    p.add_argument("--vocab-size", type=int, default=8000, help="number of pieces (default 8000)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for tokenizer.spiece")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")


def run(args: argparse.Namespace) -> int:
    from kogpt2.tokenizer import train_tokenizer

    files: list[str] = []
    for pattern in args.input:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    tok = train_tokenizer(files, args.vocab_size, args.output, model_type=args.model_type)
    print(f"tokenizer: {tok.path} (vocab {tok.vocab_size}, sha256 {tok.fingerprint[:12]})")
    return 0
