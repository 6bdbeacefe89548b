"""k-means for the IVF layer: greedy k-means++ initialisation and Lloyd iterations in JAX.

Everything heavy is jitted and batched over items (no Python loop over items): the
k-means++ seeding is one ``lax.fori_loop`` over centroids on a training sample, each Lloyd
iteration one ``lax.scan`` over item batches (nearest centroid by ``x·c - |c|²/2``, sums by
``segment_sum``). As in faiss, centroids are trained on a sample of at most
``max_points_per_centroid * C`` points; the final assignment covers every item.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """Attributes:
      centroids: ``f32[C, D]``; assign: ``i32[N]`` nearest centroid of every item;
      inertia: sum of squared distances of the items to their centroid (float);
      sizes: ``i64[C]`` items per cluster.
    """

    centroids: np.ndarray
    assign: np.ndarray
    inertia: float
    sizes: np.ndarray


def _pad_rows(x, multiple):
    n = x.shape[0]
    n_pad = -(-n // multiple) * multiple
    return jnp.pad(x, ((0, n_pad - n), (0, 0))), n


@functools.partial(jax.jit, static_argnames=("batch",))
def _assign(x, centroids, *, batch: int):
    """Nearest centroid and squared distance for every row of ``x`` (``f32[N, D]``).

    Returns ``(i32[N], f32[N])``. ``x`` rows beyond a multiple of ``batch`` are padded inside.
    """
    xp, n = _pad_rows(x, batch)
    half_c2 = 0.5 * jnp.sum(centroids * centroids, axis=1)

    def body(_, xb):
        s = xb @ centroids.T - half_c2[None, :]
        a = jnp.argmax(s, axis=1).astype(jnp.int32)
        d2 = jnp.maximum(jnp.sum(xb * xb, axis=1) - 2.0 * jnp.max(s, axis=1), 0.0)
        return None, (a, d2)

    _, (a, d2) = lax.scan(body, None, xp.reshape(-1, batch, x.shape[1]))
    return a.reshape(-1)[:n], d2.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("num_clusters", "batch"))
def _lloyd_step(x, centroids, key, *, num_clusters: int, batch: int):
    """One Lloyd iteration on the training sample. Empty clusters are re-seeded on the
    points farthest from their centroid (deterministically from ``key``)."""
    a, d2 = _assign(x, centroids, batch=batch)
    sums = jax.ops.segment_sum(x, a, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(d2), a, num_segments=num_clusters)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
    # re-seed empty clusters with far points (sampled proportionally to d2)
    empty = counts == 0
    far = jax.random.choice(key, x.shape[0], (num_clusters,), p=d2 / jnp.maximum(d2.sum(), 1e-30))
    new = jnp.where(empty[:, None], x[far], new)
    return new, jnp.sum(d2)


@functools.partial(jax.jit, static_argnames=("num_clusters", "trials"))
def _kmeans_pp(x, key, *, num_clusters: int, trials: int):
    """Greedy k-means++ seeding on ``x f32[S, D]``: ``f32[C, D]``.

    Each step draws ``trials`` candidates with probability proportional to the squared
    distance to the nearest chosen centroid and keeps the one that lowers the potential most.
    """
    s = x.shape[0]
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (), 0, s)
    cents = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, axis=1)
    x2 = jnp.sum(x * x, axis=1)

    def body(i, carry):
        cents, d2, key = carry
        key, sub = jax.random.split(key)
        p = d2 / jnp.maximum(jnp.sum(d2), 1e-30)
        cand = jax.random.choice(sub, s, (trials,), p=p)
        c = x[cand]                                                    # [L, D]
        dc = jnp.maximum(x2[None, :] - 2 * c @ x.T + jnp.sum(c * c, 1)[:, None], 0)
        new_d2 = jnp.minimum(d2[None, :], dc)                          # [L, S]
        best = jnp.argmin(jnp.sum(new_d2, axis=1))
        return cents.at[i].set(c[best]), new_d2[best], key

    cents, _, _ = lax.fori_loop(1, num_clusters, body, (cents, d2, key))
    return cents


def kmeans(x, num_clusters: int, *, iters: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256, seed_points_per_centroid: int = 32,
           batch: int = 16384,
           progress: bool = False, tol: float = 1e-4) -> KMeansResult:
    """k-means++ + Lloyd.

    Args:
      x: ``f32[N, D]`` points (finite).
      num_clusters: C, ``1 <= C <= N``.
      iters: maximum Lloyd iterations (stops early when inertia improves by < ``tol``).
      seed: PRNG seed (deterministic).
      max_points_per_centroid: training sample size per centroid (faiss uses 256).
      seed_points_per_centroid: k-means++ seeding sample size per centroid.
      batch: rows per assignment step (bounds memory: ``batch * C`` floats).
      progress: show a tqdm progress bar.
    Returns:
      :class:`KMeansResult` with the assignment of *every* item.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects f32[N, D]; got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, N={n}]; got {num_clusters}")
    rng = np.random.default_rng(seed)
    s = min(n, max_points_per_centroid * num_clusters)
    sample = x if s == n else x[np.sort(rng.choice(n, s, replace=False))]
    xs = jnp.asarray(sample)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    # k-means++ is sequential over centroids: seed on a smaller sub-sample, Lloyd refines.
    m = min(s, seed_points_per_centroid * num_clusters)
    seed_pts = xs if m == s else jnp.asarray(sample[np.sort(rng.choice(s, m, replace=False))])
    cents = _kmeans_pp(seed_pts, sub, num_clusters=num_clusters,
                       trials=2 + int(np.log(num_clusters)))
    b = min(batch, max(256, 1 << (s - 1).bit_length()))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=iters + 1, desc=f"k-means C={num_clusters}", unit="iter")
    prev = np.inf
    for _ in range(iters):
        key, sub = jax.random.split(key)
        cents, inertia = _lloyd_step(xs, cents, sub, num_clusters=num_clusters, batch=b)
        inertia = float(inertia)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}")
        if prev - inertia <= tol * max(prev, 1e-30) and np.isfinite(prev):
            break
        prev = inertia
    a, d2 = _assign(jnp.asarray(x), cents, batch=min(batch, max(256, 1 << (n - 1).bit_length())))
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    a = np.asarray(a)
    return KMeansResult(centroids=np.asarray(cents), assign=a, inertia=float(jnp.sum(d2)),
                        sizes=np.bincount(a, minlength=num_clusters))
