"""The served retrieval graph: one pure function, jitted once per (batch bucket, k, k0).

    user features ─ user tower (all task heads) ─┐
    filter program ─ Bloom/exact filter ─────────┼─ per-task IVF probe + Int8 top-k0
    excluded rows ─ eligibility words ───────────┘   (one index copy, T x B queries)
        ─ task merge (union | intersection) ─ OverArch on the candidates (embedding cache)
        ─ Value Model ─ final top-k (ids, value scores, per-task predictions)

:func:`retrieval_graph` takes ``(weights, inputs)`` as flat ``{name: array}`` dicts, so the
same function is jitted in process and serialised with ``jax.export`` (dict pytrees need no
custom serialisation); the model and index structure are static (:class:`GraphSpec`).

Sharded serving (``serving.Retriever.load(..., mesh=)``): the main index is a
:class:`~st_jax.ShardedIndex` (items split over the mesh's item axis). The user tower, the
filter programs, the fresh index, the OverArch and the Value Model stay replicated; stage 2
runs per shard inside ``shard_map`` (``st_jax._shard._sharded_core``: each shard filters and
scores its rows -- flat scan, or IVF probe with the starvation test counted over all
shards -- with each user's excluded rows mapped to the shard's rows) and returns its top-k0
per task query with their ids and cache rows; one global ``top_k`` merges the shards. Stage
3 reads the candidates' embeddings from what the shards returned (never gathering a sharded
cache), so results equal the unsharded graph.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pallas_kernels._select import top_k
from pallas_kernels.int8_topk import NEG_INF
from st_jax._filter_index import filter_mask
from st_jax._filter_lang import FilterProgram
from st_jax._search import _search_core, exclusion_words
from st_jax._shard import ShardedIndex, _sharded_core

MERGES = ("union", "intersection")
RANKS = ("overarch", "retrieval")


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Static structure of a retrieval graph (hashable; part of the jit cache key).

    Attributes:
      user_graph / overarch_graph: NNX graph definitions (overarch None: no OverArch).
      params_treedef / params_keys: rebuild the model parameter pytree from ``model/<key>``.
      index_treedef / index_keys: rebuild the :class:`~st_jax.Index` (or, sharded, the
        :class:`~st_jax.ShardedIndex`) from ``index/<key>``.
      user_fields: user feature names (inputs ``user/<name>``).
      value_fn: Value Model, ``f32[..., T] -> f32[...]``.
      num_tasks: T; primary_task: the task ranking by retrieval score uses.
      num_hashes / stack_depth: filter program statics (from the index's filter schema).
      nprobe: IVF clusters probed per task query (0: flat index).
      min_eligible_factor: IVF starvation threshold (see ``st_jax.search``).
      max_nprobe: widest probe a starved IVF task query may take (see ``st_jax.search``).
      merge: "union" | "intersection" of the per-task candidate sets.
      rank: "overarch" (OverArch + Value Model) | "retrieval" (exact primary-task dot product).
      backend: kernel backend ("auto": Pallas on GPU; on CPU the native kernels where they
        build, the XLA twins in exports; see ``st_jax.search``).
      fresh_treedef / fresh_keys: rebuild the fresh store (an ``Index`` over the fresh slots,
        see ``st_jax.fresh``) from ``fresh/<key>``; None: no fresh index.
    """

    user_graph: Any
    overarch_graph: Any
    params_treedef: Any
    params_keys: tuple[str, ...]
    index_treedef: Any
    index_keys: tuple[str, ...]
    user_fields: tuple[str, ...]
    value_fn: Callable
    num_tasks: int
    primary_task: int
    num_hashes: int
    stack_depth: int
    nprobe: int
    min_eligible_factor: float
    merge: str
    rank: str
    backend: str
    fresh_treedef: Any = None
    fresh_keys: tuple[str, ...] = ()
    max_nprobe: int = 0


def _tree(treedef, keys, flat: dict, prefix: str):
    return jax.tree_util.tree_unflatten(treedef, [flat[prefix + k] for k in keys])


class Candidates(NamedTuple):
    """Merged candidates of each user (stage 2 -> stage 3).

    rows: ``i32[B, C]`` main storage rows, fresh slot ``s`` as ``main.num_rows + s``, -1
      empty (sorted, each once); ids: ``[B, C]`` their item ids; emb: ``f32[B, C, D]``
      their float embeddings (cache rows; garbage where ``rows < 0``).
    """

    rows: jax.Array
    ids: jax.Array
    emb: jax.Array


def merge_candidates(rows: jax.Array, num_tasks: int, merge: str, *,
                     with_order: bool = False):
    """``i32[B, T*k0]`` per-task candidate rows (-1 empty) -> ``i32[B, T*k0]`` merged set:
    each kept row once (sorted), dropped slots -1. ``intersection`` keeps rows every task
    retrieved (each task's list has distinct rows, so a row occurs T times).
    ``with_order``: also return ``order i32[B, T*k0]``, merged slot j <- input slot
    ``order[:, j]`` (to carry per-candidate data along)."""
    b = rows.shape[0]
    order = jnp.argsort(rows, axis=1)
    s = jnp.take_along_axis(rows, order, axis=1)
    first = jnp.concatenate([jnp.ones((b, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    keep = first & (s >= 0)
    if merge == "intersection" and num_tasks > 1:
        t = num_tasks - 1
        ahead = jnp.concatenate([s[:, t:], jnp.full((b, t), -2, s.dtype)], axis=1)
        keep &= ahead == s
    merged = jnp.where(keep, s, -1)
    return (merged, order) if with_order else merged


def user_stage(spec: GraphSpec, weights: dict, inputs: dict):
    """Stage 1 — ``(params, (index, store), u f32[T, B, D])``: the user tower, all task
    heads; ``store`` is the fresh store or None."""
    params = _tree(spec.params_treedef, spec.params_keys, weights, "model/")
    index = _tree(spec.index_treedef, spec.index_keys, weights, "index/")
    store = (None if spec.fresh_treedef is None
             else _tree(spec.fresh_treedef, spec.fresh_keys, weights, "fresh/"))
    user = {f: inputs[f"user/{f}"] for f in spec.user_fields}
    u = nnx.merge(spec.user_graph, params["user_tower"])(user).astype(jnp.float32)
    return params, (index, store), u


def _program(spec: GraphSpec, inputs: dict, prefix: str):
    if f"{prefix}/ops" not in inputs:
        return None
    return FilterProgram(ops=inputs[f"{prefix}/ops"], rowids=inputs[f"{prefix}/rowids"],
                         terms=inputs[f"{prefix}/terms"], lengths=inputs[f"{prefix}/lengths"],
                         per_query=True, num_hashes=spec.num_hashes,
                         stack_depth=spec.stack_depth)


def _fresh_topk(spec: GraphSpec, store, q, t: int, inputs: dict, k0: int):
    """Top-k0 of every task query over the fresh store: ``(f32[T*B, k0], slots i32[T*B, k0])``;
    the user's filter (compiled against the fresh vocabulary) and exclusions apply."""
    mask = None
    if "fexclude" in inputs:
        mask = exclusion_words(inputs["fexclude"], store.num_words)
    prog = _program(spec, inputs, "ffilter")
    if prog is not None:
        fm = filter_mask(store.filters, prog, backend=spec.backend)
        mask = fm if mask is None else mask & fm
    if mask is not None:
        mask = jnp.tile(mask, (t, 1))
    vals, slots, _ = _search_core(store, q, mask, None, k=k0, nprobe=0, rerank=0,
                                  min_eligible_factor=spec.min_eligible_factor,
                                  backend=spec.backend)
    return vals, slots


def _main_topk(spec: GraphSpec, index, q, t: int, inputs: dict, prog, k0: int):
    """Unsharded main index: ``(f32[T*B, k0], rows i32[T*B, k0], ids, path i32[T*B])``
    (embeddings are gathered once the candidates are merged)."""
    mask = None
    if "exclude" in inputs:
        mask = exclusion_words(inputs["exclude"], index.num_words)               # [B, W]
    if prog is not None:
        if index.ivf is None or not spec.nprobe:
            # flat scan: one mask per user, shared by that user's T task queries
            fm = filter_mask(index.filters, prog, backend=spec.backend)          # [B, W]
            mask = fm if mask is None else mask & fm
            prog = None
        # IVF: the filter runs on each task query's probed clusters only (and, should the
        # flat scan answer, once per user over the whole index: prog_tasks)
    if mask is not None:
        mask = jnp.tile(mask, (t, 1))                                            # [T*B, W]
    vals, rows, path = _search_core(index, q, mask, prog, k=k0, nprobe=spec.nprobe, rerank=0,
                                    min_eligible_factor=spec.min_eligible_factor,
                                    backend=spec.backend, max_nprobe=spec.max_nprobe,
                                    prog_tasks=t)
    safe = jnp.clip(rows, 0, index.num_rows - 1)
    pos = safe if index.perm is None else index.perm[safe]
    ids = pos if index.ids is None else index.ids[jnp.maximum(pos, 0)]
    return vals, rows, ids, path


def retrieve_stage(spec: GraphSpec, indexes, u, inputs: dict, k0: int):
    """Stage 2 — ``(Candidates [B, T*k0], path i32[B, T])``: per-task filtered Int8 top-k0
    from one index copy (T x B queries; main and fresh merged by score; a sharded main
    index: per shard, then merged), merged across tasks."""
    index, store = indexes
    t, b, d = u.shape
    sharded = isinstance(index, ShardedIndex)
    d_pad = (index.codes if sharded else index.items.codes).shape[1]
    q = jnp.pad(u.reshape(t * b, d), ((0, 0), (0, d_pad - d)))
    prog = _program(spec, inputs, "filter")
    if sharded:
        vals, ids, rows, path, emb = _sharded_core(
            index, q, None, prog, inputs.get("exclude"), k=k0, nprobe=spec.nprobe, rerank=0,
            min_eligible_factor=spec.min_eligible_factor, backend=spec.backend, tasks=t,
            with_cache=True, max_nprobe=spec.max_nprobe)
        emb = emb.astype(jnp.float32)
    else:
        vals, rows, ids, path = _main_topk(spec, index, q, t, inputs, prog, k0)
        emb = None                         # gathered from the merged rows below
    num_main = index.num_rows
    if store is not None:
        fv, fs = _fresh_topk(spec, store, q, t, inputs, k0)
        slot = jnp.clip(fs, 0, store.num_rows - 1)
        allv = jnp.concatenate([vals, fv], axis=1)
        allr = jnp.concatenate([rows, jnp.where(fs >= 0, fs + num_main, -1)], axis=1)
        alli = jnp.concatenate([ids, store.ids[slot].astype(ids.dtype)], axis=1)
        vals, pos = top_k(allv, k0)
        rows = jnp.where(vals > NEG_INF, jnp.take_along_axis(allr, pos, axis=1), -1)
        ids = jnp.take_along_axis(alli, pos, axis=1)
        if emb is not None:
            alle = jnp.concatenate([emb, store.cache[slot].astype(emb.dtype)], axis=1)
            emb = jnp.take_along_axis(alle, pos[..., None], axis=1)

    def per_user(x):                                 # [T*B, k0, ...] -> [B, T*k0, ...]
        x = x.reshape((t, b, k0) + x.shape[2:]).swapaxes(0, 1)
        return x.reshape((b, t * k0) + x.shape[3:])

    rows, order = merge_candidates(per_user(rows), t, spec.merge, with_order=True)
    ids = jnp.take_along_axis(per_user(ids), order, axis=1)
    if emb is not None:                              # sharded: embeddings came from the shards
        emb = jnp.take_along_axis(per_user(emb), order[..., None], axis=1)
    else:                  # one gather of the merged candidates (main rows, then fresh slots)
        emb = index.cache[jnp.clip(rows, 0, num_main - 1)]
        if store is not None:
            fresh = store.cache[jnp.clip(rows - num_main, 0, store.num_rows - 1)]
            emb = jnp.where((rows >= num_main)[..., None], fresh, emb)
    cand = Candidates(rows=rows, ids=ids, emb=emb.astype(jnp.float32))
    return cand, path.reshape(t, b).T


def rank_stage(spec: GraphSpec, params, u, cand: Candidates, path, k: int) -> dict:
    """Stage 3 — OverArch on the candidates' embeddings -> Value Model -> top-k; the
    output dict of :func:`retrieval_graph`."""
    live = cand.rows >= 0
    emb = cand.emb                                                               # [B, C, D]
    if spec.rank == "overarch" and spec.overarch_graph is not None:
        logits = nnx.merge(spec.overarch_graph, params["overarch"])(u, emb)      # [B, C, T]
        preds = jax.nn.sigmoid(logits.astype(jnp.float32))
        value = spec.value_fn(preds)
    else:
        preds = jnp.einsum("tbd,bcd->bct", u, emb)
        value = preds[..., spec.primary_task]
    value = jnp.where(live, value.astype(jnp.float32), NEG_INF)
    kk = min(k, cand.rows.shape[1])
    top, pos = lax.top_k(value, kk)
    ok = jnp.take_along_axis(live, pos, axis=1)
    task_scores = jnp.take_along_axis(preds, pos[..., None], axis=1)
    ids = jnp.where(ok, jnp.take_along_axis(cand.ids, pos, axis=1), -1)
    top = jnp.where(ok, top, NEG_INF)
    task_scores = jnp.where(ok[..., None], task_scores, jnp.nan)
    if kk < k:                                         # fewer candidates than k: pad
        pad = k - kk
        ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        top = jnp.pad(top, ((0, 0), (0, pad)), constant_values=NEG_INF)
        task_scores = jnp.pad(task_scores, ((0, 0), (0, pad), (0, 0)),
                              constant_values=jnp.nan)
    return {"ids": ids, "scores": top, "task_scores": task_scores,
            "count": jnp.sum(ok, axis=1, dtype=jnp.int32),
            "num_candidates": jnp.sum(live, axis=1, dtype=jnp.int32), "path": path}


def retrieval_graph(spec: GraphSpec, weights: dict, inputs: dict, *, k: int, k0: int) -> dict:
    """The whole retrieval graph (pure; jit / export it with ``k``, ``k0`` bound).

    Args:
      weights: ``model/<key>`` parameters and ``index/<key>`` index arrays.
      inputs: ``user/<field>`` features ``[B, ...]``; ``filter/ops i32[B, P]``,
        ``filter/rowids i32[B, P, KP]``, ``filter/terms i32[B, P]``, ``filter/lengths
        i32[B]`` (one compiled filter program per user; absent: no filter); optional
        ``exclude i32[B, E]`` storage rows never to return (-1 padding).
      k: final results per user; k0: candidates retrieved per task.
    Returns:
      ``ids [B, k]`` item ids (-1 padded), ``scores f32[B, k]`` Value Model scores (-inf
      padded), ``task_scores f32[B, k, T]`` (OverArch probabilities, or exact per-task dot
      products when ranking by retrieval; NaN padded), ``count i32[B]`` valid results,
      ``num_candidates i32[B]`` merged candidates, ``path i32[B, T]`` search path per task
      query (0 flat, 1 IVF, 2 starved IVF answered by the flat scan).
    """
    params, indexes, u = user_stage(spec, weights, inputs)
    cand, path = retrieve_stage(spec, indexes, u, inputs, k0)
    return rank_stage(spec, params, u, cand, path, k)
