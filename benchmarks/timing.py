"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import time
from typing import Callable


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` wall-clock runs of fn(), in seconds (least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
