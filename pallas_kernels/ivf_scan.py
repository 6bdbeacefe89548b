"""IVF gather-scan: Int8 top-k over each query's probed blocks, reading them in place.

Inputs (both implementations): queries ``f32[B, D]`` (quantised per row inside), the index's
``codes i8[n_rows, D]`` / ``scale f32[n_rows]`` stored cluster-major in blocks of ``block``
items, each query's probed blocks ``i32[B, P]`` and their partial eligibility masks
``u32[B, P, block // 32]`` (words of the probed blocks only — SilverTorch's probe-then-filter).
Output: ``(scores f32[B, k], rows i32[B, k])`` in storage rows, -inf / -1 padded.

- :func:`ivf_topk_pallas` (Triton): grid (query, group of ``group`` probed blocks). Each step
  gathers its blocks' rows straight from the item matrix in HBM (no gathered temporary),
  scores them against the query, applies the partial mask and keeps its best ``m``; blocks
  without an eligible item are moved to the end and steps made only of them read nothing; the
  candidates are merged exactly as in :mod:`pallas_kernels.int8_topk` (saturation check and
  escalation, so the result is exact).
- :func:`ivf_topk_reference` (XLA, fast on CPU): one loop over the batch's (query, probed
  block) pairs that hold an eligible item — filtered-out and padding blocks are never read.
- :func:`ivf_topk`: dispatcher (``lax.platform_dependent``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import native
from pallas_kernels._ffi import native_cpu_primitive
from pallas_kernels._select import (NEG_INF_KEY, key_value, order_key, pow2_floor,
                                    set_bit_positions, top_k)
from pallas_kernels.int8_topk import (NEG_INF, _pow2_ceil, dispatch, exact_topk_from_tiles,
                                      gathered_row_dots, int8_row_dots, padded_dim,
                                      quantize_rows)


def _check(q, codes, scale, blocks, pmask, k, block):
    if q.ndim != 2 or codes.ndim != 2 or q.shape[1] != codes.shape[1]:
        raise ValueError(f"queries [B, D] and codes [n_rows, D] must agree; got {q.shape} "
                         f"and {codes.shape}")
    if block % 32 or codes.shape[0] % block:
        raise ValueError(f"block ({block}) must be a multiple of 32 dividing n_rows "
                         f"({codes.shape[0]})")
    b, p = blocks.shape
    if blocks.shape[0] != q.shape[0] or pmask.shape != (b, p, block // 32):
        raise ValueError(f"blocks must be i32[{q.shape[0]}, P] and pmask u32[B, P, "
                         f"{block // 32}]; got {blocks.shape} and {pmask.shape}")
    if pmask.dtype != jnp.uint32:
        raise ValueError(f"pmask must be uint32; got {pmask.dtype}")
    if scale.shape != (codes.shape[0],):
        raise ValueError(f"scale must be f32[{codes.shape[0]}]; got {scale.shape}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")


@functools.partial(jax.jit, static_argnames=("k", "block", "step_items", "chunk_blocks", "by"))
def ivf_topk_reference(q, codes, scale, blocks, pmask, *, k: int, block: int,
                       step_items: int = 32768, chunk_blocks: int = 32, by: str = "auto"):
    """Plain-XLA twin of :func:`ivf_topk_pallas`, formulated to be fast on CPU.

    Args (beyond the module's contract):
      step_items: items scored per loop step of the block path.
      chunk_blocks: probed blocks per chunk of the block path (below).
      by: ``"blocks"``, ``"items"`` or ``"auto"`` — how the eligible items are read (below).
        Both give identical results (same scores, same order among ties); ``auto`` picks
        ``items`` when the largest per-query eligible count fits in a power of two ``cap
        <= P * block / 4`` and ``2 * B * cap`` is at most the items of the live blocks.

    Scores are exact integer dots as narrow int8 GEMMs (:func:`int8_row_dots`: each query
    zero-padded to 4 columns), XLA:CPU's fastest form of this matrix-vector work.

    **Items** (selective partial masks): each query's eligible items are compacted, in
    probe order, into ``[B, cap]`` storage rows (``cap`` a power of two from ``k``, chosen
    by ``lax.switch``), scored in groups of queries (:func:`gathered_row_dots`) and selected
    by one top-k: with a 10 % filter this scores a tenth of the rows the block scan
    reads.

    **Blocks**: each query's probed blocks that hold an eligible item are moved to the
    front of its list (stable: probe order) and cut into chunks of ``chunk_blocks``; a loop
    with a data-dependent trip count scores only the live chunks of the whole batch, a
    fixed number per step (one batched GEMM over the gathered chunks), straight into a
    ``-inf``-initialised ``[B, P * block]`` buffer in which row ``b`` holds query ``b``'s
    live blocks first. The top-k then selects over each row's first ``L`` blocks, ``L``
    the smallest power of two (from ``P / 16``) that holds the longest list (``lax.switch``
    over static sizes). Padding and filtered-out blocks cost nothing but the compaction,
    so a selective filter makes the scan cheaper, and queries with few live blocks do not
    wait for the others. Both paths select with :func:`pallas_kernels._select.top_k`
    (``lax.top_k``'s result; a threshold and one sort of ~1.3 k candidates on CPU for large
    k).
    """
    _check(q, codes, scale, blocks, pmask, k, block)
    if by not in ("auto", "blocks", "items"):
        raise ValueError(f"by must be 'auto', 'blocks' or 'items'; got {by!r}")
    qc, qs = quantize_rows(q)
    return _twin_scan(qc, qs, codes, scale, blocks, pmask, k=k, block=block,
                      step_items=step_items, chunk_blocks=chunk_blocks, by=by)


def _twin_scan(qc, qs, codes, scale, blocks, pmask, *, k: int, block: int,
               step_items: int = 32768, chunk_blocks: int = 32, by: str = "auto"):
    """:func:`ivf_topk_reference` on quantised queries (``qc i8[B, D]``, ``qs f32[B]``)."""
    b, p = blocks.shape
    d = codes.shape[1]
    if b == 0 or p == 0:          # no queries, or nothing probed: all padding
        return (jnp.full((b, k), NEG_INF, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    live = jnp.any(pmask != 0, axis=-1)                          # [B, P]
    count = jnp.sum(live, axis=1, dtype=jnp.int32)               # live pairs per query
    kk = min(k, p * block)

    def by_blocks():      # its set-up lives in the branch: the item path never pays for it
        c = max(1, min(chunk_blocks, p))                         # blocks per chunk
        nc = -(-p // c)                                          # chunk slots per query
        pc = nc * c
        order = jnp.argsort(~live, axis=1, stable=True)          # live blocks first
        sblk = jnp.pad(jnp.take_along_axis(blocks, order, axis=1), ((0, 0), (0, pc - p)))
        smask = jnp.pad(jnp.take_along_axis(pmask, order[:, :, None], axis=1),
                        ((0, 0), (0, pc - p), (0, 0))).reshape(b, nc, c, -1)
        nch = (count + c - 1) // c                               # live chunks per query
        chunk_live = jnp.arange(nc)[None, :] < nch[:, None]      # [B, nc]
        s_per = max(1, min(step_items // (c * block), b * nc))   # chunks per step
        n_steps = -(-(b * nc) // s_per)
        # live chunks first; the padding repeats the last chunk (rewritten identically)
        corder = jnp.pad(jnp.argsort(~chunk_live.reshape(-1), stable=True).astype(jnp.int32),
                         (0, n_steps * s_per - b * nc), mode="edge")
        sblk3 = sblk.reshape(b, nc, c)
        codes_b = codes.reshape(-1, block, d)
        scale_b = scale.reshape(-1, block)
        bits = jnp.arange(32, dtype=jnp.uint32)

        def body(i, buf):
            ids = lax.dynamic_slice_in_dim(corder, i * s_per, s_per)
            qq, j = ids // nc, ids % nc
            blk = sblk3[qq, j]                                   # [S, c]
            x = codes_b[blk].reshape(s_per, c * block, d)
            s = (int8_row_dots(x, qc[qq]).reshape(s_per, c, block) * scale_b[blk]) \
                * qs[qq][:, None, None]
            ok = ((smask[qq, j][..., None] >> bits) & 1).reshape(s_per, c, block)
            return buf.at[qq, j].set(jnp.where(ok.astype(bool), s, NEG_INF).reshape(
                s_per, c * block))

        steps = (jnp.sum(nch) + s_per - 1) // s_per
        buf = lax.fori_loop(0, steps, body,
                            jnp.full((b, nc, c * block), NEG_INF, jnp.float32))
        # row b holds query b's live blocks in probe order, then -inf: top_k over the
        # first L blocks, L the smallest power of two (from P / 16) holding the longest
        buf = buf.reshape(b, pc * block)
        smallest = max(-(-kk // block), p // 16, 1)
        sizes = sorted({min(pc, smallest << i) for i in range(pc.bit_length() + 1)})
        which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.max(count))
        v, pos = lax.switch(which, [_leading_topk(sz * block, kk) for sz in sizes], buf)
        return v, jnp.take_along_axis(sblk, pos // block, axis=1) * block + pos % block

    elig = jnp.sum(lax.population_count(pmask).astype(jnp.int32), axis=(1, 2))      # [B]

    def by_items(cap):
        def run():
            pos = set_bit_positions(pmask.reshape(b, -1), cap)
            rows = jnp.take_along_axis(blocks, pos // block, axis=1) * block + pos % block
            s = (gathered_row_dots(codes, rows, qc) * scale[rows]) * qs[:, None]  # [B, cap]
            s = jnp.where(jnp.arange(cap)[None, :] < elig[:, None], s, NEG_INF)
            v, i = top_k(s, kk)
            return v, jnp.take_along_axis(rows, i, axis=1)
        return run

    lo = max(kk, 128)
    hi = {"auto": pow2_floor(p * block // 4), "items": max(lo, _pow2_ceil(p * block)),
          "blocks": 0}[by]
    caps = [lo << i for i in range(32) if lo << i <= hi]
    if not caps:
        v, rows = by_blocks()
    else:
        ci = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.max(elig))  # first cap >= max
        worth = ci < len(caps)
        if by == "auto":
            cap = jnp.asarray(caps + [caps[-1]], jnp.int32)[ci]
            worth &= 2 * b * cap <= jnp.sum(count) * block
        v, rows = lax.switch(jnp.where(worth, ci, len(caps)),
                             [by_items(c) for c in caps] + [by_blocks])
    rows = jnp.where(v > NEG_INF, rows, -1)
    if v.shape[1] < k:
        v = jnp.pad(v, ((0, 0), (0, k - v.shape[1])), constant_values=NEG_INF)
        rows = jnp.pad(rows, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
    return v, rows.astype(jnp.int32)


def _leading_topk(size: int, kk: int):
    """Block path's selection: ``run(buf f32[B, n]) -> (f32[B, kk], i32[B, kk])``, the top
    ``kk`` of each row's first ``size`` entries (positions; -inf / 0 padded)."""
    def run(buf):
        v, pos = top_k(buf[:, :size], min(kk, size))
        extra = kk - v.shape[1]
        return (jnp.pad(v, ((0, 0), (0, extra)), constant_values=NEG_INF),
                jnp.pad(pos, ((0, 0), (0, extra))))
    return run


def _reduce2(op, x):
    """Full reduction of a 2-D array one axis at a time (the Triton lowering of a
    multi-axis reduction to a scalar fails)."""
    return op(op(x, axis=1), axis=0)


def _ivf_kernel(qc_ref, qs_ref, blk_ref, pm_ref, codes_ref, scale_ref, ov_ref, oi_ref, *,
                block: int, group: int, m: int, chunk_d: int):
    """One grid step: query ``b`` × ``group`` probed blocks.

    Refs: qc_ref i8[Dp], qs_ref f32[1], blk_ref i32[G], pm_ref u32[G * block / 32] (this
    step's partial mask words), codes_ref i8[n_rows, Dp] and scale_ref f32[n_rows] (whole
    arrays in HBM, gathered by row index), ov_ref / oi_ref: [m] candidates, or [G, block]
    when ``m == G * block``.

    A step whose mask words are all zero (no eligible item: filtered out, or padding) reads
    no item rows and writes empty candidates.
    """
    live = jnp.sum((pm_ref[...] != 0).astype(jnp.int32)) > 0

    @pl.when(live)
    def _():
        _ivf_step(qc_ref, qs_ref, blk_ref, pm_ref, codes_ref, scale_ref, ov_ref, oi_ref,
                  block=block, group=group, m=m, chunk_d=chunk_d)

    @pl.when(jnp.logical_not(live))
    def _():
        ov_ref[...] = jnp.full(ov_ref.shape, NEG_INF, jnp.float32)
        oi_ref[...] = jnp.full(oi_ref.shape, -1, jnp.int32)


def _ivf_step(qc_ref, qs_ref, blk_ref, pm_ref, codes_ref, scale_ref, ov_ref, oi_ref, *,
              block: int, group: int, m: int, chunk_d: int):
    """The work of a grid step of :func:`_ivf_kernel` with at least one eligible item."""
    dp = qc_ref.shape[0]
    g_i = lax.broadcasted_iota(jnp.int32, (group, block), 0)
    l_i = lax.broadcasted_iota(jnp.int32, (group, block), 1)
    # block id of each (g, l): a masked sum over the loaded ids (no gather on values)
    blk = blk_ref[...]
    blk_of = jnp.zeros((group, block), jnp.int32)
    for g in range(group):
        blk_of = jnp.where(g_i == g, jnp.sum(jnp.where(
            lax.broadcasted_iota(jnp.int32, (group,), 0) == g, blk, 0)), blk_of)
    rows = blk_of * block + l_i                                            # [G, block]

    acc = jnp.zeros((group, block), jnp.int32)
    for d0 in range(0, dp, chunk_d):
        d_i = d0 + lax.broadcasted_iota(jnp.int32, (group, block, chunk_d), 2)
        x = codes_ref[rows[:, :, None] + jnp.zeros_like(d_i), d_i].astype(jnp.int32)
        qv = qc_ref[pl.ds(d0, chunk_d)].astype(jnp.int32)
        acc += jnp.sum(x * qv[None, None, :], axis=2)
    qs = jnp.sum(qs_ref[...])
    s = (acc.astype(jnp.float32) * scale_ref[rows]) * qs
    words = pm_ref[g_i * (block // 32) + (l_i >> 5)]
    ok = ((words >> (l_i & 31).astype(jnp.uint32)) & jnp.uint32(1)) == 1
    s = jnp.where(ok, s, NEG_INF)

    if m == group * block:
        ov_ref[...] = s
        oi_ref[...] = jnp.where(ok, rows, -1)
        return
    flat = g_i * block + l_i
    col = lax.broadcasted_iota(jnp.int32, (m,), 0)

    # one round of max-and-mask per candidate on total-order keys (order_key): the best
    # item, the first in probe order among equal keys, +0.0 above -0.0
    def round_(r, carry):
        key, vals, ids = carry
        mx = _reduce2(jnp.max, key)
        pos = _reduce2(jnp.min, jnp.where(key == mx, flat, group * block))
        row = _reduce2(jnp.sum, jnp.where(flat == pos, rows, 0))
        vals = jnp.where(col == r, mx, vals)
        ids = jnp.where(col == r, jnp.where(mx > NEG_INF_KEY, row, -1), ids)
        return jnp.where(flat == pos, NEG_INF_KEY, key), vals, ids

    _, vals, ids = lax.fori_loop(0, m, round_, (order_key(s),
                                                jnp.full((m,), NEG_INF_KEY, jnp.int32),
                                                jnp.full((m,), -1, jnp.int32)))
    ov_ref[...] = key_value(vals)
    oi_ref[...] = ids


@functools.partial(jax.jit, static_argnames=("k", "block", "group", "interpret", "exact",
                                             "num_warps"))
def ivf_topk_pallas(q, codes, scale, blocks, pmask, *, k: int, block: int, group: int = 4,
                    interpret: bool = False, exact: bool = True, num_warps: int = 4):
    """Pallas IVF scan; same contract as :func:`ivf_topk_reference`.

    ``group`` probed blocks per grid step (power of two); ``exact=False`` skips the
    saturation re-runs.
    """
    from jax.experimental.pallas import triton as pltriton

    _check(q, codes, scale, blocks, pmask, k, block)
    b, p = blocks.shape
    d = codes.shape[1]
    dp = padded_dim(d)
    if dp != d:
        codes = jnp.pad(codes, ((0, 0), (0, dp - d)))
        q = jnp.pad(q, ((0, 0), (0, dp - d)))
    qc, qs = quantize_rows(q)
    # probe-then-filter: each query's blocks holding an eligible item first (stable), so
    # the steps past them have all-zero masks and are skipped inside the kernel
    order = jnp.argsort(~jnp.any(pmask != 0, axis=-1), axis=1, stable=True)
    blocks = jnp.take_along_axis(blocks, order, axis=1)
    pmask = jnp.take_along_axis(pmask, order[:, :, None], axis=1)
    p_pad = max(group, -(-p // group) * group)
    blocks = jnp.pad(blocks, ((0, 0), (0, p_pad - p)))
    wpb = block // 32
    pm = jnp.pad(pmask, ((0, 0), (0, p_pad - p), (0, 0))).reshape(b, p_pad * wpb)
    t = p_pad // group
    tile = group * block

    def run(m):
        full = m == tile
        oshape = (b, t, group, block) if full else (b, t, m)
        oblock = (None, None, group, block) if full else (None, None, m)
        omap = (lambda i, j: (i, j, 0, 0)) if full else (lambda i, j: (i, j, 0))
        kernel = functools.partial(_ivf_kernel, block=block, group=group, m=m, chunk_d=32)
        any_spec = pl.BlockSpec(memory_space=pl.ANY)
        v, i = pl.pallas_call(
            kernel,
            grid=(b, t),
            in_specs=[pl.BlockSpec((None, dp), lambda i, j: (i, 0)),
                      pl.BlockSpec((None, 1), lambda i, j: (i, 0)),
                      pl.BlockSpec((None, group), lambda i, j: (i, j)),
                      pl.BlockSpec((None, group * wpb), lambda i, j: (i, j)),
                      any_spec, any_spec],
            out_specs=[pl.BlockSpec(oblock, omap), pl.BlockSpec(oblock, omap)],
            out_shape=[jax.ShapeDtypeStruct(oshape, jnp.float32),
                       jax.ShapeDtypeStruct(oshape, jnp.int32)],
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
            interpret=interpret,
            name=f"ivf_scan_m{m}",
        )(qc, qs[:, None], blocks, pm, codes, scale)
        return v.reshape(b, t, m), i.reshape(b, t, m)

    return exact_topk_from_tiles(run, k=k, batch=b, num_tiles=t, tile=tile, exact=exact)


# --- native CPU scan (pallas_kernels/native.py) --------------------------------------------
#
# One primitive, ``st_ivf_scan_cpu``, on quantised queries (pallas_kernels/_ffi.py): the C++
# FFI handler when lowered for CPU alone, not for ``jax.export``, with the library available
# (or ``require_native``); otherwise the XLA twin's ops, with the same results.

_scan_cpu_p = native_cpu_primitive(
    "st_ivf_scan_cpu", native.IVF_SCAN_TARGET, _twin_scan,
    lambda qc, *_, k, block: [((qc.shape[0], k), jnp.float32), ((qc.shape[0], k), jnp.int32)])


def _scan_cpu(q, codes, scale, blocks, pmask, *, k: int, block: int, require_native: bool):
    _check(q, codes, scale, blocks, pmask, k, block)
    qc, qs = quantize_rows(q)
    return tuple(_scan_cpu_p.bind(qc, qs, codes, scale, blocks.astype(jnp.int32), pmask,
                                  k=int(k), block=int(block), require_native=require_native))


def ivf_topk_native(q, codes, scale, blocks, pmask, *, k: int, block: int):
    """The native CPU IVF scan (C++ XLA FFI handler, :mod:`pallas_kernels.native`); same
    contract and same results as :func:`ivf_topk_reference`. CPU only.

    Raises:
      pallas_kernels.native.NativeUnavailable: the library cannot be built or loaded (when
        the program is lowered); ``backend="auto"`` then uses the twin instead.
    """
    return _scan_cpu(q, codes, scale, blocks, pmask, k=k, block=block, require_native=True)


def ivf_topk(q, codes, scale, blocks, pmask, *, k: int, block: int, backend: str = "auto"):
    """IVF scan: the Pallas kernel on GPU; on CPU the native kernel when it is available
    (:mod:`pallas_kernels.native`; not in ``jax.export`` artifacts), else the XLA twin;
    ``backend="xla"`` always takes the twin (see int8_topk)."""
    return dispatch(backend, (q, codes, scale, blocks, pmask),
                    twin=functools.partial(ivf_topk_reference, k=k, block=block),
                    kernel=functools.partial(ivf_topk_pallas, k=k, block=block),
                    cpu=functools.partial(_scan_cpu, k=k, block=block, require_native=False))
