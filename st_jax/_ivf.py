"""IVF: cluster-major item layout and probe-then-filter search.

Layout. Items are stored cluster by cluster; each cluster is padded to a whole number of
*blocks* of ``block`` items (a multiple of 32, so a block is ``block / 32`` whole mask words).
Holes (padding) are not live and never returned. ``probe_caps[p - 1]`` is the largest number
of blocks any ``p`` clusters hold (static), which sizes the per-query probed-block list.

Search (SilverTorch Algorithm 1, in one jitted function):
  1. centroid scores -> the ``nprobe`` best clusters per query;
  2. the eligibility mask is read **only for the words of the probed blocks** (partial masks);
  3. Int8 scores of the probed blocks' items + top-k (``pallas_kernels.ivf_scan``: a Pallas
     kernel reading the probed blocks in place on GPU, its XLA twin on CPU);
  4. a query whose probed clusters hold fewer than ``min_eligible_factor * k`` eligible items
     is *starved* (a selective filter): it widens its probe to the next clusters in
     centroid order, up to ``max_nprobe``, until it holds that many (:func:`probe_list`
     ranks each slot, so one wide list serves every query's own cut), or, when that cannot
     work, takes the exact flat filtered scan, within the same jitted function
     (``lax.cond`` / ``lax.switch``: each path runs only when some query needs it); see
     ``st_jax._search._int8_candidates``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from st_jax._kmeans import kmeans
from st_jax._types import _static, pytree_dataclass


@pytree_dataclass
class IVF:
    """Inverted-file metadata of an :class:`~st_jax.Index`.

    Attributes:
      centroids: ``f32[C, D]`` cluster centroids.
      block_start: ``i32[C]`` first block of each cluster (block b = rows ``b*block ..``).
      block_count: ``i32[C]`` blocks per cluster.
      block: items per block (static).
      probe_caps: ``probe_caps[p-1]`` = most blocks any p clusters hold (static tuple).
    """

    centroids: jax.Array
    block_start: jax.Array
    block_count: jax.Array
    block: int = _static()
    probe_caps: tuple = _static()

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


def balanced_kmeans(x: np.ndarray, num_clusters: int, *, max_size: int | None, seed: int,
                    progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """k-means, then clusters larger than ``max_size`` are split by k-means on their members.

    Returns ``(centroids f32[C', D], assign i32[N])`` with ``C' >= num_clusters``.
    """
    res = kmeans(x, num_clusters, seed=seed, progress=progress)
    cents, assign = res.centroids.copy(), res.assign.copy()
    if max_size is None:
        return cents, assign
    new_cents = [cents]
    for c in np.flatnonzero(res.sizes > max_size):
        members = np.flatnonzero(assign == c)
        parts = -(-members.size // max_size)
        sub = kmeans(x[members], parts, seed=seed + int(c) + 1)
        # part 0 keeps id c, the others get new ids
        ids = np.concatenate([[c], np.arange(parts - 1) + sum(len(a) for a in new_cents)])
        new_cents[0][c] = sub.centroids[0]
        new_cents.append(sub.centroids[1:])
        assign[members] = ids[sub.assign]
    return np.concatenate(new_cents).astype(np.float32), assign.astype(np.int32)


def ivf_layout(assign: np.ndarray, num_clusters: int, block: int, align: int = 1024):
    """Cluster-major permutation with clusters padded to whole blocks.

    Args:
      assign: ``i32[N]`` cluster of each item.
    Returns:
      ``(perm i32[n_rows], block_start i32[C], block_count i32[C])`` where ``perm[r]`` is the
      original position stored at row ``r`` (-1 for holes) and ``n_rows`` is a multiple of
      ``align``.
    """
    order = np.argsort(assign, kind="stable")
    sizes = np.bincount(assign, minlength=num_clusters)
    blocks = -(-sizes // block)
    block_start = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int32)
    n_rows = max(align, -(-int(blocks.sum()) * block // align) * align)
    perm = np.full(n_rows, -1, np.int64)
    # row of the j-th member of cluster c: block_start[c] * block + j
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    c_sorted = assign[order]
    rank = np.arange(order.size) - starts[c_sorted]
    perm[block_start[c_sorted].astype(np.int64) * block + rank] = order
    return perm.astype(np.int32), block_start, blocks.astype(np.int32)


def probe_caps(block_count: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.cumsum(np.sort(block_count)[::-1]))


def probe_list(ivf: IVF, q: jax.Array, nprobe: int):
    """Per query, the blocks of its ``nprobe`` best clusters in rank order, as a padded list.

    Returns ``(blocks i32[B, P], rank i32[B, P], ends i32[B, nprobe])`` with ``P =
    probe_caps[nprobe - 1]``: ``rank`` is the rank of each slot's cluster (``nprobe`` on
    padding slots, whose block is 0) and ``ends[:, j]`` the number of slots the best ``j + 1``
    clusters fill, so ``rank < n`` selects the probe of the best ``n <= nprobe`` clusters.
    """
    cs = q.astype(jnp.float32) @ ivf.centroids.T                          # [B, C]
    _, clusters = lax.top_k(cs, nprobe)                                    # [B, nprobe]
    counts = ivf.block_count[clusters]                                     # [B, nprobe]
    ends = jnp.cumsum(counts, axis=1)
    cap = ivf.probe_caps[nprobe - 1]
    slot = jnp.arange(cap)
    # rank[s] = #clusters ending at or before slot s (a searchsorted of every slot in
    # ends, as one scatter-add and a running sum: ~5x XLA:CPU's searchsorted loop)
    b = q.shape[0]
    ends_hit = jnp.zeros((b, cap + 1), jnp.int32).at[jnp.arange(b)[:, None], ends].add(1)
    rank = jnp.cumsum(ends_hit, axis=1)[:, :cap]                           # [B, P]
    which = jnp.minimum(rank, nprobe - 1)
    first = jnp.take_along_axis(ends - counts, which, axis=1)
    blocks = ivf.block_start[jnp.take_along_axis(clusters, which, axis=1)] + (slot - first)
    return jnp.where(rank < nprobe, blocks, 0), rank.astype(jnp.int32), ends


def probed_blocks(ivf: IVF, q: jax.Array, nprobe: int):
    """Per query, the blocks of its ``nprobe`` best clusters, as a padded list.

    Returns ``(blocks i32[B, P], valid bool[B, P])`` with ``P = probe_caps[nprobe - 1]``.
    """
    blocks, rank, _ = probe_list(ivf, q, nprobe)
    return blocks, rank < nprobe


def partial_mask(words: jax.Array, blocks: jax.Array, valid: jax.Array, block: int):
    """Eligibility words of the probed blocks only: ``u32[B, P, block // 32]``.

    Args:
      words: ``u32[W]`` or ``u32[B, W]`` full eligibility (live & allow & filter).
    """
    wpb = block // 32
    idx = blocks[:, :, None] * wpb + jnp.arange(wpb)                      # [B, P, wpb]
    if words.ndim == 1:
        w = words[idx]
    else:
        w = jnp.take_along_axis(words, idx.reshape(idx.shape[0], -1), axis=1).reshape(idx.shape)
    return jnp.where(valid[:, :, None], w, jnp.uint32(0))
