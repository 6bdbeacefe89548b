"""``search``: filtered Int8 top-k over an :class:`Index`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.int8_topk import BACKENDS, MAX_K, int8_topk, pack_mask, unpack_mask
from st_jax._index import Index
from st_jax._types import SearchResult

# Selective filters: when the eligible items (union over the batch) fit in one of these
# fractions of the index, they are gathered into a compact sub-matrix first, so the work
# follows the number of eligible items instead of N. Larger: dense scan with the mask.
_SPARSE_FRACTIONS = (1 / 512, 1 / 64, 1 / 8)
_MIN_SPARSE_ROWS = 1 << 14


def eligibility_words(index: Index, allow, batch: int) -> jax.Array | None:
    """Normalises ``allow`` to the index's eligibility words.

    Args:
      allow: None, ``bool[N]`` / ``bool[B, N]`` (N = index.num_items), or already packed
        ``u32[W]`` / ``u32[B, W]`` with ``W = index.num_words``.
    Returns:
      None (everything eligible) or ``u32[W]`` / ``u32[B, W]``; bits of padded rows are 0.
    """
    if allow is None:
        return None
    a = jnp.asarray(allow)
    n, w = index.num_items, index.num_words
    if a.dtype == jnp.bool_:
        if a.shape not in ((n,), (batch, n)):
            raise ValueError(f"allow must be bool[{n}] or bool[{batch}, {n}]; got shape {a.shape}")
        pad = [(0, 0)] * (a.ndim - 1) + [(0, index.num_rows - n)]
        return pack_mask(jnp.pad(a, pad))
    if a.dtype == jnp.uint32:
        if a.shape not in ((w,), (batch, w)):
            raise ValueError(f"packed allow must be u32[{w}] or u32[{batch}, {w}]; got {a.shape}")
        return a
    raise ValueError(f"allow must be a bool mask or packed uint32 words; got dtype {a.dtype}")


def _sparse_caps(n_rows: int) -> tuple[int, ...]:
    if n_rows < 4 * _MIN_SPARSE_ROWS:
        return ()
    caps = sorted({max(1024, -(-int(n_rows * f) // 1024) * 1024) for f in _SPARSE_FRACTIONS})
    return tuple(c for c in caps if c <= n_rows // 2)


@functools.partial(jax.jit, static_argnames=("k", "backend", "num_items"))
def _search_rows(codes, scale, q, mask, *, k: int, backend: str, num_items: int):
    """Core of search in row positions. Returns ``(f32[B, k], i32[B, k])``."""
    n_rows = codes.shape[0]
    dense = functools.partial(int8_topk, k=k, num_valid=num_items, backend=backend)
    caps = _sparse_caps(n_rows) if mask is not None else ()
    if not caps:
        return dense(q, codes, scale, mask)

    union = mask if mask.ndim == 1 else jnp.bitwise_or.reduce(mask, axis=0)
    eligible = jnp.sum(lax.population_count(union).astype(jnp.int32))

    def sparse(cap):
        def run():
            rows = jnp.nonzero(unpack_mask(union, n_rows), size=cap, fill_value=0)[0]
            in_use = jnp.arange(cap) < eligible
            if mask.ndim == 1:
                sub_mask = pack_mask(in_use)
            else:
                bits = unpack_mask(mask, n_rows)[:, rows]
                sub_mask = pack_mask(bits & in_use)
            vals, sub = dense(q, codes[rows], scale[rows], sub_mask)
            return vals, jnp.where(sub >= 0, rows[jnp.maximum(sub, 0)], -1)
        return run

    branches = [sparse(c) for c in caps] + [lambda: dense(q, codes, scale, mask)]
    which = jnp.sum(eligible > jnp.asarray(caps, jnp.int32))
    return lax.switch(which, branches)


def search(index: Index, queries, k: int, allow=None, *, backend: str = "auto") -> SearchResult:
    """Top-k items by Int8 inner product among the eligible ones.

    Args:
      index: an :class:`Index` from :func:`build_index`.
      queries: ``f32[B, D]`` or ``bf16[B, D]`` (quantised per row inside).
      k: results per query, ``1 <= k <= 65536``; ``k > N`` returns every eligible item.
      allow: eligibility — None (all), ``bool[N]`` shared by the batch, ``bool[B, N]`` per
        query, or packed ``u32[W]`` / ``u32[B, W]`` words (``W = index.num_words``).
      backend: ``"auto"`` (Pallas kernel on GPU, XLA twin elsewhere), ``"xla"``,
        ``"pallas"``, ``"interpret"``.
    Returns:
      :class:`SearchResult`: ``ids [B, k]`` (external ids if the index has them; -1 padded),
      ``scores f32[B, k]`` (-inf padded), ``count i32[B] = min(k, eligible)``.
    Raises:
      ValueError: shapes, dtypes, k, backend, or NaN/Inf queries (rows named).

    Works eagerly and inside ``jax.jit`` (k and backend must then be static).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}]; got {k!r}")
    q = jnp.asarray(queries)
    if q.ndim != 2 or q.shape[1] != index.dim:
        hint = " (use queries[None, :] for one query)" if q.ndim == 1 else ""
        raise ValueError(f"queries must be [B, {index.dim}]; got shape {q.shape}{hint}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"queries must be f32 or bf16; got dtype {q.dtype}")
    if not isinstance(q, jax.core.Tracer):
        bad = np.flatnonzero(~np.isfinite(np.asarray(q, np.float32)).all(axis=1))
        if bad.size:
            raise ValueError(f"queries have NaN or Inf values in rows {bad[:10].tolist()}")
    mask = eligibility_words(index, allow, q.shape[0])
    d_pad = index.items.codes.shape[1]
    q = jnp.pad(q, ((0, 0), (0, d_pad - index.dim)))
    scores, rows = _search_rows(index.items.codes, index.items.scale, q, mask, k=int(k),
                                backend=backend, num_items=index.num_items)
    valid = rows >= 0
    ids = rows if index.ids is None else jnp.where(valid, index.ids[jnp.maximum(rows, 0)], -1)
    return SearchResult(ids=ids, scores=scores, count=jnp.sum(valid, axis=1, dtype=jnp.int32))
