"""Beam Metrics counters of the preprocessing pipeline (namespace ``kogpt2.preprocess``)."""

from __future__ import annotations

from typing import Any

from apache_beam.metrics import Metrics

NAMESPACE = "kogpt2.preprocess"


class Counters:
    """Beam Metrics counters by dotted name (``filtered.empty`` is ``filtered_empty``), created once per DoFn instance."""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}

    def add(self, counts: dict[str, int]) -> None:
        """Add the non-zero ``counts`` to their counters."""
        for name, value in counts.items():
            if value:
                if name not in self._counters:
                    self._counters[name] = Metrics.counter(NAMESPACE, name.replace(".", "_"))
                self._counters[name].inc(value)
