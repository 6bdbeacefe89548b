"""``search``: filtered Int8 top-k over an :class:`Index` (flat or IVF), one jitted core."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._select import popcount_rows, top_k
from pallas_kernels.flat_scan import flat_topk
from pallas_kernels.int8_topk import BACKENDS, MAX_K, NEG_INF, pack_mask
from st_jax._filter_index import compile_filter, filter_mask
from st_jax._filter_lang import matches_everything
from st_jax import _compiled
from st_jax._index import Index
from pallas_kernels.ivf_scan import ivf_topk
from st_jax._ivf import partial_mask, probe_list, probed_blocks
from st_jax._types import SearchResult

PATH_FLAT, PATH_IVF, PATH_FALLBACK, PATH_WIDENED = 0, 1, 2, 3

def allow_array(allow, name: str = "allow"):
    """``allow`` (None, an array or a nested list) as a jax or numpy array of checked dtype:
    bool or uint32. Checked before any conversion to a jax array, which would narrow 64-bit
    words to 32 bits and drop half of the items they hold.

    Raises:
      ValueError: another dtype.
    """
    if allow is None:
        return None
    if not isinstance(allow, jax.Array):
        allow = np.asarray(allow)
    if allow.dtype not in (np.dtype(bool), np.dtype(np.uint32)):
        raise ValueError(f"{name} must be a bool mask or packed uint32 words; got dtype "
                         f"{allow.dtype} (a 0/1 mask: .astype(bool); packed words: 32 items "
                         "per uint32 word)")
    return allow


def eligibility_words(index: Index, allow, batch: int) -> jax.Array | None:
    """Normalises ``allow`` to eligibility words over the index's rows.

    Args:
      allow: None, ``bool[N]`` / ``bool[B, N]`` by item position, or packed ``u32[W]`` /
        ``u32[B, W]`` words over the index rows (``W = index.num_words``; rows = positions
        for a flat index).
    Returns:
      None (everything eligible) or ``u32[W]`` / ``u32[B, W]``; bits of padded rows are 0.
    """
    if allow is None:
        return None
    a = jnp.asarray(allow_array(allow))
    n, w = index.num_items, index.num_words
    if a.dtype == jnp.bool_:
        if a.shape not in ((n,), (batch, n)):
            raise ValueError(f"allow must be bool[{n}] or bool[{batch}, {n}]; got shape {a.shape}")
        if index.perm is not None:
            a = jnp.where(index.perm >= 0, a[..., jnp.maximum(index.perm, 0)], False)
        else:
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, index.num_rows - n)])
        return pack_mask(a)
    # packed uint32 words (allow_array refused any other dtype)
    if a.shape not in ((w,), (batch, w)):
        raise ValueError(f"packed allow must be u32[{w}] or u32[{batch}, {w}]; got {a.shape}")
    return a


# words of the index on which a filter program's pass rate is estimated for the widening
# test (8192 items: about +-3.5 % relative at a 10 % pass rate)
_RATE_SAMPLE_WORDS = 256


def _popcount_rows(words, batch):
    """``u32[W]`` or ``u32[B, W]`` -> ``i32[batch]`` set bits (a shared row broadcast)."""
    return jnp.broadcast_to(popcount_rows(words), (batch,))


def exclusion_words(rows: jax.Array, num_words: int) -> jax.Array:
    """``i32[B, E]`` storage rows to exclude (-1 padding, duplicates allowed) ->
    ``u32[B, W]`` eligibility words with those rows' bits cleared."""
    b = rows.shape[0]
    s = jnp.sort(rows, axis=1)
    dup = jnp.concatenate([jnp.zeros((b, 1), bool), s[:, 1:] == s[:, :-1]], axis=1)
    s = jnp.where(dup | (s < 0), num_words * 32, s)            # out of range: dropped
    bits = jnp.left_shift(jnp.uint32(1), (s % 32).astype(jnp.uint32))
    cleared = jnp.zeros((b, num_words), jnp.uint32).at[
        jnp.arange(b)[:, None], s // 32].add(bits, mode="drop")
    return ~cleared


def float_scores(cache: jax.Array, rows: jax.Array, qf: jax.Array) -> jax.Array:
    """Float inner products ``f32[B, K]`` of queries ``qf f32[B, D]`` with the cached
    embeddings (``bf16/f32[n_rows, D]``) of candidate rows ``i32[B, K]`` (-1 rows read
    row 0; callers mask them). The re-rank stage of every search entry point.

    On CPU with many candidates, a per-query fused gather + product + row sum (measured
    ~3x XLA:CPU's batched matrix-vector einsum at K = 2048; at K = 400 inside the search,
    3.5x slower than the einsum); the einsum elsewhere.
    """
    safe = jnp.maximum(rows, 0)

    def einsum(safe, qf):
        return jnp.einsum("bkd,bd->bk", cache[safe].astype(jnp.float32), qf)

    if rows.shape[1] < 512:
        return einsum(safe, qf)

    def per_query(safe, qf):
        return lax.map(lambda a: jnp.sum(cache[a[0]].astype(jnp.float32) * a[1], axis=-1),
                       (safe, qf))

    return lax.platform_dependent(safe, qf, cpu=per_query, default=einsum)


def _int8_candidates(index: Index, q, mask, prog, *, k: int, kk: int, nprobe: int,
                     min_eligible_factor: float, backend: str, max_nprobe: int = 0,
                     axis_name: str | None = None, prog_tasks: int = 1):
    """The Int8 stage of :func:`_search_core`: ``(scores f32[B, kk], rows i32[B, kk],
    path i32[B])`` in storage rows; ``k`` (the final k) sets the IVF starvation threshold.

    IVF: each query probes its ``nprobe`` best clusters. A starved query (its probe holds
    fewer than ``need = min(min_eligible_factor * k, eligible in the index)`` eligible items,
    and fewer than half its probed rows are eligible) widens its probe cluster by cluster, in
    centroid order, to the fewest clusters holding ``need`` eligible items -- at most
    ``max_nprobe`` (``path`` 3) -- and only past that is it answered by the flat filtered scan
    (``path`` 2). The widened probe is still probe-then-filter: the filter runs on the words
    of the ``max_nprobe`` best clusters' blocks only. ``max_nprobe <= nprobe``: no widening.

    ``axis_name``: inside ``shard_map`` over items (``index`` is one shard), the mesh axis:
    the starvation test and the widening count the eligible items of every shard
    (``lax.psum``; the centroids are replicated, so cluster ranks agree), so each shard
    takes the path the whole index would take.

    ``prog_tasks``: a per-query ``prog`` holds the programs of ``B / prog_tasks`` queries,
    query ``i`` taking program ``i % (B / prog_tasks)`` (the served graph's task queries
    share their user's filter), so the flat scan's whole-index filter evaluation runs once
    per program, not once per query.
    """
    b = q.shape[0]
    repeat = prog_tasks if prog is not None and prog.per_query else 1

    def per_query(x):                  # a per-program row (or program) -> one per query
        return x if repeat == 1 else jnp.tile(x, (repeat,) + (1,) * (x.ndim - 1))

    qprog = None if prog is None else jax.tree_util.tree_map(per_query, prog)
    codes, scale = index.items.codes, index.items.scale
    if index.live is not None:
        mask = index.live if mask is None else mask & index.live
    num_valid = index.num_items if index.perm is None else index.num_rows

    def full_mask():
        if prog is None:
            return mask
        f = per_query(filter_mask(index.filters, prog, backend=backend))
        return f if mask is None else f & mask

    def flat():
        return flat_topk(q, codes, scale, full_mask(), k=kk, num_valid=num_valid,
                         backend=backend)

    if index.ivf is None or not nprobe:
        vals, rows = flat()
        return vals, rows, jnp.full((b,), PATH_FLAT, jnp.int32)

    ivf = index.ivf
    wpb = ivf.block // 32
    qd = q[:, :index.dim]
    if mask is None:
        mask = jnp.full((index.num_words,), 0xFFFFFFFF, jnp.uint32)

    def probed_words(blocks, valid):
        """``u32[B, P, wpb]`` eligibility of the probed blocks: the filter runs on them only."""
        pm = partial_mask(mask, blocks, valid, ivf.block)
        if prog is not None:
            wids = (blocks[:, :, None] * wpb + jnp.arange(wpb)).reshape(b, -1)
            fw = filter_mask(index.filters, qprog, word_ids=jnp.where(
                jnp.repeat(valid, wpb, axis=1), wids, -1), backend=backend)
            pm = pm & fw.reshape(pm.shape)
        return pm

    def psum(x):
        return x if axis_name is None else lax.psum(x, axis_name)

    def none():
        return jnp.full((b, kk), NEG_INF, jnp.float32), jnp.full((b, kk), -1, jnp.int32)

    def probe_scan(blocks, pm, flat_q):
        """Probe scan of ``blocks`` (``pm`` their words) for the queries not in ``flat_q``
        (bool[B]: their blocks are masked out, never read); runs only if one such query
        exists."""
        return lax.cond(jnp.all(flat_q), none, lambda: ivf_topk(
            q, codes, scale, blocks, jnp.where(flat_q[:, None, None], jnp.uint32(0), pm),
            k=kk, block=ivf.block, backend=backend))

    def with_flat(pv, pr, flat_q):
        """The flat scan's answer for the queries in ``flat_q``, the probe's for the others.
        The search's one flat-scan instance (the probe lists' conditionals only choose
        ``flat_q``), run only if some query needs it."""
        fv, fr = lax.cond(jnp.any(flat_q), flat, none)
        return jnp.where(flat_q[:, None], fv, pv), jnp.where(flat_q[:, None], fr, pr)

    blocks, valid = probed_blocks(ivf, qd, nprobe)
    pm = probed_words(blocks, valid)
    in_probe = psum(jnp.sum(lax.population_count(pm).astype(jnp.int32), axis=(1, 2)))
    probed = psum(jnp.sum(valid, axis=1, dtype=jnp.int32) * ivf.block)   # holes included
    total = psum(_popcount_rows(mask, b))
    need = jnp.minimum(jnp.int32(min(int(np.ceil(min_eligible_factor * k)), 2**31 - 1)), total)
    # a probe at least half eligible is not starved: the filter then at most doubles
    # the depth the probe must cover, and the probe's width is what nprobe chose
    starved = (in_probe < need) & (2 * in_probe < probed)
    wide = min(int(max_nprobe), ivf.num_clusters)
    if wide <= nprobe:
        vals, rows = with_flat(*probe_scan(blocks, pm, starved), starved)
        return vals, rows, jnp.where(starved, PATH_FALLBACK, PATH_IVF).astype(jnp.int32)

    # Widening assumes the filter passes the clusters past the probe at about the rate it
    # passes the probe. A probe passed at under half the index's rate (a filter correlated
    # with the clusters, its eligible items elsewhere) goes to the exact flat scan: growing
    # the probe to `need` eligible items would then cover too few of the clusters holding
    # them. And when even `wide` clusters at the probe's rate cannot hold `need` items,
    # the wide probe is not tried either (speed only: the test after widening is exact).
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)    # products overflow int32
    rows_all = psum(jnp.int32(num_valid))
    # The index's eligible count: the allow mask's, and with a filter program its estimate
    # from a fixed sample of words (the filter itself runs on the probed words only).
    # (only when a query is starved: `starved` agrees across shards, the psum is outside)
    eligible_all = f32(total)
    if prog is not None:
        stride = max(1, index.num_words // _RATE_SAMPLE_WORDS)
        sample = jnp.arange(0, index.num_words, stride, dtype=jnp.int32)

        def sampled():                                          # i32[B] eligible in sample
            hits = per_query(filter_mask(index.filters, prog, word_ids=sample,
                                         backend=backend)) & mask[..., sample]
            counts = jnp.sum(lax.population_count(hits).astype(jnp.int32), axis=-1)
            return jnp.broadcast_to(counts, (b,))

        counts = lax.cond(jnp.any(starved), sampled, lambda: jnp.zeros((b,), jnp.int32))
        eligible_all = psum(f32(counts) * (index.num_words / sample.shape[0]))
    widenable = (starved & (2 * f32(in_probe) * f32(rows_all) >= eligible_all * f32(probed))
                 & (f32(in_probe) * f32(psum(jnp.int32(ivf.probe_caps[wide - 1] * ivf.block)))
                    >= f32(need) * f32(probed)))

    def base():                        # starved queries (if any) take the flat scan
        pv, pr = probe_scan(blocks, pm, starved)
        return pv, pr, starved, jnp.where(starved, PATH_FALLBACK, PATH_IVF).astype(jnp.int32)

    def widened():
        wblocks, rank, ends = probe_list(ivf, qd, wide)
        wpm = probed_words(wblocks, rank < wide)
        per_block = jnp.sum(lax.population_count(wpm).astype(jnp.int32), axis=2)
        cum = jnp.cumsum(per_block, axis=1)                                  # [B, Pw]
        # eligible items in the best j + 1 clusters, for j < wide
        upto = psum(jnp.where(ends > 0, jnp.take_along_axis(
            cum, jnp.maximum(ends - 1, 0), axis=1), 0))                       # [B, wide]
        reach = 1 + jnp.sum(upto < need[:, None], axis=1, dtype=jnp.int32)  # clusters needed
        # the flat scan, once it runs for one query, answers every starved query exactly
        grown = starved & jnp.all(~starved | (reach <= wide))
        flat_q = starved & ~grown
        n_q = jnp.where(grown, reach, nprobe)
        wpm = jnp.where((rank < n_q[:, None])[:, :, None], wpm, jnp.uint32(0))
        pv, pr = probe_scan(wblocks, wpm, flat_q)
        path = jnp.where(flat_q, PATH_FALLBACK, jnp.where(grown, PATH_WIDENED, PATH_IVF))
        return pv, pr, flat_q, path.astype(jnp.int32)

    # widen only when every starved query may: one flat query runs the flat scan for all
    pv, pr, flat_q, path = lax.cond(jnp.any(starved) & jnp.all(widenable | ~starved),
                                    widened, base)
    vals, rows = with_flat(pv, pr, flat_q)
    return vals, rows, path


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "rerank", "min_eligible_factor",
                                             "backend", "max_nprobe", "prog_tasks"))
def _search_core(index: Index, q, mask, prog, *, k: int, nprobe: int, rerank: int,
                 min_eligible_factor: float, backend: str, max_nprobe: int = 0,
                 prog_tasks: int = 1):
    """Returns ``(scores f32[B, k], rows i32[B, k], path i32[B])`` in storage rows.

    ``mask``: allow words (or None); ``prog``: compiled filter program (or None; per query:
    ``prog_tasks`` as in :func:`_int8_candidates`).
    """
    vals, rows, path = _int8_candidates(index, q, mask, prog, k=k, kk=k * max(rerank, 1),
                                        nprobe=nprobe, min_eligible_factor=min_eligible_factor,
                                        backend=backend, max_nprobe=max_nprobe,
                                        prog_tasks=prog_tasks)
    if rerank:
        exact = float_scores(index.cache, rows, q[:, :index.dim].astype(jnp.float32))
        exact = jnp.where(rows >= 0, exact, NEG_INF)
        vals, pos = top_k(exact, k)
        rows = jnp.where(vals > NEG_INF, jnp.take_along_axis(rows, pos, axis=1), -1)
    return vals, rows, path


def check_options(backend: str, k, ivf, nprobe, cache, rerank) -> int:
    """Validates search options (shared by every search entry point); returns ``nprobe``
    (0 for a flat index, the default ``min(32, C)`` when None)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}]; got {k!r}")
    if ivf is None:
        if nprobe is not None:
            raise ValueError("nprobe needs an IVF index: build_index(..., num_clusters=C)")
        nprobe = 0
    else:
        c = ivf.num_clusters
        nprobe = min(32, c) if nprobe is None else nprobe
        if (isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer))
                or not 1 <= nprobe <= c):
            raise ValueError(f"nprobe must be an int in [1, {c}] (the number of clusters); "
                             f"got {nprobe!r}")
    if rerank is not None:
        if cache is None:
            raise ValueError("rerank needs float embeddings in the index: "
                             "build_index(..., store_embeddings='bf16')")
        if (isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer))
                or not 1 <= rerank or rerank * k > MAX_K):
            raise ValueError(f"rerank must be an int >= 1 with rerank * k <= {MAX_K}; "
                             f"got {rerank!r}")
    return int(nprobe)


def empty_result(ids, k: int) -> SearchResult:
    """The :class:`SearchResult` of an empty batch (``[0, k]``; ``ids`` the index's id
    array or None, for the ids' dtype)."""
    return SearchResult(ids=jnp.zeros((0, k), jnp.int32 if ids is None else ids.dtype),
                        scores=jnp.zeros((0, k), jnp.float32),
                        count=jnp.zeros((0,), jnp.int32), path=jnp.zeros((0,), jnp.int32))


def check_min_eligible_factor(factor) -> float:
    """Validates ``min_eligible_factor`` (shared by the search entry points): a finite real
    ``>= 0``; returns it as a float."""
    if (isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating))
            or not np.isfinite(factor) or factor < 0):
        raise ValueError(f"min_eligible_factor must be a finite number >= 0 (0: a query is "
                         f"never starved); got {factor!r}")
    return float(factor)


WIDEN_FACTOR = 4


def check_max_nprobe(ivf, nprobe: int, max_nprobe) -> int:
    """Validates ``max_nprobe`` (shared by the search entry points): the widest probe a
    starved IVF query may take before the flat fallback. Returns it as an int (0 for a flat
    index). The default, ``min(WIDEN_FACTOR * nprobe, C / 8)`` (at least ``nprobe``): past
    an eighth of the index the flat filtered scan, which gathers the eligible items first,
    was faster on our benchmarks (1M items, 1 % filter: a 160-cluster probe ~15 ms, the flat
    scan ~9 ms)."""
    if ivf is None:
        if max_nprobe is not None:
            raise ValueError("max_nprobe needs an IVF index: build_index(..., num_clusters=C)")
        return 0
    c = ivf.num_clusters
    if max_nprobe is None:
        return max(nprobe, min(WIDEN_FACTOR * nprobe, c // 8))
    if (isinstance(max_nprobe, bool) or not isinstance(max_nprobe, (int, np.integer))
            or not nprobe <= max_nprobe <= c):
        raise ValueError(f"max_nprobe must be an int in [nprobe, C] = [{nprobe}, {c}] "
                         f"(nprobe: no widening); got {max_nprobe!r}")
    return int(max_nprobe)


def filter_program(filters, filter, batch: int):
    """Compiles ``filter`` for a batch against a ``FilterIndex`` / ``FilterSchema`` (None when
    the filter matches everything); errors when the index has no attributes."""
    if matches_everything(filter):
        return None
    if filters is None:
        raise ValueError("filter needs an index built with attributes: "
                         "build_index(..., attributes={field: values})")
    prog = compile_filter(filters, filter, batch_size=batch)
    if prog.per_query and prog.ops.shape[0] != batch:
        raise ValueError(f"got {prog.ops.shape[0]} filters for {batch} queries")
    return prog


def check_queries(queries, dim: int):
    """``f32/bf16[B, dim]`` queries; ValueError naming NaN/Inf rows.

    A jax array (or tracer) is returned as it is; anything else as a numpy array (float64
    narrowed to float32, as ``jnp.asarray`` would), validated on the host and handed to the
    jitted search as it is: ~0.5 ms less per call than building a device array first."""
    if isinstance(queries, (jax.Array, jax.core.Tracer)):
        q = queries
    else:
        q = np.asarray(queries)
        if q.dtype == np.float64:
            q = q.astype(np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        hint = " (use queries[None, :] for one query)" if q.ndim == 1 else ""
        raise ValueError(f"queries must be [B, {dim}]; got shape {q.shape}{hint}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"queries must be f32 or bf16; got dtype {q.dtype}")
    if not isinstance(q, jax.core.Tracer):
        bad = np.flatnonzero(~np.isfinite(np.asarray(q, np.float32)).all(axis=1))
        if bad.size:
            raise ValueError(f"queries have NaN or Inf values in rows {bad[:10].tolist()}")
    return q


def search(index: Index, queries, k: int, allow=None, *, filter=None,
           nprobe: int | None = None,
           rerank: int | None = None, min_eligible_factor: float = 16.0,
           max_nprobe: int | None = None, backend: str = "auto") -> SearchResult:
    """Top-k items by Int8 inner product among the eligible ones.

    Args:
      index: an :class:`Index` from :func:`build_index`.
      queries: ``f32[B, D]`` or ``bf16[B, D]`` (quantised per row inside).
      k: results per query, ``1 <= k <= 65536``; ``k > N`` returns every eligible item.
      allow: eligibility — None (all), ``bool[N]`` shared by the batch, ``bool[B, N]`` per
        query (by item position), or packed words over the index rows (``u32[W]`` /
        ``u32[B, W]``, ``W = index.num_words``).
      filter: an attribute filter — a string in the filter language (see the README), an
        ``st.F`` expression, or a list / tuple / 1-D numpy array of B of them (one per
        query); combined with ``allow``.
        Exact: no false positives or negatives, NOT included. Needs ``build_index(...,
        attributes=...)``. Compiled outside jit to fixed-size arrays: a new filter does not
        recompile.
      nprobe: IVF clusters probed per query (IVF indexes; default ``min(32, C)``).
      rerank: R >= 1 re-scores the best ``R * k`` Int8 candidates with the float embeddings
        kept by ``build_index(..., store_embeddings=...)``; scores are then exact.
      min_eligible_factor: an IVF query whose probed clusters hold fewer than
        ``need = min_eligible_factor * k`` eligible items (and fewer than the whole index
        holds under ``allow``; an attribute filter is not evaluated over the whole index, so
        a probe holding all of a rare filter's items can still be starved and be answered by
        the exact flat scan: the same results), and of which fewer than half are eligible,
        is *starved*. With pass rate p the filtered top-k sit among the unfiltered top
        ``k / p``, which the probe covers only when it holds well over ``k`` eligible items;
        16 keeps recall >= 0.95 on our benchmarks with a margin (0: never starved). Smaller
        widens fewer probes: on the 1M benchmark with a 10 % filter at k = 100, nprobe
        7-10, 16 gives recall 0.981, 8 0.952-0.967 and 4 0.951-0.967, at about 2x the
        speed of 16 for 4. A probe at least half eligible (no filter, or a weak one) is
        never starved: its recall is set by ``nprobe``.
      max_nprobe: how far a starved query may widen its probe (default ``min(4 * nprobe,
        C / 8)``, at least ``nprobe``; ``nprobe``: never). It takes the next clusters in
        centroid order until the probe holds ``need`` eligible items (``path == 3``) -- a
        10 % filter at nprobe 8 then reads about 20 clusters instead of the whole index. The
        exact flat filtered scan answers it instead (``path == 2``) when ``max_nprobe``
        clusters are not enough, when its probe passes the filter at under half the index's
        rate (a filter correlated with the clusters: widening would cover too few of the
        clusters holding its items; an attribute filter's index-wide rate is estimated on a
        fixed sample of 256 words),
        or when another starved query of the batch needs the flat scan (which then serves
        every starved query, exactly).
      backend: ``"auto"`` (Pallas kernels on GPU; on CPU the native C++ scans and filter
        mask where they can be built, :mod:`pallas_kernels.native`; the XLA twins elsewhere
        and in ``jax.export`` artifacts), ``"xla"``, ``"pallas"``, ``"interpret"``.
    Returns:
      :class:`SearchResult`: ``ids [B, k]`` (external ids if the index has them, else item
      positions; -1 padded), ``scores f32[B, k]`` (-inf padded), ``count i32[B] =
      min(k, eligible)`` (flat, fallback) and ``path i32[B]`` (0 flat index, 1 IVF probe,
      2 starved -> flat scan, 3 starved -> widened probe).
    Raises:
      ValueError: shapes, dtypes, k, options, or NaN/Inf queries (rows named).
      FilterError: (a ValueError) a bad filter — syntax, unknown field, wrong value type,
        program too large — with the column.

    Works eagerly and inside ``jax.jit`` (k, nprobe, rerank, max_nprobe and backend must then
    be static).
    """
    nprobe = check_options(backend, k, index.ivf, nprobe, index.cache, rerank)
    q = check_queries(queries, index.dim)
    prog = filter_program(index.filters, filter, q.shape[0])
    allow = allow_array(allow)
    return _compiled.call(_search_jit, index, q, allow, prog, k=int(k), nprobe=int(nprobe),
                          rerank=int(rerank or 0),
                          min_eligible_factor=check_min_eligible_factor(min_eligible_factor),
                          backend=backend,
                          max_nprobe=check_max_nprobe(index.ivf, nprobe, max_nprobe))


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "rerank", "min_eligible_factor",
                                             "backend", "max_nprobe"))
def _search_jit(index: Index, q, allow, prog, *, k: int, nprobe: int, rerank: int,
                min_eligible_factor: float, backend: str, max_nprobe: int) -> SearchResult:
    """:func:`search` after validation, as one jitted function: packing ``allow`` into
    eligibility words, the core and the mapping of storage rows to ids fuse instead of
    running as separate eager ops (measured ~1 ms per call, ~5 ms with a ``bool[N]`` allow
    on a 1M-item IVF index). Shape errors in ``allow`` are raised while tracing."""
    mask = eligibility_words(index, allow, q.shape[0])
    if q.shape[0] == 0:         # no queries: empty results (the scans need a batch)
        return empty_result(index.ids, k)
    d_pad = index.items.codes.shape[1]
    q = jnp.pad(q, ((0, 0), (0, d_pad - index.dim)))
    scores, rows, path = _search_core(index, q, mask, prog, k=k, nprobe=nprobe, rerank=rerank,
                                      min_eligible_factor=min_eligible_factor, backend=backend,
                                      max_nprobe=max_nprobe)
    valid = rows >= 0
    pos = rows if index.perm is None else jnp.where(valid, index.perm[jnp.maximum(rows, 0)], -1)
    ids = pos if index.ids is None else jnp.where(valid, index.ids[jnp.maximum(pos, 0)], -1)
    return SearchResult(ids=ids, scores=scores, count=jnp.sum(valid, axis=1, dtype=jnp.int32),
                        path=path)
