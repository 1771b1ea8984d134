"""``kogpt2 export DIR``: add the Hugging Face tokenizer files to an existing model folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folder",
        metavar="DIR",
        help="a model folder with a tokenizer (tokenizer.spiece, gpt2_kor_tokenizer.spiece or tokenizer.json)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the files (again: the same bytes) and list them.

    Raises:
        kogpt2.hf_export.HFExportError: not a folder, no tokenizer in it, or one that cannot be
            converted exactly (a ``ValueError``: exit status 2).
    """
    from kogpt2.hf_export import export_folder

    for path in export_folder(args.folder):
        print(path)
    return 0
