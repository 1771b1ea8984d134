"""``kogpt2 generate``: continue seed words with a model, one printed line per sample."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kogpt2.generation import GenerationConfig

HELP = "continue seed words with a model"
DEFAULT_TOP_P = 0.95


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The strategy flags shared by this command and the bulk pipeline."""
    g = p.add_argument_group("strategy (default: sampling with --top-p 0.95)")
    g.add_argument("--greedy", action="store_true", help="take the best token each step (identical on every run)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K best tokens (0 = no cut)")
    g.add_argument(
        "--top-p", type=float, default=None, metavar="P", help=f"nucleus mass in (0, 1] (default {DEFAULT_TOP_P})"
    )
    g.add_argument("--temperature", type=float, default=None, metavar="T", help="> 0 (default 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 1 discourages repeats")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N", help="never repeat an N-gram (0 = off)")
    g.add_argument("--num-samples", type=int, default=1, metavar="N", help="outputs per seed (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="default 100")
    g.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    g.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows decoded together (default 64)")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="computation type (default float32)"
    )


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """A validated :class:`~kogpt2.generation.GenerationConfig` from the strategy flags.

    Raises:
        ValueError: ``--greedy`` combined with a sampling flag, or an invalid value.
    """
    from kogpt2.generation import GenerationConfig

    common = {
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    sampling = {"top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature}
    if args.greedy:
        given = [f"--{k.replace('_', '-')}" for k, v in sampling.items() if v is not None]
        if given:
            raise ValueError(f"--greedy cannot be combined with {', '.join(given)}")
        return GenerationConfig(strategy="greedy", **common)
    return GenerationConfig(
        strategy="sample",
        top_k=0 if args.top_k is None else args.top_k,
        top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p,
        temperature=1.0 if args.temperature is None else args.temperature,
        **common,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (kogpt2 or save_pretrained layout)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="seed words or sentences")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per sample instead of its text")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # validate flags before loading TensorFlow
    from kogpt2.generation import generate
    from kogpt2.model import load_model

    model, tokenizer = load_model(args.model)
    samples = generate(model, tokenizer, args.prompts, config, batch_size=args.batch_size, dtype=args.dtype)
    for s in samples:
        if args.jsonl:
            line = json.dumps(
                {
                    "prompt": s.prompt,
                    "sample_index": s.sample_index,
                    "text": s.text,
                    "continuation": s.continuation,
                    "new_tokens": s.new_tokens,
                    "finish_reason": s.finish_reason,
                    "row_seed": s.row_seed,
                },
                ensure_ascii=False,
            )
        else:
            line = " ".join(s.text.splitlines())
        print(line)
    sys.stdout.flush()
    return 0
