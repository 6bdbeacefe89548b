"""Synthetic catalogues with planted structure, for demos, tests and benchmarks."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """Attributes:
      embeddings: ``f32[N, D]`` item embeddings (unit norm).
      cluster: ``i32[N]`` planted cluster of each item.
      queries: ``f32[B, D]`` query embeddings drawn near the same clusters.
    """

    embeddings: np.ndarray
    cluster: np.ndarray
    queries: np.ndarray


def clustered_catalogue(n: int, d: int, *, num_clusters: int = 256, num_queries: int = 32,
                        spread: float = 0.6, seed: int = 0) -> Catalogue:
    """Unit-norm embeddings around ``num_clusters`` centres with Zipf-like cluster sizes.

    Items are shuffled (cluster ids are not sorted), queries are noisy centres. Generated in
    chunks so 10M x 128 fits in memory as float32.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.5
    cluster = rng.choice(num_clusters, size=n, p=weights / weights.sum()).astype(np.int32)
    emb = np.empty((n, d), np.float32)
    step = 1 << 18
    for s in range(0, n, step):
        e = centres[cluster[s:s + step]] + (spread / np.sqrt(d)) * rng.standard_normal(
            (min(step, n - s), d), dtype=np.float32)
        emb[s:s + step] = e / np.linalg.norm(e, axis=1, keepdims=True)
    qc = rng.choice(num_clusters, size=num_queries, p=weights / weights.sum())
    q = centres[qc] + (spread / np.sqrt(d)) * rng.standard_normal((num_queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return Catalogue(embeddings=emb, cluster=cluster, queries=q.astype(np.float32))


def exact_filtered_topk(embeddings: np.ndarray, queries: np.ndarray, k: int,
                        allow: np.ndarray | None = None, chunk: int = 1 << 18) -> np.ndarray:
    """Ground truth: ids ``i64[B, k]`` of the exact float32 filtered top-k (-1 padded)."""
    b = queries.shape[0]
    best_v = np.full((b, 0), -np.inf, np.float32)
    best_i = np.zeros((b, 0), np.int64)
    for s in range(0, embeddings.shape[0], chunk):
        sc = queries @ embeddings[s:s + chunk].T
        if allow is not None:
            a = allow[..., s:s + chunk]
            sc = np.where(a, sc, -np.inf)
        v = np.concatenate([best_v, sc], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)], 1)
        kk = min(k, v.shape[1])
        part = np.argpartition(-v, kk - 1, axis=1)[:, :kk]
        best_v, best_i = np.take_along_axis(v, part, 1), np.take_along_axis(i, part, 1)
    order = np.argsort(-best_v, axis=1, kind="stable")
    best_v, best_i = np.take_along_axis(best_v, order, 1), np.take_along_axis(best_i, order, 1)
    best_i = np.where(np.isfinite(best_v), best_i, -1)
    return np.pad(best_i, ((0, 0), (0, k - best_i.shape[1])), constant_values=-1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@k against the exact filtered top-k, normalised by min(k, eligible)."""
    r = []
    for f, t in zip(found, truth):
        t = set(t[t >= 0].tolist())
        if t:
            r.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(r)) if r else 1.0
