"""A guard on the compiled search graphs a process accumulates.

On CPU, XLA keeps every compiled executable's machine code in memory mappings of its own,
about three per kernel: a filtered IVF search graph holds ~430 of them. Linux caps a
process's mappings (``vm.max_map_count``, 65,530 by default), so ~150 distinct search graphs
in one process (a notebook sweeping k, nprobe, batch sizes or filter kinds) exhaust it, and
then XLA's compiler fails ("LLVM compilation error: Cannot allocate memory") and the process
crashes (seen: a segmentation fault after 145 graphs).

:func:`call` runs a jitted search entry point and, when that call compiled a new graph and
the process holds more than :data:`LIMIT_FRACTION` of the limit, drops that entry point's
compiled graphs (they are compiled again when used again) with a warning that says how to
avoid it. Checked only after a compilation (counting the mappings takes ~10 ms), never on a
cached call.
"""
from __future__ import annotations

import functools
import warnings

LIMIT_FRACTION = 0.75


@functools.cache
def map_limit() -> int | None:
    """The kernel's per-process memory-mapping limit, or None where it cannot be read."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def map_count() -> int:
    """Memory mappings this process holds (0 where ``/proc`` has no maps)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for a ``jax.jit`` function ``fn``; afterwards, if it compiled
    and the process is near its memory-mapping limit, clears ``fn``'s compiled graphs."""
    size = getattr(fn, "_cache_size", None)     # (jax.jit's; absent: no guard)
    if size is None:
        return fn(*args, **kwargs)
    before = size()
    out = fn(*args, **kwargs)
    if size() > before:
        limit = map_limit()
        if limit:
            n = map_count()
            if n > LIMIT_FRACTION * limit:
                graphs = size()
                fn.clear_cache()
                warnings.warn(
                    f"st_jax: this process holds {n:,} memory mappings, over "
                    f"{LIMIT_FRACTION:.0%} of the kernel's limit (vm.max_map_count = "
                    f"{limit:,}); each search graph compiled for CPU holds ~430 (XLA's JIT "
                    f"code), and at the limit XLA's compiler crashes the process. Dropped the "
                    f"{graphs} compiled graphs of {getattr(fn, '__name__', 'search')} (compiled "
                    f"again when used again). When sweeping many k / nprobe / batch sizes, "
                    f"call jax.clear_caches() between configurations, or raise the limit "
                    f"(sysctl -w vm.max_map_count=262144).", RuntimeWarning, stacklevel=3)
    return out
