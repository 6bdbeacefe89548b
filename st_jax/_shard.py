"""Sharded search: items partitioned across devices, one global top-k.

SilverTorch §5 shards the index and Bloom tensors by item partition; each shard returns
local candidates and one merge picks the global top-k. Here:

- :func:`shard_index` splits a *flat* :class:`~st_jax.Index` into ``S`` contiguous row
  ranges of ``n_local`` rows (a multiple of 1024, so no kernel copies), one per device of a
  1-D ``jax.sharding.Mesh`` axis: Int8 codes / scales, live words, row ids, float cache,
  the bit-sliced filter rows (split along their item words), and a per-shard copy of the
  filter verification lists (CSR re-based per shard, padded to the longest shard).
- :func:`sharded_search` runs, inside one ``jax.jit`` with ``shard_map``, the same core as
  :func:`~st_jax.search` on every shard (filter evaluation + exact verification, allow
  words, Int8 fused top-k) and merges the ``S`` candidate lists with one ``lax.top_k``.
  Every shard returns its exact local top-k, so the global top-k is exactly the top-k of
  their union: results equal the single-device index (ids and scores; ties aside). With
  ``rerank=R`` each shard returns its ``R*k`` best Int8 candidates with their exact
  float scores; the merge keeps the global ``R*k`` best by Int8 score, then the ``k`` best
  by exact score -- the single-device definition.
- The filter program is compiled once, host side, against the (global) schema and
  replicated: shards share the term dictionary and row layout.

Multi-host (several processes, each with its local devices): call
``jax.distributed.initialize(coordinator_address=..., num_processes=..., process_id=...)``
in every process before anything else touches JAX, build (or load) the same host-side
index in every process, and make the mesh over all global devices, e.g.
``Mesh(np.array(jax.devices()), ("items",))``. :func:`shard_index` creates its arrays with
``jax.make_array_from_callback``, so each process only transfers the row ranges of its own
devices. Call :func:`sharded_search` in every process with the same arguments (SPMD); the
merged result is replicated, read it on any process (``np.asarray`` of its
``addressable_data(0)``). Only a shard's row range is needed per device; a process that
cannot hold the whole host-side index can build its ranges itself and assemble the arrays
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

from pallas_kernels.int8_topk import NEG_INF, pack_mask, padded_rows
from st_jax._filter_index import FilterIndex
from st_jax._index import Index
from st_jax._search import _search_core, check_options, check_queries, filter_program
from st_jax._types import Int8Matrix, SearchResult, _static, pytree_dataclass

__all__ = ["ShardedIndex", "shard_index", "sharded_search"]


@pytree_dataclass
class ShardedIndex:
    """A flat index split by rows over the ``axis`` of ``mesh`` (``S`` devices).

    Attributes (global shapes; ``n_local`` rows and ``W_local = n_local / 32`` words per
    shard, ``S * n_local >= N``; shard ``s`` holds positions ``[s * n_local, (s+1) * n_local)``):
      codes: ``i8[S * n_local, Dp]``; scale: ``f32[S * n_local]``, sharded by rows.
      live: ``u32[S * W_local]`` live rows (padding 0).
      row_ids: ``i32/i64[S * n_local]`` id of each row (-1: padding).
      cache: ``bf16/f32[S * n_local, D]`` or None.
      filter_rows: ``u32[R, S * W_local]`` bit-sliced filter rows split along words, or None.
      filter_offsets: ``i32[S, n_local + 1]`` per-shard CSR offsets; filter_terms:
        ``i32[S, T + 1]`` per-shard Bloom term lists (sentinel padded).
      schema: static global ``FilterSchema`` (compiling filters); shard_schema: static, the
        same with ``n_pad = n_local`` (evaluating them on a shard).
      mesh, axis: static; num_items: N; dim: D; num_rows: rows of the source index.
    """

    codes: jax.Array
    scale: jax.Array
    live: jax.Array
    row_ids: jax.Array
    cache: Any = None
    filter_rows: Any = None
    filter_offsets: Any = None
    filter_terms: Any = None
    schema: Any = _static(default=None)
    shard_schema: Any = _static(default=None)
    mesh: Any = _static(default=None)
    axis: str = _static(default="items")
    num_items: int = _static(default=0)
    dim: int = _static(default=0)
    num_rows: int = _static(default=0)

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def shard_rows(self) -> int:
        return int(self.codes.shape[0]) // self.num_shards


def _put(arr: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
    """Global array from host data; each process only reads its devices' blocks."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def shard_index(index: Index, mesh: Mesh, axis: str | None = None) -> ShardedIndex:
    """Splits a flat index by rows over one mesh axis.

    Args:
      index: a flat :class:`~st_jax.Index` (``num_clusters=0``); tombstoned rows
        (``live`` bits cleared by ``st_jax._fresh.delete``) stay excluded.
      mesh: a ``jax.sharding.Mesh``; axis: the axis to shard items over (default: the
        mesh's only axis).
    Returns:
      :class:`ShardedIndex`.
    Raises:
      ValueError: an IVF index, or an unknown / missing axis.
    """
    if index.ivf is not None:
        raise ValueError("shard_index supports flat indexes; build the index with "
                         "num_clusters=0 (an IVF index would need cluster-aware partitions)")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"the mesh has axes {mesh.axis_names}: name the item axis "
                             "with axis=")
        axis = mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    s = int(mesh.shape[axis])
    n, n_rows = index.num_items, index.num_rows
    n_local = padded_rows(-(-n // s))
    total = s * n_local
    rows = np.arange(total)

    def pad_rows(x, value=0):
        x = np.asarray(x)
        return np.pad(x[:min(len(x), total)], [(0, total - min(len(x), total))] +
                      [(0, 0)] * (x.ndim - 1), constant_values=value)

    live = np.asarray(index.live) if index.live is not None else np.asarray(
        pack_mask(jnp.arange(n_rows) < n))
    live = np.pad(live, (0, total // 32 - live.size))
    ids = np.arange(n) if index.ids is None else np.asarray(index.ids)
    row_ids = np.full(total, -1, ids.dtype)
    row_ids[:n] = ids                                   # flat: row r holds position r
    out = dict(codes=_put(pad_rows(index.items.codes), mesh, P(axis, None)),
               scale=_put(pad_rows(index.items.scale), mesh, P(axis)),
               live=_put(live, mesh, P(axis)), row_ids=_put(row_ids, mesh, P(axis)))
    if index.cache is not None:
        out["cache"] = _put(pad_rows(index.cache), mesh, P(axis, None))
    schema = shard_schema = None
    if index.filters is not None:
        fi = index.filters
        schema = fi.schema
        frows = np.asarray(fi.rows)
        frows = np.pad(frows, ((0, 0), (0, total // 32 - frows.shape[1])))
        offs = np.asarray(fi.item_offsets).astype(np.int64)
        offs = np.concatenate([offs, np.full(total + 1 - offs.size, offs[-1])])
        terms = np.asarray(fi.item_terms)
        starts = offs[rows[::n_local]]
        ends = offs[rows[::n_local] + n_local]
        tmax = int((ends - starts).max()) + 1
        local_offs = np.stack([offs[i * n_local:(i + 1) * n_local + 1] - starts[i]
                               for i in range(s)]).astype(np.int32)
        local_terms = np.full((s, tmax), -2, np.int32)
        for i in range(s):                                  # one copy per shard
            local_terms[i, :ends[i] - starts[i]] = terms[starts[i]:ends[i]]
        out["filter_rows"] = _put(frows, mesh, P(None, axis))
        out["filter_offsets"] = _put(local_offs, mesh, P(axis, None))
        out["filter_terms"] = _put(local_terms, mesh, P(axis, None))
        shard_schema = dataclasses.replace(
            schema, n_pad=n_local, num_items=n_local,
            fingerprint=f"{schema.fingerprint}/shard{s}x{n_local}")
    del rows
    return ShardedIndex(**out, schema=schema, shard_schema=shard_schema, mesh=mesh, axis=axis,
                        num_items=n, dim=index.dim, num_rows=n_rows)


def _allow_words(sidx: ShardedIndex, allow, batch: int):
    """``allow`` -> ``u32[S * W_local]`` / ``u32[B, S * W_local]`` (or None)."""
    if allow is None:
        return None
    a = jnp.asarray(allow)
    n, total = sidx.num_items, sidx.codes.shape[0]
    if a.dtype == jnp.bool_:
        if a.shape not in ((n,), (batch, n)):
            raise ValueError(f"allow must be bool[{n}] or bool[{batch}, {n}]; got shape {a.shape}")
        return pack_mask(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, total - n)]))
    if a.dtype == jnp.uint32:
        w = sidx.num_rows // 32
        if a.shape not in ((w,), (batch, w)):
            raise ValueError(f"packed allow must be u32[{w}] or u32[{batch}, {w}] (words over "
                             f"the source index's rows); got {a.shape}")
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, total // 32 - w)])
    raise ValueError(f"allow must be a bool mask or packed uint32 words; got dtype {a.dtype}")


@functools.partial(jax.jit, static_argnames=("k", "rerank", "backend"))
def _sharded_core(sidx: ShardedIndex, q, mask, prog, *, k: int, rerank: int, backend: str):
    """``(scores f32[B, k], ids [B, k])``: per-shard top-``R*k``, then one global merge."""
    ax, s, n_local = sidx.axis, sidx.num_shards, sidx.shard_rows
    kk = k * max(rerank, 1)
    b = q.shape[0]
    args = dict(codes=sidx.codes, scale=sidx.scale, live=sidx.live, row_ids=sidx.row_ids,
                cache=sidx.cache, frows=sidx.filter_rows, foffs=sidx.filter_offsets,
                fterms=sidx.filter_terms, mask=mask)
    specs = dict(codes=P(ax, None), scale=P(ax), live=P(ax), row_ids=P(ax), cache=P(ax, None),
                 frows=P(None, ax), foffs=P(ax, None), fterms=P(ax, None),
                 mask=None if mask is None else (P(ax) if mask.ndim == 1 else P(None, ax)))
    present = [name for name, v in args.items() if v is not None]

    def local(q, prog, *arrays):
        a = dict(zip(present, arrays))
        filters = None
        if "frows" in a:
            filters = FilterIndex(rows=a["frows"], item_offsets=a["foffs"][0],
                                  item_terms=a["fterms"][0], schema=sidx.shard_schema)
        idx = Index(items=Int8Matrix(codes=a["codes"], scale=a["scale"]), live=a["live"],
                    cache=a.get("cache"), filters=filters, num_items=n_local, dim=sidx.dim)
        vals, rows, _ = _search_core(idx, q, a.get("mask"), prog, k=kk, nprobe=0, rerank=0,
                                     min_eligible_factor=0.0, backend=backend)
        ok = rows >= 0
        ids = jnp.where(ok, a["row_ids"][jnp.maximum(rows, 0)], -1)
        if rerank:
            x = a["cache"][jnp.maximum(rows, 0)].astype(jnp.float32)
            exact = jnp.einsum("bkd,bd->bk", x, q[:, :sidx.dim].astype(jnp.float32))
            exact = jnp.where(ok, exact, NEG_INF)
        else:
            exact = vals
        return vals[None], ids[None], exact[None]

    in_specs = (P(), P()) + tuple(specs[name] for name in present)
    vals, ids, exact = jax.shard_map(local, mesh=sidx.mesh, in_specs=in_specs,
                                     out_specs=(P(ax), P(ax), P(ax)), check_vma=False)(
        q, prog, *(args[name] for name in present))

    def flat(x):                                     # [S, B, kk] -> [B, S * kk], shard-major
        return jnp.transpose(x, (1, 0, 2)).reshape(b, s * kk)

    vals, ids, exact = flat(vals), flat(ids), flat(exact)
    top, pos = lax.top_k(vals, kk)                   # the global R*k best Int8 candidates
    ids = jnp.take_along_axis(ids, pos, axis=1)
    if rerank:
        ex = jnp.where(top > NEG_INF, jnp.take_along_axis(exact, pos, axis=1), NEG_INF)
        top, p2 = lax.top_k(ex, k)
        ids = jnp.take_along_axis(ids, p2, axis=1)
    rep = NamedSharding(sidx.mesh, P())                # the merged result: replicated
    return (lax.with_sharding_constraint(top, rep),
            lax.with_sharding_constraint(jnp.where(top > NEG_INF, ids, -1), rep))


def sharded_search(sidx: ShardedIndex, queries, k: int, allow=None, *, filter=None,
                   rerank: int | None = None, backend: str = "auto") -> SearchResult:
    """:func:`~st_jax.search` over a :class:`ShardedIndex` (same arguments and results).

    Args:
      queries: ``f32[B, D]`` / ``bf16[B, D]`` (replicated to every shard).
      k: ``1 <= k <= 65536``.
      allow: None, ``bool[N]`` / ``bool[B, N]`` by item position, or packed ``u32`` words over
        the source index's rows (``u32[num_rows / 32]`` / ``u32[B, num_rows / 32]``).
      filter: as for ``search`` (str, ``F`` expression or a list of B), exact.
      rerank: R re-scores each query's ``R * k`` best Int8 candidates with the float cache.
      backend: as for ``search``.
    Returns:
      :class:`~st_jax.SearchResult` (``path`` all 0: flat scan), replicated.
    """
    check_options(backend, k, None, None, sidx.cache, rerank)
    q = check_queries(queries, sidx.dim)
    b = q.shape[0]
    mask = _allow_words(sidx, allow, b)
    prog = filter_program(sidx.schema, filter, b)
    q = jnp.pad(q, ((0, 0), (0, sidx.codes.shape[1] - sidx.dim)))
    scores, ids = _sharded_core(sidx, q, mask, prog, k=int(k), rerank=int(rerank or 0),
                                backend=backend)
    return SearchResult(ids=ids, scores=scores, count=jnp.sum(ids >= 0, axis=1, dtype=jnp.int32),
                        path=jnp.zeros((b,), jnp.int32))
