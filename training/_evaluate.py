"""Evaluation: full-catalogue ranking metrics, per-task head AUC / log-loss, baselines.

Ranking protocol: for each user with a held-out item in the split, every catalogue item is
scored; items the user interacted with before the held-out item are masked (see
`training._data`). The rank r of the held-out item counts items scoring strictly higher, plus
tied items with a lower row (the order `lax.top_k` returns). With one held-out item per user,
HR@K = Recall@K = mean[r < K] and NDCG@K = mean[(r < K) / log2(r + 2)].

Methods, side by side:
  * `popularity`: training interaction counts.
  * `two_tower`: dot product with the task's user embedding.
  * `two_tower+overarch`: the top `rerank_top` of the dot product re-scored by the OverArch logit
    of the same task (items below keep their dot-product rank).
  * `two_tower+overarch+value_model`: the same top items re-scored by the Value Model over the
    OverArch probabilities (one score for all tasks).
Per task: `watch` ranks every user's held-out item; `like` ranks the held-out items with like = 1.

Heads: for every held-out (user, item) plus `num_negatives` uniform unseen items per user
(labels 0), the AUC of each task's two-tower dot product and OverArch logit, and the log-loss of
the OverArch probability (calibrated to a 1:`overarch.num_hard + num_random` training ratio, so
compare log-loss between models, not to an absolute).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from training._data import Dataset
from training._trained import TrainedModel

DEFAULT_KS = (10, 20, 50, 100)


def rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """i64[B] rank of column `target[b]` in row b of f32[B, N] (-inf = masked), ties broken by
    column index. A masked target gets rank N."""
    s = np.asarray(scores)
    b = np.arange(s.shape[0])
    ts = s[b, target][:, None]
    cols = np.arange(s.shape[1])[None, :]
    r = (s > ts).sum(1) + ((s == ts) & (cols < target[:, None])).sum(1)
    return np.where(np.isfinite(ts[:, 0]), r, s.shape[1])


def ranking_metrics(ranks: np.ndarray, ks=DEFAULT_KS) -> dict:
    """{recall@K, hr@K, ndcg@K} for ranks i64[U] of one held-out item per user."""
    ranks = np.asarray(ranks)
    out = {"users": int(ranks.size)}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if ranks.size else float("nan")
        out[f"hr@{k}"] = out[f"recall@{k}"]
        out[f"ndcg@{k}"] = (float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
                            if ranks.size else float("nan"))
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with average ranks for ties (Mann-Whitney U)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # average ranks over tie groups (vectorised)
    starts = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1])
    ends = np.concatenate([starts[1:], [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def evaluate(model: TrainedModel, data: Dataset | None = None, *, split: str = "test",
             ks=DEFAULT_KS, num_negatives: int = 100, seed: int = 0,
             chunk: int = 2048) -> dict:
    """All metrics of the module docstring as a JSON-ready dict.

    Args:
      model: a TrainedModel.  data: the dataset (default: the model's).
      split: "test" or "valid".  ks: cutoffs.  num_negatives: per-user negatives for AUC.
    """
    t0 = time.perf_counter()
    ds = data if data is not None else model.dataset
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    held = ds.split(split)
    seen = ds.seen(split)
    n = ds.num_items
    items = model.item_embeddings()
    tasks = ds.tasks
    rerank_top = min(model.config.overarch.rerank_top, n)
    pop = ds.item_popularity()

    ranks = {m: {t: [] for t in tasks} for m in
             ("popularity", "two_tower", "two_tower+overarch", "two_tower+overarch+value_model")}
    topk = jax.jit(lambda s: jax.lax.top_k(s, rerank_top)[1])
    for start in range(0, len(held), chunk):
        sl = slice(start, start + chunk)
        users, target, labels = held.user[sl], held.item[sl], held.labels[sl]
        mask = seen.dense_mask(users, n)
        u = model.users_embeddings_by_row(users)                          # [T, B, D]
        pop_s = np.where(mask, -np.inf, pop[None, :])
        for j, t in enumerate(tasks):
            sel = np.ones(len(users), bool) if j == 0 else labels[:, j] > 0.5
            ranks["popularity"][t].append(rank_of_target(pop_s, target)[sel])
            dot = np.where(mask, -np.inf, u[j] @ items.T).astype(np.float32)
            r_dot = rank_of_target(dot, target)
            ranks["two_tower"][t].append(r_dot[sel])
            if not model.has_overarch:
                continue
            cand = np.asarray(topk(jnp.asarray(dot)))                      # [B, R]
            logits = model.overarch_logits(u, cand)                        # [B, R, T]
            value = np.asarray(model.value_model_apply(jax.nn.sigmoid(jnp.asarray(logits))))
            valid = np.isfinite(np.take_along_axis(dot, cand, 1))
            inside = cand == target[:, None]
            found, pos = inside.any(1), inside.argmax(1)
            for name, sc in (("two_tower+overarch", logits[..., j]),
                             ("two_tower+overarch+value_model", value)):
                r_in = rank_of_target(np.where(valid, sc, -np.inf), pos)
                ranks[name][t].append(np.where(found, r_in, r_dot)[sel])

    out = {"dataset": ds.summary(), "split": split, "ks": list(ks),
           "rerank_top": rerank_top, "value_formula": model.value_model.formula}
    for m, per in ranks.items():
        if m != "popularity" and m != "two_tower" and not model.has_overarch:
            continue
        out[m] = {t: ranking_metrics(np.concatenate(r) if r else np.zeros(0, np.int64), ks)
                  for t, r in per.items()}
    out["heads"] = _head_metrics(model, ds, held, seen, num_negatives, seed)
    k20 = 20 if 20 in ks else ks[0]
    key = f"recall@{k20}"
    t0name = tasks[0]
    summary = {f"popularity_{key}": out["popularity"][t0name][key],
               f"two_tower_{key}": out["two_tower"][t0name][key]}
    summary[f"two_tower_over_popularity_{key}"] = _ratio(summary[f"two_tower_{key}"],
                                                         summary[f"popularity_{key}"])
    if model.has_overarch:
        summary[f"overarch_rerank_{key}"] = out["two_tower+overarch"][t0name][key]
        summary[f"overarch_rerank_relative_gain_{key}"] = _ratio(
            summary[f"overarch_rerank_{key}"], summary[f"two_tower_{key}"]) - 1.0
    summary["task"] = t0name
    out["summary"] = summary
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def _ratio(a, b):
    return float(a / b) if b else float("nan")


def _head_metrics(model: TrainedModel, ds: Dataset, held, seen, num_negatives: int,
                  seed: int) -> dict:
    rng = np.random.default_rng([seed, 3])
    users, target = held.user, held.item
    b = len(users)
    neg = rng.integers(0, ds.num_items, size=(b, num_negatives))
    cands = np.concatenate([target[:, None], neg], axis=1).astype(np.int32)   # [B, 1 + M]
    mask = seen.dense_mask(users, ds.num_items)
    bad = np.take_along_axis(mask, cands, 1) | (cands == target[:, None])
    bad[:, 0] = False
    weight = ~bad
    labels = np.zeros(cands.shape + (len(ds.tasks),), np.float32)
    labels[:, 0] = held.labels
    u = model.users_embeddings_by_row(users)                                  # [T, B, D]
    items = model.item_embeddings()
    dots = np.einsum("tbd,bcd->bct", u, items[cands])
    logits = model.overarch_logits(u, cands) if model.has_overarch else None
    out = {"two_tower": {}, "overarch": {}, "negatives_per_user": num_negatives}
    w = weight.reshape(-1)
    for j, t in enumerate(ds.tasks):
        y = labels[..., j].reshape(-1)[w]
        out["two_tower"][t] = {"auc": auc(dots[..., j].reshape(-1)[w], y)}
        if logits is not None:
            z = logits[..., j].reshape(-1)[w]
            out["overarch"][t] = {"auc": auc(z, y), "log_loss": log_loss(z, y)}
    if logits is None:
        del out["overarch"]
    return out
