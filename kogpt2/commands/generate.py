"""``kogpt2 generate``: continue prompts with a model, one printed line (or JSON object) per sample.

Prompts come from the arguments, from ``--input FILE`` (one a line; ``-`` is standard
input) or from standard input when none is given and it is not a terminal. The
strategy's defaults are the library's (:class:`kogpt2.generation.GenerationConfig`),
then the model folder's ``generation_config.json``, then the flags given here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kogpt2.generation import GenerationConfig, Sample


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The strategy flags shared by this command and the bulk pipeline (None = not given)."""
    g = p.add_argument_group(
        "strategy (defaults: sampling, top-p 0.95, 100 new tokens; the model folder's generation_config.json "
        "overrides them, these flags override both)"
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--greedy", action="store_true", default=None, help="take the best token each step (identical on every run)"
    )
    mode.add_argument(
        "--do-sample", action="store_true", default=None, help="sample (transformers' spelling; the default)"
    )
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K best tokens (0 = no cut)")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus mass in (0, 1] (default 0.95)")
    g.add_argument("--temperature", type=float, default=None, metavar="T", help="> 0 (default 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="> 1 discourages repeats")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N", help="never repeat an N-gram")
    g.add_argument(
        "--num-samples",
        "--num-return-sequences",
        dest="num_samples",
        type=int,
        default=None,
        metavar="N",
        help="outputs per prompt (default 1)",
    )
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="budget per output (default 100)")
    g.add_argument("--min-new-tokens", type=int, default=None, metavar="N", help="no </s> before N new tokens")
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop a row once its continuation holds TEXT (repeatable; finish_reason 'stop')",
    )
    g.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    g.add_argument("--batch-size", type=int, default=None, metavar="N", help="rows decoded together (default 64)")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="computation type (default float32)"
    )


def config_from_args(args: argparse.Namespace, folder: Any = None) -> GenerationConfig:
    """The validated config: library defaults < ``folder``'s ``generation_config.json`` < the flags given.

    Raises:
        ValueError: ``--greedy`` combined with a sampling flag, or an invalid value.
    """
    from kogpt2.generation import GenerationConfig

    if args.greedy:
        given = [f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "temperature") if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--greedy cannot be combined with {', '.join(given)}")
    strategy = "greedy" if args.greedy else ("sample" if args.do_sample else None)
    return GenerationConfig.from_folder(
        folder,
        strategy=strategy,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        stop=None if args.stop is None else tuple(args.stop),
        seed=args.seed,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kogpt2.flags import add_underscore_spellings

    p.add_argument("--model", required=True, metavar="DIR", help="model folder (kogpt2 or save_pretrained layout)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="seed words or sentences")
    p.add_argument("--input", metavar="FILE", help="read prompts from FILE, one a line ('-': standard input)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per sample instead of its text")
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    add_sampling_arguments(p)
    add_underscore_spellings(p)


def read_prompts(args: argparse.Namespace, stdin: IO[str]) -> list[str]:
    """Prompts from the arguments, ``--input`` and/or standard input; blank lines are skipped.

    Raises:
        ValueError: no prompt at all.
    """
    prompts = list(args.prompts)
    source = args.input
    if source is None and not prompts and not stdin.isatty():
        source = "-"
    if source is not None:
        if source == "-":
            lines = stdin.read().splitlines()
        else:
            with open(source, encoding="utf-8") as f:
                lines = f.read().splitlines()
        prompts += [line.lstrip("\ufeff") for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give PROMPT arguments, --input FILE, or prompts on standard input")
    return prompts


def sample_record(s: Sample) -> dict[str, Any]:
    """A sample as the JSON object ``--jsonl`` prints."""
    return {
        "prompt": s.prompt,
        "sample_index": s.sample_index,
        "text": s.text,
        "continuation": s.continuation,
        "new_tokens": s.new_tokens,
        "finish_reason": s.finish_reason,
        "row_seed": s.row_seed,
        "logprob_sum": s.logprob_sum,
        "logprob_mean": s.logprob_mean,
    }


class _Bar:
    """A one-line progress bar on standard error (only when there is more than one batch)."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.done, self.stream = total, 0, stream

    def update(self, n: int) -> None:
        self.done += n
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} rows")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    from kogpt2.generation import DEFAULT_BATCH_SIZE, BatchFailedError, Generator
    from kogpt2.model import load_model

    prompts = read_prompts(args, sys.stdin)
    folder = args.model
    config = config_from_args(args, folder)  # validate flags before loading TensorFlow
    model, tokenizer = load_model(folder)
    gen = Generator(model, tokenizer, dtype=args.dtype, batch_size=args.batch_size or DEFAULT_BATCH_SIZE)
    rows = [(p, i) for p in prompts for i in range(config.num_samples)]
    unique = len(rows) if not config.greedy else len(set(prompts))
    bar = _Bar(len(rows), sys.stderr) if unique > gen.batch_size else None
    by_row: dict[tuple[str, int], Sample] = {}
    for outcome in gen.stream_rows(rows, config):
        if outcome.error is not None:
            raise BatchFailedError(f"a batch of {len(outcome.rows)} rows failed: {outcome.error}")
        by_row.update(((s.prompt, s.sample_index), s) for s in outcome.samples)
        if bar is not None:
            bar.update(len(outcome.rows))
    if bar is not None:
        bar.close()
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for key in rows:
            s = by_row[key]
            line = json.dumps(sample_record(s), ensure_ascii=False) if args.jsonl else " ".join(s.text.splitlines())
            out.write(line + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    return 0
