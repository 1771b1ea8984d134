"""Command-line spellings: every ``--a-b`` flag also answers to ``--a_b``.

Users type both (Beam's own options are ``--temp_location`` style, transformers'
are ``--max_new_tokens``), and an underscore spelling of one of our flags must never
slip through ``parse_known_args`` to Beam, which would drop it with a mere warning.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence


def add_underscore_spellings(parser: argparse.ArgumentParser) -> None:
    """Make every ``--a-b`` option of ``parser`` (groups included) also accept ``--a_b``.

    The underscore spelling is not listed in ``--help``; it parses exactly like the
    hyphen one. Call it after all arguments were added.
    """
    table = parser._option_string_actions  # shared by the parser and its argument groups
    for name, action in list(table.items()):
        if name.startswith("--") and "-" in name[2:]:
            table.setdefault("--" + name[2:].replace("-", "_"), action)


def our_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string the parser accepts (both spellings)."""
    return sorted(n for n in parser._option_string_actions if n.startswith("--"))


def refuse_lookalikes(leftover: Sequence[str], ours: Iterable[str], *, known: Iterable[str] = ()) -> None:
    """Refuse leftover ``--flags`` that are neither a known option nor safe to hand on.

    Args:
        leftover: arguments ``parse_known_args`` did not consume.
        ours: our own option strings (for "did you mean").
        known: option names (without ``--``, with ``_``) the next consumer accepts (Beam's).

    Raises:
        ValueError: naming the unknown flag and the closest of ours.
    """
    ours = list(ours)
    known_set = {k.replace("-", "_") for k in known}
    for arg in leftover:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name[2:].replace("-", "_") in known_set:
            continue
        close = difflib.get_close_matches(name.replace("_", "-"), ours, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"unknown option {name}{hint}")
