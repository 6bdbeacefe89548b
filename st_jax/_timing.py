"""Timing helper shared by the demo and the benchmarks (never used in tests)."""
from __future__ import annotations

import statistics
import time

import jax


def _call_seconds(fn) -> float:
    """Wall time of one call of ``fn()``, its results waited for."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def sample_seconds(fn, repeats: int = 5) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` after one warm-up call (which includes
    compilation); results are waited for with ``jax.block_until_ready``."""
    jax.block_until_ready(fn())
    return [_call_seconds(fn) for _ in range(repeats)]


def median_seconds(fn, repeats: int = 5) -> float:
    """Median of :func:`sample_seconds`."""
    return statistics.median(sample_seconds(fn, repeats))


def interleaved_medians(fns: dict, repeats: int = 5) -> dict:
    """Median wall time of each of ``fns`` (name → zero-argument callable), sampled in
    ``repeats`` round-robin rounds after one warm-up call each.

    Methods compared on a shared machine see the same slow and fast phases (on the 2-core
    benchmark host the same call varies 13–60 ms from one second to the next), so their
    ratio is far steadier than with back-to-back timing of one method after the other.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_call_seconds(fn))
    return {name: statistics.median(ts) for name, ts in samples.items()}
