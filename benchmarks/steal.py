"""CPU time a VM's hypervisor gives to other guests ("steal"), for the benchmarks' round-by-round notes.

On this project's 2-core VM, in one run (2026-12-03), rounds that lost 4-8% of the CPU time to steal
ran 6-14% slower than one that lost 1%, and one that lost 36% ran 40% slower, so each benchmark prints
the share per timed part.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def stolen_seconds() -> float | None:
    """CPU seconds this VM's hypervisor has given to other guests since boot, over all CPUs; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 and fields[0] == "cpu" else None


def with_steal(fn: Callable[[], T]) -> tuple[T, float | None]:
    """``fn()`` and the share of the machine's CPU time stolen while it ran (None where unknown)."""
    before, start = stolen_seconds(), time.perf_counter()
    out = fn()
    after, wall = stolen_seconds(), time.perf_counter() - start
    if before is None or after is None:
        return out, None
    return out, (after - before) / (wall * (os.cpu_count() or 1))


def pct(share: float | None) -> str:
    """``0.056`` -> ``"5.6%"``; unknown -> ``"?"``."""
    return "?" if share is None else f"{100 * share:.1f}%"


def quiet_figures(ratios: list[float], steal: list[tuple[float | None, float | None]], limit: float) -> dict[str, Any]:
    """The median adjacent ratio over the quiet rounds: neither side lost more than ``limit`` to steal."""
    quiet = [
        r for r, (a, b) in zip(ratios, steal, strict=True) if a is not None and b is not None and max(a, b) <= limit
    ]
    return {
        "quiet_rounds": len(quiet),
        "vs_adjacent_ceiling_quiet": round(statistics.median(quiet), 3) if quiet else None,
    }
