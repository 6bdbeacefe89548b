"""Sharded search: items partitioned across devices, one global top-k.

SilverTorch §5 shards the index and Bloom tensors by item partition; each shard returns
local candidates and one merge picks the global top-k. Here:

- :func:`shard_index` splits a flat or IVF :class:`~st_jax.Index` over the ``S`` devices of
  one ``jax.sharding.Mesh`` axis, ``n_local`` rows per device (a multiple of 1024, so no
  kernel copies): Int8 codes / scales, live words, row ids, float cache, the bit-sliced
  filter rows (split along their item words) and a per-shard copy of the filter
  verification lists (CSR re-based per shard, padded to the longest shard).
- Layout: the source index's storage rows are cut into *blocks* of ``block`` rows, dealt
  round robin: source block ``b`` is local block ``b // S`` of shard ``b % S``, i.e. local
  row ``r`` of shard ``s`` holds source row ``((r // block) * S + s) * block + r % block``.
  A flat index uses ``block = n_local`` (shard ``s`` holds the contiguous source rows
  ``[s * n_local, (s + 1) * n_local)``); an IVF index uses its IVF block (64 items), so the
  blocks of every cluster are spread over all shards: each shard holds a part of every
  cluster, cluster-major, with its own ``block_start`` / ``block_count``, and no item
  padding beyond the source's (a cluster's partial last block stays one block).
- :func:`sharded_search` runs, inside one ``jax.jit`` with ``shard_map``, the same core as
  :func:`~st_jax.search` (``_int8_candidates``) on every shard (filter evaluation + exact
  verification, allow words, Int8 fused top-k; IVF: probe, filter on the probed words,
  probed-block top-k) and merges the ``S`` candidate lists with one ``lax.top_k``. Every
  shard returns its exact local top-k, so the global top-k is exactly the top-k of their
  union: results equal the single-device index (ids, scores, path; ties aside). IVF: the
  centroids are replicated, so every shard probes the same clusters and their union of
  probed blocks is the single-device probe; the starvation test (probed clusters hold
  fewer than ``min_eligible_factor * k`` eligible items -> exact flat filtered scan) counts
  the eligible items of all shards (``lax.psum``), so every shard takes the path the whole
  index would take. With ``rerank=R`` each shard returns its ``R*k`` best Int8 candidates
  with their exact float scores; the merge keeps the global ``R*k`` best by Int8 score,
  then the ``k`` best by exact score -- the single-device definition.
- The filter program is compiled once, host side, against the (global) schema and
  replicated: shards share the term dictionary and row layout.
- The served retrieval graph (``serving.Retriever.load(..., mesh=)``) uses the same core
  (``_sharded_core`` with ``tasks=T`` queries per user, per-user exclusions given as source
  rows and mapped to each shard's rows, and each candidate's cache row returned by its
  shard); item updates re-shard only the live words (:func:`shard_live`).

Multi-host (several processes, each with its local devices): call
``jax.distributed.initialize(coordinator_address=..., num_processes=..., process_id=...)``
in every process before anything else touches JAX, build (or load) the same host-side
index in every process, and make the mesh over all global devices, e.g.
``Mesh(np.array(jax.devices()), ("items",))``. :func:`shard_index` creates its arrays with
``jax.make_array_from_callback``, computing a shard's rows on the host only for the
process's own devices. Call :func:`sharded_search` in every process with the same arguments
(SPMD); the merged result is replicated, read it on any process (``np.asarray`` of its
``addressable_data(0)``). Only a shard's rows are needed per device; a process that
cannot hold the whole host-side index can build its shards itself and assemble the arrays
with ``jax.make_array_from_single_device_arrays`` (same layout as below).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels._select import top_k
from pallas_kernels.int8_topk import NEG_INF, pack_mask, padded_rows
from st_jax._filter_index import FilterIndex, filter_mask, segment_positions
from st_jax._index import Index
from st_jax._ivf import IVF
from st_jax import _compiled
from st_jax._search import (_int8_candidates, allow_array, check_max_nprobe,
                            check_min_eligible_factor, check_options, check_queries,
                            empty_result, exclusion_words, filter_program, float_scores)
from st_jax._types import Int8Matrix, SearchResult, _static, pytree_dataclass

__all__ = ["ShardedIndex", "shard_index", "sharded_search"]


@pytree_dataclass
class ShardedIndex:
    """A flat or IVF index split over the ``axis`` of ``mesh`` (``S`` devices).

    Attributes (global shapes; ``n_local`` rows and ``W_local = n_local / 32`` words per
    shard; shard ``s`` holds positions ``[s * n_local, (s+1) * n_local)`` of each array;
    local row ``r`` of shard ``s`` is source row ``((r // block) * S + s) * block +
    r % block``, see the module docstring):
      codes: ``i8[S * n_local, Dp]``; scale: ``f32[S * n_local]``, sharded by rows.
      live: ``u32[S * W_local]`` live rows (padding 0).
      row_ids: ``i32/i64[S * n_local]`` id of each row (-1: padding or hole).
      cache: ``bf16/f32[S * n_local, D]`` or None.
      filter_rows: ``u32[R, S * W_local]`` bit-sliced filter rows split along words, or None.
      filter_offsets: ``i32[S, n_local + 1]`` per-shard CSR offsets; filter_terms:
        ``i32[S, T + 1]`` per-shard Bloom term lists (sentinel padded).
      row_pos: IVF only: ``i32[S * n_local]`` item position of each row (-1: none), for
        ``bool`` allow masks by position; None for a flat index (position = source row).
      centroids: IVF only: ``f32[C, D]`` replicated; block_start / block_count:
        ``i32[S, C]`` each shard's blocks of each cluster (local block numbers).
      schema: static global ``FilterSchema`` (compiling filters); shard_schema: static, the
        same with ``n_pad = n_local`` (evaluating them on a shard).
      mesh, axis: static; num_items: N; dim: D; num_rows: storage rows of the source index;
      block: rows per dealt block (``n_local`` flat, the IVF block for IVF);
      probe_caps: IVF: most local blocks any ``p`` clusters hold on one shard (static).
    """

    codes: jax.Array
    scale: jax.Array
    live: jax.Array
    row_ids: jax.Array
    cache: Any = None
    filter_rows: Any = None
    filter_offsets: Any = None
    filter_terms: Any = None
    row_pos: Any = None
    centroids: Any = None
    block_start: Any = None
    block_count: Any = None
    schema: Any = _static(default=None)
    shard_schema: Any = _static(default=None)
    mesh: Any = _static(default=None)
    axis: str = _static(default="items")
    num_items: int = _static(default=0)
    dim: int = _static(default=0)
    num_rows: int = _static(default=0)
    block: int = _static(default=0)
    probe_caps: tuple = _static(default=())

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def shard_rows(self) -> int:
        """``n_local``, rows per shard."""
        return int(self.codes.shape[0]) // self.num_shards

    @property
    def num_clusters(self) -> int:
        """IVF clusters (0: flat)."""
        return 0 if self.centroids is None else int(self.centroids.shape[0])


# ----------------------------------------------------------------------------- layout


def _to_source(shard, local, block: int, shards: int):
    """Source row of ``local`` row(s) of ``shard`` (numpy or jnp; also words, with
    ``block / 32``)."""
    return ((local // block) * shards + shard) * block + local % block


def _to_shard(rows, block: int, shards: int):
    """``(shard, local row)`` of source rows ``>= 0`` (numpy or jnp)."""
    b = rows // block
    return b % shards, (b // shards) * block + rows % block


def _source_of(i: int, n_local: int, block: int, shards: int, n_src: int):
    """Host: source rows (or words) of shard ``i`` and which of them exist."""
    g = _to_source(i, np.arange(n_local, dtype=np.int64), block, shards)
    return g, g < n_src


def _gather(src: np.ndarray, g: np.ndarray, ok: np.ndarray, axis: int = 0, fill=0):
    out = np.take(src, np.where(ok, g, 0), axis=axis)
    shape = [1] * out.ndim
    shape[axis] = -1
    return np.where(ok.reshape(shape), out, np.asarray(fill, out.dtype))


def _put_shards(fn, shape: tuple, dtype, mesh: Mesh, spec: P, dim: int = 0) -> jax.Array:
    """Global array sharded along ``dim``; shard ``i`` is ``fn(i)``, computed on the host
    for this process's devices only."""
    per = shape[dim] // int(mesh.shape[spec[dim]])

    def cb(idx):
        return np.asarray(fn((idx[dim].start or 0) // per), dtype)

    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), cb)


def _mesh_axis(mesh, axis):
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"the mesh has axes {mesh.axis_names}: name the item axis "
                             "with axis=")
        axis = mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    return axis


def shard_index(index: Index, mesh: Mesh, axis: str | None = None) -> ShardedIndex:
    """Splits a flat or IVF index over one mesh axis.

    Args:
      index: an :class:`~st_jax.Index` (flat or IVF, arrays on any device or numpy);
        tombstoned rows (``live`` bits cleared by ``st_jax.fresh.delete``) stay excluded.
      mesh: a ``jax.sharding.Mesh``; axis: the axis to shard items over (default: the
        mesh's only axis). Other mesh axes hold replicas.
    Returns:
      :class:`ShardedIndex`. A flat index gives each shard one contiguous range of rows; an
      IVF index deals every cluster's 64-item blocks round robin (module docstring).
    Raises:
      ValueError: not a mesh, an unknown / missing axis.
    """
    axis = _mesh_axis(mesh, axis)
    s = int(mesh.shape[axis])
    n, n_rows = index.num_items, index.num_rows
    ivf = index.ivf
    if ivf is None:
        n_local = padded_rows(-(-n // s))
        block = n_local
    else:
        block = ivf.block
        used = int(np.asarray(ivf.block_count).sum())          # blocks holding items
        n_local = padded_rows(-(-used // s) * block)
    total, w_local, w_src = s * n_local, n_local // 32, n_rows // 32
    rows_of = functools.partial(_source_of, n_local=n_local, block=block, shards=s,
                                n_src=n_rows)
    words_of = functools.partial(_source_of, n_local=w_local, block=block // 32, shards=s,
                                 n_src=w_src)

    def by_rows(src, fill=0):
        src = np.asarray(src)
        return lambda i: _gather(src, *rows_of(i), fill=fill)

    live = (np.asarray(index.live) if index.live is not None
            else np.asarray(pack_mask(jnp.arange(n_rows) < n)))
    perm = None if index.perm is None else np.asarray(index.perm)
    ids = None if index.ids is None else np.asarray(index.ids)
    id_dtype = np.int32 if ids is None else ids.dtype

    def pos_of(i):                                   # item position of each local row
        g, ok = rows_of(i)
        if perm is None:
            return np.where(ok & (g < n), g, -1)
        return _gather(perm, g, ok, fill=-1)

    def ids_of(i):
        p = pos_of(i)
        return p if ids is None else np.where(p >= 0, ids[np.maximum(p, 0)], -1)

    codes = np.asarray(index.items.codes)
    out = dict(
        codes=_put_shards(by_rows(codes), (total, codes.shape[1]), codes.dtype, mesh,
                          P(axis, None)),
        scale=_put_shards(by_rows(index.items.scale), (total,), np.float32, mesh, P(axis)),
        live=_put_shards(lambda i: _gather(live, *words_of(i)), (total // 32,), np.uint32,
                         mesh, P(axis)),
        row_ids=_put_shards(ids_of, (total,), id_dtype, mesh, P(axis)))
    if index.cache is not None:
        cache = np.asarray(index.cache)
        out["cache"] = _put_shards(by_rows(cache), (total, cache.shape[1]), cache.dtype, mesh,
                                   P(axis, None))
    schema = shard_schema = None
    if index.filters is not None:
        fi = index.filters
        schema = fi.schema
        frows = np.asarray(fi.rows)
        offs = np.asarray(fi.item_offsets).astype(np.int64)
        terms = np.asarray(fi.item_terms)

        def spans(i):                        # each local row's Bloom term list in the source
            g, ok = rows_of(i)
            gs = np.where(ok, g, 0)
            return offs[gs], np.where(ok, offs[gs + 1] - offs[gs], 0)

        tmax = 1 + max(int(spans(i)[1].sum()) for i in range(s))

        def local_offs(i):
            return np.concatenate([[0], np.cumsum(spans(i)[1])])[None]

        def local_terms(i):
            pos = segment_positions(*spans(i))
            out_t = np.full((1, tmax), -2, np.int32)
            out_t[0, :pos.size] = terms[pos]
            return out_t

        out["filter_rows"] = _put_shards(lambda i: _gather(frows, *words_of(i), axis=1),
                                         (frows.shape[0], total // 32), np.uint32, mesh,
                                         P(None, axis), dim=1)
        out["filter_offsets"] = _put_shards(local_offs, (s, n_local + 1), np.int32, mesh,
                                            P(axis, None))
        out["filter_terms"] = _put_shards(local_terms, (s, tmax), np.int32, mesh,
                                          P(axis, None))
        shard_schema = dataclasses.replace(
            schema, n_pad=n_local, num_items=n_local,
            fingerprint=f"{schema.fingerprint}/shard{s}x{n_local}b{block}")
    caps = ()
    if ivf is not None:
        bs = np.asarray(ivf.block_start).astype(np.int64)
        be = bs + np.asarray(ivf.block_count).astype(np.int64)
        sh = np.arange(s)[:, None]
        first = (bs[None] - sh + s - 1) // s                # first local block of each cluster
        count = (be[None] - sh + s - 1) // s - first
        caps = tuple(int(v) for v in np.cumsum(-np.sort(-count, axis=1), axis=1).max(axis=0))
        c = bs.size
        out["row_pos"] = _put_shards(pos_of, (total,), np.int32, mesh, P(axis))
        out["centroids"] = jax.device_put(np.asarray(ivf.centroids), NamedSharding(mesh, P()))
        out["block_start"] = _put_shards(lambda i: first[i:i + 1], (s, c), np.int32, mesh,
                                         P(axis, None))
        out["block_count"] = _put_shards(lambda i: count[i:i + 1], (s, c), np.int32, mesh,
                                         P(axis, None))
    return ShardedIndex(**out, schema=schema, shard_schema=shard_schema, mesh=mesh, axis=axis,
                        num_items=n, dim=index.dim, num_rows=n_rows, block=block,
                        probe_caps=caps)


def shard_live(sidx: ShardedIndex, live) -> ShardedIndex:
    """``sidx`` with new live words of its source index (``u32[num_rows / 32]``, e.g. after
    ``st_jax.fresh.delete`` / ``update`` tombstoned rows); only the live words move."""
    live = np.asarray(live)
    w_src = sidx.num_rows // 32
    if live.shape != (w_src,) or live.dtype != np.uint32:
        raise ValueError(f"live must be u32[{w_src}] (words over the source index's rows); "
                         f"got {live.dtype}{list(live.shape)}")
    s, w_local = sidx.num_shards, sidx.shard_rows // 32
    words_of = functools.partial(_source_of, n_local=w_local, block=sidx.block // 32,
                                 shards=s, n_src=w_src)
    new = _put_shards(lambda i: _gather(live, *words_of(i)), (s * w_local,), np.uint32,
                      sidx.mesh, P(sidx.axis))
    return dataclasses.replace(sidx, live=new)


# ----------------------------------------------------------------------------- search


def _allow_words(sidx: ShardedIndex, allow, batch: int):
    """``allow`` -> ``u32[S * W_local]`` / ``u32[B, S * W_local]`` (or None)."""
    if allow is None:
        return None
    a = jnp.asarray(allow_array(allow))
    n, total, s = sidx.num_items, sidx.codes.shape[0], sidx.num_shards
    if a.dtype == jnp.bool_:
        if a.shape not in ((n,), (batch, n)):
            raise ValueError(f"allow must be bool[{n}] or bool[{batch}, {n}]; got shape {a.shape}")
        if sidx.row_pos is None:                   # flat: shard rows in source row order
            return pack_mask(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, total - n)]))
        pos = sidx.row_pos
        return pack_mask(jnp.where(pos >= 0, a[..., jnp.maximum(pos, 0)], False))
    # packed uint32 words (allow_array refused any other dtype)
    w = sidx.num_rows // 32
    if a.shape not in ((w,), (batch, w)):
        raise ValueError(f"packed allow must be u32[{w}] or u32[{batch}, {w}] (words over "
                         f"the source index's rows); got {a.shape}")
    w_local = total // 32 // s
    j = np.arange(total // 32)
    g = _to_source(j // w_local, j % w_local, sidx.block // 32, s)
    ok = g < w
    return jnp.where(ok, jnp.take(a, np.where(ok, g, 0), axis=-1), jnp.uint32(0))


def _local_index(sidx: ShardedIndex, a: dict) -> Index:
    """One shard's arrays (inside ``shard_map``) as an :class:`~st_jax.Index`."""
    filters = ivf = None
    if "frows" in a:
        filters = FilterIndex(rows=a["frows"], item_offsets=a["foffs"][0],
                              item_terms=a["fterms"][0], schema=sidx.shard_schema)
    if "cents" in a:
        ivf = IVF(centroids=a["cents"], block_start=a["bstart"][0],
                  block_count=a["bcount"][0], block=sidx.block, probe_caps=sidx.probe_caps)
    return Index(items=Int8Matrix(codes=a["codes"], scale=a["scale"]), live=a["live"],
                 ivf=ivf, cache=a.get("cache"), filters=filters, num_items=sidx.shard_rows,
                 dim=sidx.dim)


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "rerank", "min_eligible_factor",
                                             "backend", "tasks", "with_cache", "max_nprobe"))
def _sharded_core(sidx: ShardedIndex, q, mask, prog, exclude, *, k: int, nprobe: int,
                  rerank: int, min_eligible_factor: float, backend: str, tasks: int = 1,
                  with_cache: bool = False, max_nprobe: int = 0):
    """Per-shard filtered top-``R*k`` (flat or IVF), then one global merge.

    Args:
      q: ``[Q, Dp]`` padded queries, ``Q = tasks * U``: query ``t * U + u`` is task ``t`` of
        user ``u``; per-user inputs below are shared by the user's ``tasks`` queries.
      mask: None or per-user allow words ``u32[S * W_local]`` / ``u32[U, S * W_local]``.
      prog: None or a compiled filter program (shared, or one per user).
      exclude: None or ``i32[U, E]`` source storage rows never to return (-1 padding).
      with_cache: also return each result's cache row, read on its shard.
    Returns:
      ``(scores f32[Q, k], ids [Q, k], rows i32[Q, k] source storage rows, path i32[Q],
      cache [Q, k, D] or None)``, replicated; -1 / -inf padded.
    """
    ax, s, n_local = sidx.axis, sidx.num_shards, sidx.shard_rows
    kk = k * max(rerank, 1)
    nq = q.shape[0]
    ivf = sidx.centroids is not None and nprobe > 0
    args = dict(codes=sidx.codes, scale=sidx.scale, live=sidx.live, row_ids=sidx.row_ids,
                cache=sidx.cache, frows=sidx.filter_rows, foffs=sidx.filter_offsets,
                fterms=sidx.filter_terms, cents=sidx.centroids, bstart=sidx.block_start,
                bcount=sidx.block_count, mask=mask)
    specs = dict(codes=P(ax, None), scale=P(ax), live=P(ax), row_ids=P(ax), cache=P(ax, None),
                 frows=P(None, ax), foffs=P(ax, None), fterms=P(ax, None), cents=P(),
                 bstart=P(ax, None), bcount=P(ax, None),
                 mask=None if mask is None else (P(ax) if mask.ndim == 1 else P(None, ax)))
    present = [name for name, v in args.items() if v is not None]

    def tile(x):
        return jnp.tile(x, (tasks,) + (1,) * (x.ndim - 1))

    def local(q, prog, exclude, *arrays):
        a = dict(zip(present, arrays))
        me = lax.axis_index(ax)
        idx = _local_index(sidx, a)
        m = a.get("mask")
        if exclude is not None:                       # source rows -> this shard's rows
            shard, row = _to_shard(jnp.maximum(exclude, 0), sidx.block, s)
            ex = exclusion_words(jnp.where((exclude >= 0) & (shard == me), row, -1),
                                 n_local // 32)
            m = ex if m is None else m & ex
        if prog is not None and not ivf:              # flat: one filter mask per user
            fm = filter_mask(idx.filters, prog, backend=backend)
            m = fm if m is None else m & fm
            prog = None
        if tasks > 1 and m is not None and m.ndim == 2:
            m = tile(m)
        # IVF: a user's program serves its task queries (probed words; prog_tasks)
        vals, rows, path = _int8_candidates(idx, q, m, prog, k=k, kk=kk,
                                            nprobe=nprobe if ivf else 0,
                                            min_eligible_factor=min_eligible_factor,
                                            backend=backend, max_nprobe=max_nprobe,
                                            axis_name=ax, prog_tasks=tasks)
        ok = rows >= 0
        safe = jnp.maximum(rows, 0)
        ids = jnp.where(ok, a["row_ids"][safe], -1)
        src = jnp.where(ok, _to_source(me, rows, sidx.block, s), -1)
        out = [vals, ids, src, path]
        if rerank:
            exact = float_scores(a["cache"], safe, q[:, :sidx.dim].astype(jnp.float32))
            out.append(jnp.where(ok, exact, NEG_INF))
        if with_cache:
            out.append(a["cache"][safe])
        return tuple(x[None] for x in out)

    n_out = 4 + bool(rerank) + bool(with_cache)
    in_specs = (P(), P(), P()) + tuple(specs[name] for name in present)
    res = jax.shard_map(local, mesh=sidx.mesh, in_specs=in_specs, out_specs=(P(ax),) * n_out,
                        check_vma=False)(q, prog, exclude, *(args[name] for name in present))
    vals, ids, rows, path = res[:4]
    extra = list(res[4:])
    exact = extra.pop(0) if rerank else None
    cache = extra.pop(0) if with_cache else None

    def flat(x):                          # [S, Q, kk, ...] -> [Q, S * kk, ...], shard-major
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((nq, s * kk) + x.shape[3:])

    def pick(x, pos):
        if x is None:
            return None
        return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)

    vals, ids, rows = flat(vals), flat(ids), flat(rows)
    exact = None if exact is None else flat(exact)
    cache = None if cache is None else flat(cache)
    top, pos = top_k(vals, kk)                   # the global R*k best Int8 candidates
    ids, rows, exact, cache = (pick(x, pos) for x in (ids, rows, exact, cache))
    if rerank:
        ex = jnp.where(top > NEG_INF, exact, NEG_INF)
        top, p2 = top_k(ex, k)
        ids, rows, cache = (pick(x, p2) for x in (ids, rows, cache))
    ok = top > NEG_INF
    out = (top, jnp.where(ok, ids, -1), jnp.where(ok, rows, -1), path[0], cache)
    rep = NamedSharding(sidx.mesh, P())                # the merged result: replicated
    return jax.tree_util.tree_map(lambda x: lax.with_sharding_constraint(x, rep), out)


def sharded_search(sidx: ShardedIndex, queries, k: int, allow=None, *, filter=None,
                   nprobe: int | None = None, rerank: int | None = None,
                   min_eligible_factor: float = 16.0, max_nprobe: int | None = None,
                   backend: str = "auto") -> SearchResult:
    """:func:`~st_jax.search` over a :class:`ShardedIndex` (same arguments and results).

    Args:
      queries: ``f32[B, D]`` / ``bf16[B, D]`` (replicated to every shard).
      k: ``1 <= k <= 65536``.
      allow: None, ``bool[N]`` / ``bool[B, N]`` by item position, or packed ``u32`` words over
        the source index's rows (``u32[num_rows / 32]`` / ``u32[B, num_rows / 32]``).
      filter: as for ``search`` (str, ``F`` expression or a list of B), exact.
      nprobe: IVF clusters probed per query (IVF indexes; default ``min(32, C)``).
      rerank: R re-scores each query's ``R * k`` best Int8 candidates with the float cache.
      min_eligible_factor, max_nprobe: the IVF starvation threshold and widest probe of
        ``search``, applied to the eligible items of the whole index (all shards).
      backend: as for ``search``.
    Returns:
      :class:`~st_jax.SearchResult` (``path``: 0 flat, 1 IVF, 2 starved IVF answered by the
      flat scan, 3 starved IVF answered by a widened probe, as ``search``), replicated.
    Raises:
      ValueError: as ``search``.
    """
    ivf = sidx if sidx.centroids is not None else None
    nprobe = check_options(backend, k, ivf, nprobe, sidx.cache, rerank)
    max_nprobe = check_max_nprobe(ivf, nprobe, max_nprobe)
    q = check_queries(queries, sidx.dim)
    b = q.shape[0]
    mask = _allow_words(sidx, allow, b)
    prog = filter_program(sidx.schema, filter, b)
    if b == 0:                  # no queries: empty results
        return empty_result(sidx.row_ids, int(k))
    q = jnp.pad(q, ((0, 0), (0, sidx.codes.shape[1] - sidx.dim)))
    scores, ids, _, path, _ = _compiled.call(
        _sharded_core, sidx, q, mask, prog, None, k=int(k), nprobe=int(nprobe),
        rerank=int(rerank or 0),
        min_eligible_factor=check_min_eligible_factor(min_eligible_factor), backend=backend,
        max_nprobe=max_nprobe)
    return SearchResult(ids=ids, scores=scores, count=jnp.sum(ids >= 0, axis=1, dtype=jnp.int32),
                        path=path)
