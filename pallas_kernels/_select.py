"""Selection helpers of the XLA twins: eligibility bits and a top-k that is fast on CPU.

- :func:`pack_mask` / :func:`set_bit_positions`: bools to packed words, and the positions
  of the set bits of packed words.
- :func:`top_k`: ``lax.top_k``'s result (values best first, ties by lower position),
  computed on CPU for large ``k`` by a threshold, a compaction and one sort of about
  ``1.3-1.6 k`` candidates (inputs must not hold NaN; scores never do). XLA:CPU's ``TopK``
  orders its ``k`` outputs through a heap with an out-of-line comparator, ~0.25 ms per
  row at k = 1024 whatever the row length; the threshold path is 1.2-2.8x faster from
  k = 400 (32 rows at k = 1024: 16k scores in 3.6 ms instead of 11 ms, 131k in 8.8 ms
  instead of 25 ms; k = 4096 over 8-16k in 6-14 ms instead of 12-29 ms). Alone it is
  also faster from k ~ 100 (1.1-1.9x at k = 100-300), but each use adds a few thousand
  HLO instructions and the searches hold dozens (branches per size and cap): from k = 96
  the 1M-item IVF search at k = 100 grew from 38k to 178k HLO lines and its jitted call
  became slower, not faster. Elsewhere (GPU, smaller k) it is ``lax.top_k`` itself.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# the threshold path pays off from about this k in the searches (see the module docstring)
MIN_THRESHOLD_K = 384
_STRIDE = 8           # the threshold is estimated on every _STRIDE-th entry of a row


def pack_mask(allow: jax.Array) -> jax.Array:
    """``bool[..., N]`` → ``u32[..., ceil(N / 32)]`` (padding bits are 0)."""
    n = allow.shape[-1]
    w = -(-n // 32)
    pad = [(0, 0)] * (allow.ndim - 1) + [(0, w * 32 - n)]
    bits = jnp.pad(allow.astype(jnp.uint32), pad).reshape(*allow.shape[:-1], w, 32)
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def set_bit_positions(words: jax.Array, cap: int) -> jax.Array:
    """Positions of the set bits of each row, in order: ``u32[B, W]`` -> ``i32[B, cap]``.

    Entry ``j`` of row ``b`` is the bit index (``32 * word + bit``) of the ``j``-th set bit;
    entries past the row's popcount are unspecified (mask them); set bits past the first
    ``cap`` are dropped. Word level first: each non-empty word's first output slot gets its
    word index (a scatter of ``W`` values, not of ``32 W`` bits) and a running max spreads
    it over the word's slots; then the bit inside the word is found by a 5-step binary
    search on popcounts. ~5x ``jnp.nonzero`` on XLA:CPU (32 x 58k bits: 1.6 vs 8.8 ms).
    """
    b, nw = words.shape
    pc = lax.population_count(words).astype(jnp.int32)
    before = jnp.cumsum(pc, axis=1) - pc                        # set bits in earlier words
    slot = jnp.where(pc > 0, before, cap)                       # empty words: dropped
    start = jnp.zeros((b, cap), jnp.int32).at[jnp.arange(b)[:, None], slot].max(
        jnp.broadcast_to(jnp.arange(nw, dtype=jnp.int32), (b, nw)), mode="drop")
    wi = lax.cummax(start, axis=1)                              # word of each output slot
    rank = jnp.arange(cap, dtype=jnp.int32)[None, :] - jnp.take_along_axis(before, wi, axis=1)
    w = jnp.take_along_axis(words, wi, axis=1)
    bit = jnp.zeros_like(rank)
    for width in (16, 8, 4, 2, 1):                              # rank-th set bit of w
        low = lax.population_count((w >> bit.astype(jnp.uint32))
                                   & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
        up = rank >= low
        bit = bit + jnp.where(up, width, 0)
        rank = rank - jnp.where(up, low, 0)
    return wi * 32 + bit


def order_key(x: jax.Array) -> jax.Array:
    """``f32[...] -> i32[...]``: keys in ``lax.top_k``'s total order of the values (+0.0
    above -0.0, where a float max may return either zero); :func:`key_value` inverts it.
    The kernels select on these keys, so every implementation orders scores alike."""
    i = lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF))   # negative floats: reverse their order


def key_value(key: jax.Array) -> jax.Array:
    """The inverse of :func:`order_key`."""
    return lax.bitcast_convert_type(key ^ ((key >> 31) & jnp.int32(0x7FFFFFFF)), jnp.float32)


NEG_INF_KEY = -2139095041   # order_key(-inf): 0xFF800000 with its low 31 bits flipped


def ordered_keys(x: jax.Array) -> jax.Array:
    """``f32[...] -> u32[...]``: :func:`order_key` as unsigned keys (the same order)."""
    return lax.bitcast_convert_type(order_key(x), jnp.uint32) ^ jnp.uint32(0x80000000)


_THRESHOLDS = 8       # candidate thresholds per row, ``_plan``'s ``step`` sample ranks apart
_SAMPLE = 1024        # long rows: the stride grows to keep about this many samples per row


def _plan(k: int, n: int = 0) -> tuple[int, int, int, int]:
    """``(stride, r0, step, cap)``: every ``stride``-th entry of a row is sampled; the
    candidate thresholds are the sample's ``r0 + j * step``-th best values (``j <
    _THRESHOLDS``), each row takes the highest one that keeps at least ``k`` entries, and
    at most ``cap`` candidates are kept. About ``stride`` entries lie above each sampled
    one, so threshold ``j`` keeps ~``k + j * stride * step`` entries, ``step ~ sqrt(r0)``
    apart (about the sampling noise of that count): the chosen one keeps ``k`` to
    ``k + ~2 * stride * step``. ``stride`` is 8, or for rows of ``16 * _SAMPLE`` entries
    and more the power of two keeping ~``_SAMPLE`` samples (the sample's ``lax.top_k``
    costs in proportion to its length), but at most ``k / 32`` so ``r0 >= 32`` (sampling
    noise)."""
    stride = max(_STRIDE, min(pow2_floor(n // _SAMPLE), pow2_floor(k // 32)))
    r0 = -(-k // stride)
    step = max(1, math.isqrt(r0 - 1) + 1)                     # ceil(sqrt(r0))
    return stride, r0, step, k + 3 * stride * step + 32


def pow2_floor(x: int) -> int:
    """The largest power of two <= ``max(1, x)``."""
    return 1 << (max(1, int(x)).bit_length() - 1)


def popcount_rows(words: jax.Array) -> jax.Array:
    """``u32[..., W] -> i32[...]`` set bits per row (over the last axis)."""
    return jnp.sum(lax.population_count(words).astype(jnp.int32), axis=-1)


def _count(bits: jax.Array) -> jax.Array:
    """``bool[B, n] -> i32[B]`` set entries per row, via packed words: XLA:CPU fuses the
    32-wide packing reduction but materialises a ``[B, n]`` int32 before a long row sum
    (32 x 131k: 0.6 ms instead of 1.8 ms)."""
    return popcount_rows(pack_mask(bits))


def threshold_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` of ``x f32[B, n]`` (no NaN) by threshold: ``(f32[B, k], i32[B, k])``.

    Equal to ``lax.top_k`` in every value and position, ties included (equal values by
    lower position; ``-inf`` entries after every finite one, by position). A threshold
    ``tau`` per row from the best of every 8th entry (longer strides for long rows:
    :func:`_plan`); the finite entries ``>= tau`` (all finite entries when a row has at
    most ``k``) are compacted in position order and one stable sort of the ``cap ~ 1.3-1.6
    k`` candidates by key orders them. Exact:
    when no candidate threshold of some row keeps between ``min(k, finite)`` and ``cap``
    entries, ``lax.top_k`` runs instead (``lax.cond``).
    """
    b, n = x.shape
    stride, r0, step, cap = _plan(k, n)
    ranks = [r0 + j * step for j in range(_THRESHOLDS)]
    if cap >= n or ranks[-1] > -(-n // stride):
        return tuple(lax.top_k(x, k))
    best = lax.top_k(x[:, ::stride], ranks[-1])[0]                       # [B, R]
    finite = x > -jnp.inf
    nfin = _count(finite)
    need = jnp.minimum(k, nfin)
    taus = best[:, jnp.asarray(ranks) - 1]                              # [B, T], highest first

    def count(j):                    # entries kept by each row's threshold j: i32[B]
        t = jnp.take_along_axis(taus, j[:, None], axis=1)
        return _count(finite & (x >= t))

    # per row, the highest threshold keeping `need` entries: a binary search over the T
    # thresholds (log2 T row reductions, not T)
    lo, hi = jnp.zeros((b,), jnp.int32), jnp.full((b,), _THRESHOLDS - 1, jnp.int32)
    for _ in range((_THRESHOLDS - 1).bit_length()):
        mid = (lo + hi) // 2
        enough = count(mid) >= need
        lo, hi = jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
    few = nfin <= k                  # then every finite entry is a candidate
    tau = jnp.take_along_axis(taus, lo[:, None], axis=1)
    cand = jnp.where(few[:, None], finite, finite & (x >= tau))
    packed = pack_mask(cand)                  # counted here, compacted by by_threshold
    c = popcount_rows(packed)
    ok = jnp.all(c >= need) & jnp.all(few | (c <= cap))
    slot = jnp.arange(k, dtype=jnp.int32)[None, :]

    def by_threshold(x):
        pos = set_bit_positions(packed, cap)
        valid = jnp.arange(cap)[None, :] < c[:, None]
        pos = jnp.where(valid, pos, 0)
        key = jnp.where(valid, ordered_keys(jnp.take_along_axis(x, pos, axis=1)), 0)
        # descending keys; stable, so equal keys keep position order; invalid slots last
        _, pos = lax.sort((~key, pos), num_keys=1, is_stable=True)
        pos = pos[:, :k]

        def pad_with_inf(pos):       # rows with fewer than k finite: their first -inf
            inf_pos = set_bit_positions(pack_mask(~finite), k)
            fill = jnp.take_along_axis(inf_pos, jnp.clip(slot - c[:, None], 0, k - 1), axis=1)
            return jnp.where(slot < c[:, None], pos, fill)

        pos = lax.cond(jnp.any(c < k), pad_with_inf, lambda p: p, pos)
        return jnp.take_along_axis(x, pos, axis=1), pos

    return lax.cond(ok, by_threshold, lambda x: tuple(lax.top_k(x, k)), x)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)``; for ``x f32[B, n]`` without NaN and ``k >= MIN_THRESHOLD_K``, by
    :func:`threshold_top_k` on CPU (the same values and positions)."""
    if k < MIN_THRESHOLD_K or x.ndim != 2 or x.dtype != jnp.float32:
        return tuple(lax.top_k(x, k))
    return tuple(lax.platform_dependent(
        x, cpu=lambda x: threshold_top_k(x, k), default=lambda x: tuple(lax.top_k(x, k))))
