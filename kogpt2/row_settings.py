"""Sampling settings that vary inside one generation job: per input row, and per named configuration.

A bulk job has one :class:`~kogpt2.generation_config.GenerationConfig` of defaults (flags, a
``--config`` file, the model folder's ``generation_config.json``). On top of it:

- **per-row settings**: input columns named like the flags (:data:`ROW_SETTINGS`) override the
  defaults for their row; an empty value means "the default". :func:`row_overrides` reads and
  coerces them (a CSV holds text), raising :class:`SettingError` naming the field and the reason.
- **named configurations** (``--configs grid.jsonl``): each line a name and settings; every row
  is generated under every configuration. A configuration's settings win over a row's columns
  for the settings it names (the rows it labels were made with them); the row's columns fill the
  rest. :func:`read_config_grid` validates the whole file up front.

No TensorFlow here.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kogpt2.generation_config import GenerationConfig

#: Input columns that override a setting for their row (``seed``: see :data:`SEED_ALIAS`).
ROW_SETTINGS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "min_new_tokens",
    "num_samples",
    "repetition_penalty",
    "seed",
)
_INTS = frozenset({"top_k", "max_new_tokens", "min_new_tokens", "num_samples", "seed"})
#: Settings a named configuration may set.
GRID_SETTINGS = (*ROW_SETTINGS, "strategy", "no_repeat_ngram_size")
#: A configuration's name is a folder name (``config=NAME/``) and a value in every row.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_CONFIG = "default"


class SettingError(ValueError):
    """A setting's value is unusable: ``field`` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _coerce(name: str, value: Any) -> Any:
    """A row's value as the setting's type; None for "not given" (None, NaN, empty text)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text) if any(c in text for c in ".eE") or name not in _INTS else int(text)
        except ValueError:
            raise SettingError(name, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, f"{value!r} is not a number")
    if name in _INTS:
        if isinstance(value, float):
            if not value.is_integer():
                raise SettingError(name, f"{value!r} is not a whole number")
            value = int(value)
        return int(value)
    if not math.isfinite(float(value)):
        raise SettingError(name, f"{value!r} is not a finite number")
    return float(value)


#: Another name for the per-row ``seed`` setting, for tables whose ``seed`` column holds the seed text.
SEED_ALIAS = "random_seed"


def row_overrides(columns: Mapping[str, Any], *, text_column: str = "seed") -> dict[str, Any]:
    """The settings a row's columns give (only the :data:`ROW_SETTINGS` present and not empty).

    ``text_column`` (the seed text, ``--seed-column``) is never a setting: when it is ``seed``, the
    row's random seed goes in a ``random_seed`` column instead.

    Raises:
        SettingError: a value that is not a number of the setting's kind.
    """
    out = {}
    for name in ROW_SETTINGS:
        column = SEED_ALIAS if name == "seed" and (text_column == "seed" or SEED_ALIAS in columns) else name
        if column in columns and column != text_column:
            value = _coerce(name, columns[column])
            if value is not None:
                out[name] = value
    return out


def apply(base: GenerationConfig, overrides: Mapping[str, Any]) -> GenerationConfig:
    """``base`` with ``overrides``, validated; choosing greedy drops the base's sampling settings.

    Raises:
        SettingError: naming the setting the config refused and why.
    """
    changes = dict(overrides)
    try:
        return GenerationConfig.from_layers(base.describe() | _tuples(base), changes)
    except ValueError as exc:
        text = str(exc)
        match = re.match(r"GenerationConfig\.(\w+)=", text)
        field = match.group(1) if match else next(iter(changes), "settings")
        raise SettingError(field, text.split(": ", 1)[-1] if ": " in text else text) from None


def _tuples(config: GenerationConfig) -> dict[str, Any]:
    return {"stop": config.stop, "suppress_tokens": config.suppress_tokens}


@dataclass(frozen=True)
class NamedConfig:
    """One line of ``--configs``: its name, the settings it names, and the job's defaults with them."""

    name: str
    overrides: dict[str, Any]
    config: GenerationConfig


def read_config_grid(path: str, base: GenerationConfig) -> list[NamedConfig]:
    """Parse and validate a ``--configs`` file: one JSON object a line, ``{"name": ..., settings...}``.

    Raises:
        ValueError: naming the file, the line and the problem: not JSON, no or a bad or repeated
            ``name``, an unknown key (with the closest one), or a value the settings refuse.
    """
    from kogpt2.storage import store_for

    try:
        text = store_for(path).read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--configs {path}: cannot read it ({exc})") from None
    grid: list[NamedConfig] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--configs {path} line {number}"
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f'{where}: must be a JSON object with a "name" and settings')
        name = doc.pop("name", None)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(
                f"{where}: \"name\" must be 1-64 letters, digits, '_', '.' or '-' (a folder name), got {name!r}"
            )
        if any(c.name == name for c in grid):
            raise ValueError(f"{where}: the name {name!r} is used twice")
        for key in doc:
            if key not in GRID_SETTINGS:
                close = difflib.get_close_matches(key, GRID_SETTINGS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{where}: {key!r} is not a setting{hint} (settings: {', '.join(GRID_SETTINGS)})")
        try:
            overrides = {k: v if k == "strategy" else _coerce(k, v) for k, v in doc.items()}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            grid.append(NamedConfig(name, overrides, apply(base, overrides)))
        except SettingError as exc:
            raise ValueError(f"{where} ({name}): {exc}") from None
    if not grid:
        raise ValueError(f"--configs {path}: no configuration in it")
    return grid


def effective(base: GenerationConfig, row: Mapping[str, Any], named: NamedConfig | None) -> GenerationConfig:
    """A row's settings under a configuration: the job's defaults < the row's columns < the configuration's.

    Rows mostly share a few distinct settings, so the result is computed once per distinct
    ``(base, row, configuration)`` and shared (a config is frozen): a bulk job asks for it
    several times per row.

    Raises:
        SettingError: the combination is invalid (named).
    """
    try:
        key = (
            base,
            tuple(sorted(row.items())),
            None if named is None else (named.name, *sorted(named.overrides.items())),
        )
        hash(key)
    except TypeError:  # an unhashable value: validated (and refused) the slow way
        return _effective(base, row, named)
    return _effective_cached(key)


@functools.lru_cache(maxsize=4096)
def _effective_cached(key: tuple[Any, ...]) -> GenerationConfig:
    base, row, named = key
    return _layered(base, dict(row), None if named is None else dict(named[1:]))


def _effective(base: GenerationConfig, row: Mapping[str, Any], named: NamedConfig | None) -> GenerationConfig:
    return _layered(base, row, None if named is None else named.overrides)


def _layered(base: GenerationConfig, row: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> GenerationConfig:
    layers = [base.describe() | _tuples(base), dict(row)]
    if overrides is not None:
        layers.append(dict(overrides))  # a greedy configuration drops the row's sampling columns
    try:
        return GenerationConfig.from_layers(*layers)
    except ValueError as exc:
        text = str(exc)
        match = re.match(r"GenerationConfig\.(\w+)=", text)
        field = match.group(1) if match else "settings"
        raise SettingError(field, text.split(": ", 1)[-1] if ": " in text else text) from None
