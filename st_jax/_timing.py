"""Timing helper shared by the demo and the benchmarks (never used in tests)."""
from __future__ import annotations

import statistics
import time

import jax


def sample_seconds(fn, repeats: int = 5) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` after one warm-up call (which includes
    compilation); results are waited for with ``jax.block_until_ready``."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return ts


def median_seconds(fn, repeats: int = 5) -> float:
    """Median of :func:`sample_seconds`."""
    return statistics.median(sample_seconds(fn, repeats))
