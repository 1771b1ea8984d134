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
    from kogpt2.generation import Sample
    from kogpt2.generation_config import DecodeSettings, GenerationConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kogpt2.flags import add_config_arguments, add_underscore_spellings
    from kogpt2.generation_config import DecodeSettings, add_generation_arguments

    p.add_argument("--model", required=True, metavar="DIR", help="model folder (kogpt2 or save_pretrained layout)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="seed words or sentences")
    p.add_argument("--input", metavar="FILE", help="read prompts from FILE, one a line ('-': standard input)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per sample instead of its text")
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--config", metavar="FILE", help="settings from a JSON file (a bulk job's job.json too); flags win")
    add_config_arguments(p, DecodeSettings, unset=True)
    add_generation_arguments(p)
    add_underscore_spellings(p)


def resolve(args: argparse.Namespace, folder: Any = None) -> tuple[GenerationConfig, DecodeSettings]:
    """The command's settings: defaults < ``folder``'s ``generation_config.json`` < ``--config`` < flags.

    Raises:
        ValueError: ``--greedy`` combined with a sampling flag, an unknown ``--config`` key, or an invalid value.
    """
    import dataclasses

    from kogpt2.flags import config_from_args, read_config_file
    from kogpt2.generation_config import DecodeSettings, GenerationConfig, flag_layer

    gen_names = [f.name for f in dataclasses.fields(GenerationConfig)]
    decode_names = [f.name for f in dataclasses.fields(DecodeSettings)]
    file = read_config_file(args.config, gen_names + decode_names, ignore_unknown=True) if args.config else {}
    config = GenerationConfig.from_layers(
        GenerationConfig.folder_layer(folder),
        {k: v for k, v in file.items() if k in gen_names},
        flag_layer(args),
        names=("the model folder", "--config", "flags"),
    )
    decode = config_from_args(DecodeSettings, args, base={k: v for k, v in file.items() if k in decode_names})
    return config, decode


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
    from kogpt2.generation import BatchFailedError, Generator
    from kogpt2.model import load_model

    prompts = read_prompts(args, sys.stdin)
    from kogpt2.model import resolve_model_folder

    folder = resolve_model_folder(args.model)  # a training output folder: its committed version
    config, decode = resolve(args, folder)  # validate flags before loading TensorFlow
    model, tokenizer = load_model(folder)
    gen = Generator(
        model,
        tokenizer,
        dtype=decode.dtype,
        batch_size=decode.batch_size,
        sampler=decode.sampler,
        attention=decode.attention,
    )
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
