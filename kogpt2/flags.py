"""Command-line spellings: every ``--a-b`` flag also answers to ``--a_b``.

Users type both (Beam's own options are ``--temp_location`` style, transformers'
are ``--max_new_tokens``), and an underscore spelling of one of our flags must never
slip through ``parse_known_args`` to Beam, which would drop it with a mere warning.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any


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


# -- parsers built from config dataclasses ---------------------------------------------------
#
# A config field carries its command-line flag in its metadata (the field's default and
# type live on the field itself, its validation in the class's ``__post_init__``):
#
#     top_p: float = field(default=0.95, metadata=flag("nucleus mass in (0, 1]", metavar="P"))
#
# ``add_config_arguments(parser, Config)`` then adds ``--top-p`` (and ``--top_p``), typed,
# with the default shown in its help: the setting is defined once.


def flag(
    help: str,
    *,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    cli: bool = True,
    required: bool = False,
    nargs: str | None = None,
    const: Any = None,
    name: str | None = None,
    hidden: bool = False,
    per_run: bool = False,
) -> dict[str, Any]:
    """Field metadata describing the field's command-line flag.

    Args:
        help: one line for ``--help`` (the default is appended).
        metavar: the value's name in ``--help``.
        aliases: more option strings (``--num-return-sequences``).
        choices: allowed values.
        cli: False for a field that has no flag.
        required: the flag must be given (fields without a default are required too).
        nargs: ``"?"`` for a flag whose value may be left out (then ``const`` is used).
        const: the value of a bare ``nargs="?"`` flag.
        name: the flag's spelling when it is not ``--field-name`` (``--input`` for ``inputs``).
        hidden: a tuning knob left out of ``--help``.
        per_run: a decision for one invocation (``--overwrite``), never taken from a ``--config``
            file or written to a run's settings file.
    """
    return {
        "help": help,
        "metavar": metavar,
        "aliases": aliases,
        "choices": choices,
        "cli": cli,
        "required": required,
        "nargs": nargs,
        "const": const,
        "name": name,
        "hidden": hidden,
        "per_run": per_run,
    }


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
    unset: bool = False,
) -> list[str]:
    """Add one flag per field of the dataclass ``cls`` that has :func:`flag` metadata.

    Args:
        parser: a parser or argument group.
        cls: a dataclass.
        skip: field names to leave out.
        unset: give every flag the default None ("not given"), so that a later layer
            (a model folder's defaults, a ``--config`` file) can tell given from default.

    Returns:
        The field names added (each flag's ``dest`` is its field name).
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or "help" not in meta or not meta.get("cli", True):
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [meta.get("name") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None if unset else default}
        help_text = meta["help"]
        if has_default and default not in (None, (), False):
            help_text += f" (default {default})"
        kind = hints[f.name]
        origin = typing.get_origin(kind)
        if kind is bool:  # --flag / --no-flag, so a --config file's true can be switched off
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:  # --input a.txt b.txt, and repeatable
            kwargs["action"] = "extend"
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(kind)[0]
            kwargs["default"] = None
            help_text += " (one or more; repeatable)"
        else:
            base = [a for a in typing.get_args(kind) if a is not type(None)] if origin else [kind]
            kwargs["type"] = base[0] if base and base[0] in (int, float, str) else str
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("nargs"):
            kwargs["nargs"], kwargs["const"] = meta["nargs"], meta.get("const")
        if (meta.get("required") or not has_default) and not unset:
            kwargs["required"] = True  # with unset, the caller checks (a --config file may supply it)
        parser.add_argument(*names, help=argparse.SUPPRESS if meta.get("hidden") else help_text, **kwargs)
        added.append(f.name)
    return added


def given_values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """``{name: value}`` for the flags among ``names`` that were given (not None); tuples for repeated ones."""
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def read_config_file(path: str, allowed: Iterable[str], *, ignore_unknown: bool = False) -> dict[str, Any]:
    """Settings from a JSON file (``--config``): an object of setting names to values, or one whose
    ``config`` key holds that object (what a run's ``history.json`` records). Lists become tuples.

    Args:
        path: the file.
        allowed: the setting names.
        ignore_unknown: drop keys that are no setting (a bulk job's ``job.json`` read by a command
            that has only some of its settings) instead of refusing them.

    Raises:
        ValueError: unreadable file, not an object, or a key that is no setting (named, with the closest one).
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--config {path}: cannot read it as JSON ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        doc = doc["config"]
    if not isinstance(doc, dict):
        raise ValueError(f"--config {path}: must hold a JSON object of settings")
    allowed = sorted(allowed)
    if ignore_unknown:
        doc = {k: v for k, v in doc.items() if k in allowed}
    for key in doc:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--config {path}: {key!r} is not a setting{hint}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}


def config_from_args(cls: type, args: argparse.Namespace, *, base: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """An instance of the config dataclass ``cls``: its defaults < ``base`` (a ``--config`` file) < flags given.

    Raises:
        ValueError: a setting without a default was given nowhere (named as its flag), or
            ``cls`` refused a value.
    """
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    per_run = {f.name for f in dataclasses.fields(cls) if f.metadata.get("per_run")}
    for key, value in (base or {}).items():
        if key in per_run and value:
            flag_name = "--" + key.replace("_", "-")
            raise ValueError(
                f"the --config file sets {key}={value!r}: {flag_name} is decided for each run; "
                f"give {flag_name} on the command line"
            )
    settings = {k: v for k, v in (base or {}).items() if k in names and k not in per_run}
    settings.update(given_values(args, names))
    settings.update(fixed)
    missing = [
        f.metadata.get("name") or "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in settings
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: give the flag, or put it in the --config file")
    return cls(**settings)


def config_file_settings(path: str | None, cls: type) -> dict[str, Any]:
    """:func:`read_config_file` for the fields of the dataclass ``cls``; None gives {}."""
    import dataclasses

    return {} if path is None else read_config_file(path, [f.name for f in dataclasses.fields(cls)])
