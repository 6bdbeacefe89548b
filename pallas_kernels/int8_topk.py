"""Fused Int8 score + eligibility mask + top-k.

Computes, for queries ``q f32[B, D]`` and an Int8 item matrix (``codes i8[N, D]``,
``scale f32[N]``), the top-``k`` items by the Int8 inner product

    score[b, n] = (f32(<qcodes[b], codes[n]>) * scale[n]) * qscale[b]

among the items whose bit is set in an eligibility mask (``u32[W]`` shared by the batch, or
``u32[B, W]`` one row per query; item ``n`` is bit ``n % 32`` of word ``n // 32``), where the
queries are quantised per row on the fly (:func:`quantize_rows`). The integer dot
is exact in both implementations, so the kernel and its twin produce identical scores.

Two implementations with one signature, :func:`int8_topk_pallas` (Pallas, Triton backend, GPU)
and :func:`int8_topk_reference` (plain XLA, fast on CPU), and a dispatcher :func:`int8_topk`.

How the kernel keeps top-k fused (never writing the ``[B, N]`` score matrix):

1. **Strided tiles.** The item matrix is viewed as ``[TN, T, D]`` (``N = TN * T``): grid step
   ``(i, t)`` scores query block ``i`` against items ``{j * T + t : j < TN}``. Neighbouring
   items (same cluster, same category) fall into different tiles, so the true top-k is spread
   thinly over the tiles whatever the storage order.
2. **Per-tile top-m.** Each grid step keeps only its ``m`` best eligible items per query
   (``m`` rounds of max-and-mask in registers) and writes ``f32/i32[B, T, m]`` candidates:
   ``m / TN`` of the score matrix (1/32 with the defaults).
3. **Merge + exactness check.** ``lax.top_k`` merges the ``T * m`` candidates. Let ``tau`` be the
   k-th merged score. A tile whose m-th candidate is ``>= tau`` is *saturated*: it may hold more
   top-k items than it reported. If no tile is saturated the result is exactly the top-k
   (every true top-k item scores ``>= tau`` and sits in an unsaturated tile, hence among its
   tile's top ``m - 1``). Otherwise the kernel is re-run with a larger ``m`` inside a
   ``lax.cond`` (only on that rare path), and finally with ``m = TN`` (all scores, exact by
   construction). Results are therefore always exact; the common path reads the items once.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._select import NEG_INF_KEY, key_value, order_key, pack_mask, top_k

NEG_INF = float("-inf")
MAX_K = 1 << 16


QMAX = 127


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Jittable per-row symmetric quantisation (no validation).

    Args:
      x: ``f32[N, D]`` or ``bf16[N, D]``, assumed finite.
    Returns:
      ``(codes i8[N, D], scale f32[N])``: ``scale = max|x| / 127`` (correctly rounded),
      ``codes = clip(round(x * (1 / scale)), -127, 127)`` (``scale = 0``: ``codes = 0``).
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # The same floats whatever graph this is traced into. XLA rewrites a division by a
    # constant or a broadcast into a multiply by the reciprocal (up to 1 ulp off) in some
    # graphs and not in others (seen: the scoring with B = 1), and the XLA twins would then
    # score differently from the kernels, which get the scale as an operand. So: the scale
    # is the correctly rounded amax / 127 (a divisor behind an optimisation barrier is
    # opaque to the rewrite), the codes round(x * (1 / scale)), written as a multiply.
    scale = amax / lax.optimization_barrier(jnp.full_like(amax, QMAX))
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x * inv[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return codes, scale


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tunables of the Pallas kernel (all powers of two).

    Attributes:
      block_q: queries per grid step (Triton dot needs >= 16).
      block_n: items per tile ``TN`` (>= 16).
      block_d: feature chunk of the in-kernel dot loop (>= 32, divides the padded D).
      min_candidates: smallest per-tile candidate count ``m``.
      escalation: factor by which ``m`` grows on the (rare) saturated path.
      num_warps, num_stages: Triton compiler parameters.
    """

    block_q: int = 16
    block_n: int = 256
    block_d: int = 128
    min_candidates: int = 8
    escalation: int = 8
    num_warps: int = 4
    num_stages: int = 2


# --------------------------------------------------------------------------------------
# validation shared by both implementations
# --------------------------------------------------------------------------------------

def _check_inputs(q, codes, scale, mask, k):
    if q.ndim != 2:
        raise ValueError(f"queries must be 2-D [B, D]; got shape {q.shape}")
    if codes.ndim != 2 or codes.dtype != jnp.int8:
        raise ValueError(f"codes must be i8[N, D]; got {codes.dtype}{list(codes.shape)}")
    n, d = codes.shape
    if q.shape[1] != d:
        raise ValueError(f"queries have D={q.shape[1]} but items have D={d}; expected [B, {d}]")
    if scale.shape != (n,):
        raise ValueError(f"scale must be f32[{n}]; got shape {scale.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"queries must be f32 or bf16; got {q.dtype}")
    w = -(-n // 32)
    if mask is not None:
        if mask.dtype != jnp.uint32:
            raise ValueError(f"mask must be uint32 words; got {mask.dtype}")
        if mask.shape not in ((w,), (q.shape[0], w)):
            raise ValueError(
                f"mask must be u32[{w}] or u32[{q.shape[0]}, {w}] for N={n}; got {mask.shape}")
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}]; got {k!r}")


def unpack_mask(mask: jax.Array, n: int) -> jax.Array:
    """``u32[..., W]`` → ``bool[..., n]`` (bit ``i % 32`` of word ``i // 32``)."""
    bits = (mask[..., :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(*mask.shape[:-1], -1)[..., :n].astype(bool)


def _finish(vals: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pad invalid entries: ids -1 where the score is -inf."""
    return vals, jnp.where(vals > NEG_INF, idx, -1).astype(jnp.int32)


def _pad_k(vals, idx, k):
    """Top-k over fewer than k candidates: pad to k columns."""
    c = vals.shape[1]
    if c >= k:
        return vals, idx
    return (jnp.pad(vals, ((0, 0), (0, k - c)), constant_values=NEG_INF),
            jnp.pad(idx, ((0, 0), (0, k - c)), constant_values=-1))


# --------------------------------------------------------------------------------------
# plain-XLA twin (fast on CPU)
# --------------------------------------------------------------------------------------

def _int_dot_f32(qc: jax.Array, codes: jax.Array) -> jax.Array:
    """Exact integer dot ``f32[B, C]`` of ``i8[B, D]`` and ``i8[C, D]`` on CPU.

    One int8 GEMM with int32 accumulation, the items as its left operand (``[C, D] x [D,
    B]``, then transposed): XLA:CPU (jax 0.12, YNNPACK) runs it ~2.5x faster than the
    bf16 x bf16 -> f32 dot this twin used before (32 queries x 1M items x 128: 24-28 ms
    against 60-70 ms, AMD EPYC with AVX512-VNNI), and it is exact for any ``D < 2**17``.
    The f32 result equals the integer while below 2**24 (always for ``D <= 1024``).
    """
    out = lax.dot_general(codes, qc, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return out.T.astype(jnp.float32)


_GEMV_COLS = 4   # query columns of the GEMM behind a matrix-vector product (see int8_row_dots)


def int8_row_dots(x: jax.Array, qc: jax.Array) -> jax.Array:
    """Exact integer dots ``f32[S, M]`` of int8 rows ``x i8[S, M, D]`` with int8 queries
    ``qc i8[S, D]`` (one query per leading index).

    The query is zero-padded to a ``[D, 4]`` matrix and multiplied as an int8 GEMM with
    int32 accumulation: XLA:CPU runs a narrow int8 GEMM several times faster than its
    matrix-vector product or an f32 multiply-and-row-sum (1M-row gathers: 1.2–1.8×, IVF
    block scan incl. its gather: 1.8×). Exact for any ``D < 2**17`` (the int32 sum cannot
    overflow), and its f32 value equals the exact integer while below 2**24.
    """
    w = jnp.pad(qc[..., None], [(0, 0)] * qc.ndim + [(0, _GEMV_COLS - 1)])
    lead = tuple(range(x.ndim - 2))
    out = lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 2,)), (lead, lead)),
                          preferred_element_type=jnp.int32)
    return out[..., 0].astype(jnp.float32)


def gathered_row_dots(codes: jax.Array, rows: jax.Array, qc: jax.Array, *,
                      step_rows: int = 16384) -> jax.Array:
    """Exact integer dots ``f32[B, M]`` of the item rows ``rows i32[B, M]`` of ``codes
    i8[N, D]`` with int8 queries ``qc i8[B, D]``.

    Queries go in groups of ``g = clip(step_rows // M, 1, B)`` per loop step (one batched
    :func:`int8_row_dots` over the ``[g, M, D]`` gather, the only temporary): each GEMM
    call has a fixed cost on XLA:CPU, so short rows are grouped (32 queries x 1-2k rows:
    1.5-1.9x faster than one query per step; from 4k rows the same).
    """
    b, m = rows.shape
    g = max(1, min(b, step_rows // max(m, 1)))
    steps = -(-b // g)
    pad = steps * g - b
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        qc = jnp.pad(qc, ((0, pad), (0, 0)))
    out = lax.map(lambda a: int8_row_dots(codes[a[0]], a[1]),
                  (rows.reshape(steps, g, m), qc.reshape(steps, g, -1)))
    return out.reshape(steps * g, m)[:b]


def int8_scores_reference(q, codes, scale, mask=None, *, num_valid=None):
    """All masked Int8 scores ``f32[B, N]`` (-inf where ineligible). Test/debug helper."""
    n = codes.shape[0]
    num_valid = n if num_valid is None else num_valid
    qc, qs = quantize_rows(q)
    s = (_int_dot_f32(qc, codes) * scale[None, :]) * qs[:, None]
    ok = jnp.arange(n) < num_valid
    if mask is not None:
        ok = ok & unpack_mask(mask, n)
    return jnp.where(ok, s, NEG_INF)


_FEW_MAX_ITEMS = 1 << 16     # up to here a top-k over all stored scores is cheap on CPU


def hierarchy_fanout(n: int, k: int, fanout: int = 16) -> int:
    """The twin's group fanout for ``n`` items and ``k`` results: ``fanout`` itself up to
    ``_FEW_MAX_ITEMS`` items, else the largest of ``fanout``, ``fanout / 2`` and
    ``fanout / 4`` (at least 2) leaving ``n / f**2 >= 4 k`` large groups to pre-select
    from; ``fanout`` when none does (then the twin takes its stored-scores path).

    Past 64k items a top-k over every stored score costs more than pass 2 rescoring
    ``k * f`` items: 32 queries, AMD EPYC: 262k items at k = 1024 in 14-19 ms instead of 30,
    524k at k = 2048 in 41 ms instead of 67, 1M at k = 4096 in 71 ms instead of 156 (and
    1M at k = 2048 in 39 ms instead of 48 with f = 8 over f = 16)."""
    if n <= _FEW_MAX_ITEMS:
        return fanout
    for f in (fanout, fanout // 2, fanout // 4):
        if f >= 2 and n // (f * f) >= 4 * k:
            return f
    return fanout


@functools.partial(jax.jit, static_argnames=("k", "num_valid", "chunk", "fanout"))
def int8_topk_reference(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
                        chunk: int = 8192, fanout: int = 16):
    """Plain-XLA twin of :func:`int8_topk_pallas`, formulated to be fast on CPU.

    Args:
      q: ``f32[B, D]`` or ``bf16[B, D]`` queries (quantised per row inside).
      codes: ``i8[N, D]``; scale: ``f32[N]``.
      mask: ``u32[W]``, ``u32[B, W]`` (``W = ceil(N / 32)``) or None (all eligible).
      k: results per query, ``1 <= k``; ``k > N`` allowed (padded).
      num_valid: items ``>= num_valid`` are padding and never returned.
      chunk: items scored per step (one int8 GEMM; bounded temporaries).
      fanout: branching factor of the exact hierarchical top-k (the largest; past 64k
        items a smaller one when ``k`` is large: :func:`hierarchy_fanout`).
    Returns:
      ``(scores f32[B, k], ids i32[B, k])``, best first, ``-inf`` / ``-1`` padded.

    Algorithm: pass 1 scores the items chunk by chunk, slicing the item matrix in place
    (one int8 GEMM per chunk, :func:`_int_dot_f32`), and keeps only the maxima of groups of
    ``fanout`` and ``fanout**2`` consecutive items. Then an exact hierarchical selection:
    the k best large groups by maximum, the k best of their sub-groups; pass 2 gathers
    those ``k * fanout`` items per query and rescores them exactly
    (:func:`gathered_row_dots`: gather and a narrow int8 GEMM, queries grouped per step),
    so the ``[B, N]`` scores are never stored: storing them from the scan costs more than
    the rescoring at every k (measured at 1M × 32: +40–85 ms, against 6 ms at k = 256 and
    23 ms at k = 1024 for the rescoring). Every item of the exact top-k (in ``lax.top_k``'s
    order: equal scores by ascending row, ties at the k-th score included) lies in a
    selected group at each level: its group's maximum is at least its score, and every
    level's selection is put back in row order, so equal maxima are decided by row. The
    result is ``lax.top_k`` over all scores, values, rows and order.
    """
    _check_inputs(q, codes, scale, mask, k)
    qc, qs = quantize_rows(q)
    return reference_scan(qc, qs, codes, scale, mask, k=k, num_valid=num_valid, chunk=chunk,
                          fanout=fanout)


def _total_order_max(x: jax.Array) -> jax.Array:
    """``max(x, axis=-1)`` in ``lax.top_k``'s total order."""
    return key_value(jnp.max(order_key(x), axis=-1))


def reference_scan(qc, qs, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
                   chunk: int = 8192, fanout: int = 16):
    """:func:`int8_topk_reference` on quantised queries (``qc i8[B, D]``, ``qs f32[B]``),
    without validation."""
    n, d = codes.shape
    num_valid = n if num_valid is None else num_valid
    b = qc.shape[0]
    fanout = hierarchy_fanout(n, k, fanout)
    leaf = fanout * fanout
    c = max(leaf, min(_pow2_ceil(chunk), _pow2_ceil(n)))
    if n < c:   # small input: one padded chunk (cheap copy)
        codes = jnp.pad(codes, ((0, c - n), (0, 0)))
        scale = jnp.pad(scale, (0, c - n))
    n_items = codes.shape[0]
    nc = -(-n_items // c)
    ok_all = jnp.arange(n_items) < num_valid
    if mask is not None:
        ok_all = ok_all & unpack_mask(jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [
            (0, -(-n_items // 32) - mask.shape[-1])]), n_items)
    starts = jnp.minimum(jnp.arange(nc) * c, n_items - c)

    def scores_of(rows, chunk_of):
        """Masked exact scores ``f32[B, M]`` of item rows ``i32[B, M]`` (chunk ``i32[B, M]``
        they were scanned in: items a shifted last chunk re-reads are masked there)."""
        s = gathered_row_dots(codes, rows, qc) * scale[rows] * qs[:, None]
        ok = (ok_all[rows] if ok_all.ndim == 1 else jnp.take_along_axis(ok_all, rows, 1))
        return jnp.where(ok & (rows >= chunk_of * c), s, NEG_INF)

    def body(_, i):
        # chunks slice the arrays in place; the last one is shifted back to fit and its
        # items already covered by the previous chunk are masked out.
        start = starts[i]
        cc = lax.dynamic_slice_in_dim(codes, start, c, 0)
        sc = lax.dynamic_slice_in_dim(scale, start, c, 0)
        ok = lax.dynamic_slice_in_dim(ok_all, start, c, ok_all.ndim - 1)
        ok = ok & (start + jnp.arange(c) >= i * c)
        s = jnp.where(ok, (_int_dot_f32(qc, cc) * sc[None, :]) * qs[:, None], NEG_INF)
        g1 = _total_order_max(s.reshape(b, c // fanout, fanout))
        g2 = _total_order_max(g1.reshape(b, c // leaf, fanout))
        return None, ((s, g1, g2) if few else (g1, g2))

    # Pass 1 keeps the group maxima; the k best large groups, then the k best of their
    # sub-groups; pass 2 rescores those k * fanout items exactly. With too few groups to
    # pre-select, every item is a candidate: plain top_k over stored scores.
    few = nc * (c // leaf) <= k
    _, out = lax.scan(body, None, jnp.arange(nc))                   # [nc,B,c/f], [nc,B,c/f²]
    if few:
        s_all = out[0]
        vals, pos = top_k(jnp.moveaxis(s_all, 0, 1).reshape(b, nc * c), min(k, nc * c))
        return _pad_k(*_finish(vals, starts[pos // c] + pos % c), k)
    g1, g2 = out
    rows_b = jnp.arange(b)[:, None]
    # Each level's selection is put back in row order (positions in g2 are in row order
    # for every item that can be returned), so equal maxima and equal scores are decided
    # by row at every level, as lax.top_k over all scores decides them: an item of the
    # top-k, ties included, lies in a kept group at each level.
    _, top2 = top_k(jnp.moveaxis(g2, 0, 1).reshape(b, -1), k)            # [B, k]
    top2 = jnp.sort(top2, axis=1)
    ch, w2 = top2 // (c // leaf), top2 % (c // leaf)
    cand1 = g1.reshape(nc, b, c // leaf, fanout)[ch, rows_b, w2].reshape(b, k * fanout)
    _, p1 = top_k(cand1, k)
    p1 = jnp.sort(p1, axis=1)
    ch1 = jnp.take_along_axis(ch, p1 // fanout, axis=1)                        # [B, k]
    w1 = jnp.take_along_axis(w2, p1 // fanout, axis=1) * fanout + p1 % fanout  # group in chunk
    rows = (starts[ch1] + w1 * fanout)[:, :, None] + jnp.arange(fanout)        # [B, k, f]
    s0 = scores_of(rows.reshape(b, -1), jnp.repeat(ch1, fanout, axis=1))
    vals, p0 = top_k(s0, k)
    return _finish(vals, jnp.take_along_axis(rows.reshape(b, -1), p0, axis=1))


# --------------------------------------------------------------------------------------
# Pallas kernel (Triton backend)
# --------------------------------------------------------------------------------------

def _topk_tile_kernel(qc_ref, qs_ref, x_ref, xs_ref, mask_ref, ov_ref, oi_ref, *,
                      num_tiles: int, num_valid: int, block_d: int, m: int,
                      per_query_mask: bool):
    """One grid step: query block ``i`` × strided item tile ``t``.

    Refs (block shapes):
      qc_ref i8[BQ, Dp], qs_ref f32[BQ], x_ref i8[TN, Dp] (items j*T + t), xs_ref f32[TN],
      mask_ref u32[W] or u32[Bp, W] (whole array, gathered by index),
      ov_ref f32[BQ, m], oi_ref i32[BQ, m] (this tile's candidates).
    """
    i, t = pl.program_id(0), pl.program_id(1)
    bq, dp = qc_ref.shape
    tn = x_ref.shape[0]

    acc = jnp.zeros((bq, tn), jnp.int32)
    for d0 in range(0, dp, block_d):  # static: a handful of chunks
        acc += jnp.dot(qc_ref[:, pl.ds(d0, block_d)], x_ref[:, pl.ds(d0, block_d)].T,
                       preferred_element_type=jnp.int32)
    s = (acc.astype(jnp.float32) * xs_ref[...][None, :]) * qs_ref[...][:, None]

    j = lax.broadcasted_iota(jnp.int32, (bq, tn), 1)
    item = j * num_tiles + t                                           # storage index
    if per_query_mask:
        row = i * bq + lax.broadcasted_iota(jnp.int32, (bq, tn), 0)
        words = mask_ref[row, item >> 5]
        ok = (((words >> (item & 31).astype(jnp.uint32)) & jnp.uint32(1)) == 1)
    else:
        item1 = lax.broadcasted_iota(jnp.int32, (tn,), 0) * num_tiles + t
        words1 = mask_ref[item1 >> 5]
        ok = ((((words1 >> (item1 & 31).astype(jnp.uint32)) & jnp.uint32(1)) == 1)[None, :])
    ok = ok & (item < num_valid)
    s = jnp.where(ok, s, NEG_INF)

    if m == tn:  # full tile: candidates are the scores themselves
        ov_ref[...] = s
        oi_ref[...] = jnp.where(ok, item, -1)
        return
    col = lax.broadcasted_iota(jnp.int32, (bq, m), 1)

    # one round of max-and-mask per candidate, for every query of the block, on total-order
    # keys (order_key): the best item, the lowest row among equal keys (rows j * T + t
    # grow with j), +0.0 above -0.0
    def round_(r, carry):
        key, vals, ids = carry
        mx = jnp.max(key, axis=1)
        pos = jnp.min(jnp.where(key == mx[:, None], j, tn), axis=1)
        hit = mx > NEG_INF_KEY
        vals = jnp.where(col == r, mx[:, None], vals)
        ids = jnp.where(col == r, jnp.where(hit, pos * num_tiles + t, -1)[:, None], ids)
        return jnp.where(j == pos[:, None], NEG_INF_KEY, key), vals, ids

    _, vals, ids = lax.fori_loop(0, m, round_, (order_key(s),
                                                jnp.full((bq, m), NEG_INF_KEY, jnp.int32),
                                                jnp.full((bq, m), -1, jnp.int32)))
    ov_ref[...] = key_value(vals)
    oi_ref[...] = ids


def _tile_candidates(qc, qs, codes, scale, mask, *, m, num_valid, bs: BlockSizes,
                     interpret: bool):
    """Runs the kernel: ``(f32[Bp, T, m], i32[Bp, T, m])`` candidates per query and tile."""
    from jax.experimental.pallas import triton as pltriton

    bp, dp = qc.shape
    n = codes.shape[0]
    tn = bs.block_n
    t = n // tn
    x3 = codes.reshape(tn, t, dp)          # item j*T + t  ->  x3[j, t]
    s2 = scale.reshape(tn, t)
    per_query = mask.ndim == 2
    kernel = functools.partial(_topk_tile_kernel, num_tiles=t, num_valid=num_valid,
                               block_d=min(bs.block_d, dp), m=m, per_query_mask=per_query)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(bp // bs.block_q, t),
        in_specs=[
            pl.BlockSpec((bs.block_q, dp), lambda i, j: (i, 0)),
            pl.BlockSpec((bs.block_q,), lambda i, j: (i,)),
            pl.BlockSpec((tn, None, dp), lambda i, j: (0, j, 0)),
            pl.BlockSpec((tn, None), lambda i, j: (0, j)),
            any_spec,
        ],
        out_specs=[
            pl.BlockSpec((bs.block_q, None, m), lambda i, j: (i, j, 0)),
            pl.BlockSpec((bs.block_q, None, m), lambda i, j: (i, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((bp, t, m), jnp.float32),
                   jax.ShapeDtypeStruct((bp, t, m), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps,
                                                num_stages=bs.num_stages),
        interpret=interpret,
        name=f"int8_topk_m{m}",
    )(qc, qs, x3, s2, mask)


def padded_dim(d: int) -> int:
    """Feature width the kernel works on: a power of two >= 32 up to 128, else a multiple
    of 32 (the in-kernel dot loops over power-of-two chunks of it)."""
    return max(32, _pow2_ceil(d)) if d <= 128 else -(-d // 32) * 32


def padded_rows(n: int, align: int = 1024) -> int:
    """Item rows the index stores: a multiple of ``align`` (>= align), so every kernel
    tile size up to ``align`` divides it and no per-call padding copy is needed."""
    return max(align, -(-n // align) * align)


def _pad_for_kernel(q, codes, scale, mask, bs: BlockSizes):
    """Pads queries/items/features to the kernel's power-of-two blocks (a copy only when the
    caller did not pre-pad; ``st_jax.build_index`` stores items pre-padded)."""
    b, d = q.shape
    n = codes.shape[0]
    dp = padded_dim(d)
    bd = min(bs.block_d, dp & -dp)   # largest power of two dividing dp, capped
    tn = bs.block_n
    n_pad = max(-(-n // tn) * tn, tn)
    bp = -(-b // bs.block_q) * bs.block_q
    w_pad = n_pad // 32
    if (n_pad, dp) != codes.shape:
        codes = jnp.pad(codes, ((0, n_pad - n), (0, dp - d)))
        scale = jnp.pad(scale, (0, n_pad - n))
    q = jnp.pad(q, ((0, bp - b), (0, dp - d)))
    if mask is None:
        mask = jnp.full((w_pad,), 0xFFFFFFFF, jnp.uint32)
    elif mask.ndim == 1:
        mask = jnp.pad(mask, (0, w_pad - mask.shape[0]))
    else:
        mask = jnp.pad(mask, ((0, bp - b), (0, w_pad - mask.shape[1])))
    return q, codes, scale, mask, dataclasses.replace(bs, block_d=bd)


@functools.partial(jax.jit, static_argnames=("k", "num_valid", "block_sizes", "interpret",
                                             "exact"))
def int8_topk_pallas(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
                     block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
                     exact: bool = True):
    """Pallas implementation; same contract as :func:`int8_topk_reference`.

    Args (beyond the twin's):
      block_sizes: kernel tunables.
      interpret: run the kernel in Pallas interpret mode (CPU testing).
      exact: if False, skip the saturation re-runs (one pass; may miss items from a tile
        holding more than ``m - 1`` of the top-k — use ``saturation_rate`` to measure).
    """
    _check_inputs(q, codes, scale, mask, k)
    b = q.shape[0]
    n_real = codes.shape[0]
    num_valid = n_real if num_valid is None else min(num_valid, n_real)
    bs = block_sizes
    q, codes, scale, mask, bs = _pad_for_kernel(q, codes, scale, mask, bs)
    qc, qs = quantize_rows(q)
    tn = bs.block_n
    t = codes.shape[0] // tn

    def run(m):
        return _tile_candidates(qc, qs, codes, scale, mask, m=m, num_valid=num_valid, bs=bs,
                                interpret=interpret)

    vals, idx = exact_topk_from_tiles(run, k=k, batch=b, num_tiles=t, tile=tn,
                                      min_candidates=bs.min_candidates,
                                      escalation=bs.escalation, exact=exact, ties_by_row=True)
    return vals, idx


def _ladder(k: int, num_tiles: int, tile: int, min_candidates: int, escalation: int,
            exact: bool) -> list[int]:
    """Per-tile candidate counts to try: the first keeps ``T * m >= 2k``, then x escalation,
    ending with the whole tile (exact by construction)."""
    kk = min(k, num_tiles * tile)
    m0 = min(tile, max(min_candidates, _pow2_ceil(-(-2 * kk // num_tiles))))
    ladder = [m0]
    while exact and ladder[-1] < tile:
        ladder.append(min(tile, ladder[-1] * escalation))
    return ladder


def _merge(v, ids, kk: int, tile: int):
    """Merges per-tile candidates ``f32/i32[Bp, T, m]``.

    Returns ``(vals f32[Bp, kk], ids i32[Bp, kk], saturated bool[Bp, T])``: a tile is
    saturated when its m-th candidate reaches the k-th merged score (it may hide more).
    """
    m = v.shape[2]
    top_v, pos = lax.top_k(v.reshape(v.shape[0], -1), kk)
    top_i = jnp.take_along_axis(ids.reshape(ids.shape[0], -1), pos, axis=1)
    if m >= tile:
        return top_v, top_i, jnp.zeros(v.shape[:2], bool)
    last = v[:, :, m - 1]
    return top_v, top_i, (last > NEG_INF) & (last >= top_v[:, kk - 1, None])


def _lowest_rows_at_ties(cand_v, cand_i, top_v, top_i):
    """The top ``kk`` of candidates ``(f32[B, C], i32[B, C])`` in ``lax.top_k``'s order by
    row, from ``(top_v, top_i) = lax.top_k`` over them in candidate order (``f32/i32[B,
    kk]``): of the candidates tied at the kk-th value the lowest rows, and equal values by
    ascending row. One more top-k over the candidates (rows tied at the kk-th value) and a
    sort of the ``[B, kk]`` result."""
    kk = top_v.shape[1]
    key = order_key(cand_v)
    kth = order_key(top_v[:, kk - 1:])
    n_above = jnp.sum(order_key(top_v) > kth, axis=1, keepdims=True)       # kept as they are
    _, tpos = lax.top_k(jnp.where(key == kth, -cand_i, jnp.iinfo(jnp.int32).min), kk)
    tied = jnp.take_along_axis(cand_i, tpos, axis=1)                        # lowest rows first
    r = jnp.arange(kk)[None, :]
    rows = jnp.where(r < n_above, top_i,
                     jnp.take_along_axis(tied, jnp.maximum(r - n_above, 0), axis=1))
    vals = jnp.where(r < n_above, top_v, top_v[:, kk - 1:])
    _, rows, vals = lax.sort((~order_key(vals), rows, vals), num_keys=2)
    return vals, rows


def exact_topk_from_tiles(run, *, k: int, batch: int, num_tiles: int, tile: int,
                          min_candidates: int = 8, escalation: int = 8, exact: bool = True,
                          ties_by_row: bool = False):
    """Exact top-k from a kernel that reports each tile's best ``m`` candidates.

    ``run(m) -> (f32[Bp, T, m], i32[Bp, T, m])``. Merges with ``lax.top_k``; if a tile is
    saturated (its m-th candidate reaches the k-th merged score) re-runs with a larger ``m``
    inside ``lax.cond`` (see the module docstring for why this is exact). Equal scores come
    in candidate order (tile, then rank in the tile), or with ``ties_by_row`` by ascending
    row, the lowest rows kept at the k-th score (for tiles of interleaved rows); an
    unsaturated tile's m candidates hold all its items at or above the k-th score, so the
    choice is over every tied item.
    Returns ``(f32[batch, k], i32[batch, k])``, -inf / -1 padded.
    """
    kk = min(k, num_tiles * tile)
    ladder = _ladder(k, num_tiles, tile, min_candidates, escalation, exact)

    def attempt(level):
        cand_v, cand_i = run(ladder[level])
        v, i, sat = _merge(cand_v, cand_i, kk, tile)
        if ties_by_row:
            v, i = _lowest_rows_at_ties(cand_v.reshape(v.shape[0], -1),
                                        cand_i.reshape(v.shape[0], -1), v, i)
        sat = jnp.any(sat[:batch])
        if level + 1 == len(ladder):
            return v, i
        return lax.cond(sat, lambda: attempt(level + 1), lambda: (v, i))

    vals, idx = attempt(0)
    vals, idx = _finish(vals[:batch], idx[:batch])
    return _pad_k(vals, idx, k)


def saturation_rate(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
    """Fraction of queries whose first kernel pass was saturated (needed a re-run)."""
    b = q.shape[0]
    n_real = codes.shape[0]
    num_valid = n_real if num_valid is None else num_valid
    q, codes, scale, mask, bs = _pad_for_kernel(q, codes, scale, mask, block_sizes)
    qc, qs = quantize_rows(q)
    tn = bs.block_n
    t = codes.shape[0] // tn
    m0 = _ladder(k, t, tn, bs.min_candidates, bs.escalation, False)[0]
    v, ids = _tile_candidates(qc, qs, codes, scale, mask, m=m0, num_valid=num_valid, bs=bs,
                              interpret=interpret)
    return tile_saturation(v, ids, k=k, tile=tn, batch=b)


def tile_saturation(v, ids, *, k: int, tile: int, batch: int):
    """Fraction of queries with a saturated tile among candidates ``[Bp, T, m]``."""
    _, _, sat = _merge(v, ids, min(k, v.shape[1] * tile), tile)
    return jnp.mean(jnp.any(sat[:batch], axis=1).astype(jnp.float32))


# --------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------

BACKENDS = ("auto", "xla", "pallas", "interpret")


def dispatch(backend: str, args: tuple, *, twin, kernel, cpu=None):
    """The kernels' backend choice: ``"xla"`` ``twin(*args)``, ``"pallas"`` ``kernel(*args)``,
    ``"interpret"`` ``kernel(*args, interpret=True)``, ``"auto"`` chosen when lowered
    (``lax.platform_dependent``): the kernel for CUDA (also when exporting for ``cuda`` from a
    CPU host), ``cpu`` (the twin when None) for CPU, the twin elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "xla":
        return twin(*args)
    if backend == "pallas":
        return kernel(*args)
    if backend == "interpret":
        return kernel(*args, interpret=True)
    branches = {"cuda": lambda *a: kernel(*a), "default": lambda *a: twin(*a)}
    if cpu is not None:
        branches["cpu"] = lambda *a: cpu(*a)
    return lax.platform_dependent(*args, **branches)


def int8_topk(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
              backend: str = "auto", block_sizes: BlockSizes = BlockSizes()):
    """Masked Int8 top-k: the Pallas kernel on GPU, the XLA twin elsewhere.

    ``backend``: ``"auto"`` (``lax.platform_dependent``: kernel when lowered for CUDA, twin
    otherwise — so an export for ``cuda`` from a CPU host gets the kernel), ``"xla"``,
    ``"pallas"``, ``"interpret"``. Returns ``(scores f32[B, k], ids i32[B, k])``.
    """
    twin = functools.partial(int8_topk_reference, k=k, num_valid=num_valid)
    kern = functools.partial(int8_topk_pallas, k=k, num_valid=num_valid,
                             block_sizes=block_sizes)
    return dispatch(backend, (q, codes, scale, mask), twin=twin, kernel=kern)
