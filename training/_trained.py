"""TrainedModel: the trained towers, OverArch and Value Model, as pure functions over pytrees."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from training._config import TrainConfig
from training._data import Dataset
from training._models import TwoTower, make_overarch
from training._value_model import ValueModel


def build_modules(dataset: Dataset, config: TrainConfig, seed: int | None = None):
    """Fresh (TwoTower, OverArch | None) for a dataset's schema; parameters from `seed`."""
    s = dataset.schema

    def make(key):
        rngs = nnx.Rngs(params=key)
        tt = TwoTower(s.user, s.item, len(s.tasks), config.tower, rngs=rngs)
        oa = make_overarch(len(s.tasks), config.tower.out_dim, config.overarch, rngs=rngs)
        return tt, oa

    return make(jax.random.key(config.seed if seed is None else seed))


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static graph definitions (hashable) of the modules; parameters live elsewhere."""

    user_tower: object
    item_tower: object
    overarch: object | None


def split_params(tt: TwoTower, oa) -> tuple[Graphs, dict]:
    """Modules -> (graph defs, pure params pytree {user_tower, item_tower, log_inv_temperature,
    overarch})."""
    gu, su = nnx.split(tt.user_tower)
    gi, si = nnx.split(tt.item_tower)
    params = {"user_tower": nnx.to_pure_dict(su), "item_tower": nnx.to_pure_dict(si),
              "log_inv_temperature": tt.log_inv_temperature.get_value()}
    go = None
    if oa is not None:
        go, so = nnx.split(oa)
        params["overarch"] = nnx.to_pure_dict(so)
    return Graphs(gu, gi, go), params


def _jnp_features(features: Mapping) -> dict:
    return {k: jnp.asarray(v) for k, v in features.items()}


class TrainedModel:
    """A trained multi-task two-tower model with OverArch and Value Model.

    Pure functions (work under `jax.jit` / `jax.export`, parameters as plain pytrees):
      * `user_tower_apply(params["user_tower"], user_features) -> f32[T, B, D]`
      * `item_tower_apply(params["item_tower"], item_features) -> f32[N, D]`
      * `overarch_apply(params["overarch"], user_emb f32[T, B, D], item_emb f32[B, C, D])
         -> f32[B, C, T]` (logits; probabilities are `sigmoid`)
      * `value_model_apply(preds f32[..., T]) -> f32[...]`
    Notebook helpers use the dataset's own user and item ids.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset, graphs: Graphs, params: dict,
                 value_model: ValueModel):
        self.config = config
        self.dataset = dataset
        self.graphs = graphs
        self.params = params
        self.value_model = value_model
        self.tasks = dataset.tasks
        g = graphs
        self.user_tower_apply = functools.partial(_user_apply, g.user_tower)
        self.item_tower_apply = functools.partial(_item_apply, g.item_tower)
        self.overarch_apply = (functools.partial(_overarch_apply, g.overarch)
                               if g.overarch is not None else None)
        self.value_model_apply = value_model.fn
        self._item_cache = None
        # jitted with the graph static: compiled once per architecture, shared by instances
        self._jit_user = functools.partial(_jit_user_apply, g.user_tower)
        self._jit_item = functools.partial(_jit_item_apply, g.item_tower)
        self._jit_oa = (functools.partial(_jit_overarch_apply, g.overarch)
                        if g.overarch is not None else None)

    @property
    def has_overarch(self) -> bool:
        return self.overarch_apply is not None

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    # --- embeddings --------------------------------------------------------------------------
    def user_embeddings(self, user_features: Mapping) -> np.ndarray:
        """f32[T, B, D] L2-normalised user embeddings, one per task (feature dict of B rows)."""
        self.dataset.schema.validate(user_features, "user")
        return np.asarray(self._jit_user(self.params["user_tower"], _jnp_features(user_features)))

    def item_embeddings(self, item_features: Mapping | None = None,
                        chunk: int = 65536) -> np.ndarray:
        """f32[N, D] item embeddings; `None` = the whole catalogue (cached, row order of
        `dataset.item_ids`)."""
        if item_features is None:
            if self._item_cache is None:
                self._item_cache = self._items(self.dataset.item_features, chunk)
            return self._item_cache
        self.dataset.schema.validate(item_features, "item")
        return self._items(item_features, chunk)

    def _items(self, feats, chunk):
        n = len(next(iter(feats.values())))
        out = [np.asarray(self._jit_item(self.params["item_tower"],
                                         _jnp_features({k: v[s:s + chunk]
                                                        for k, v in feats.items()})))
               for s in range(0, n, chunk)]
        return np.concatenate(out, axis=0)

    def users_embeddings_by_row(self, rows: np.ndarray) -> np.ndarray:
        """f32[T, B, D] for internal user rows."""
        feats = {k: v[rows] for k, v in self.dataset.user_features.items()}
        return np.asarray(self._jit_user(self.params["user_tower"], _jnp_features(feats)))

    # --- scoring -----------------------------------------------------------------------------
    def overarch_logits(self, user_emb: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """f32[B, C, T] OverArch logits for users f32[T, B, D] and candidate rows i32[B, C]."""
        if not self.has_overarch:
            raise ValueError("this model was trained without an OverArch (overarch.kind='none')")
        items = self.item_embeddings()
        return np.asarray(self._jit_oa(self.params["overarch"], jnp.asarray(user_emb),
                                       jnp.asarray(items[item_rows])))

    def recommend(self, user_ids: Sequence, k: int = 10, exclude_seen: bool = True,
                  rerank: bool = True, task: str = "watch", return_scores: bool = False):
        """Top-k items for users given by the dataset's own ids.

        Retrieval: dot product with the `task` user embedding over the full catalogue (items the
        user interacted with masked when `exclude_seen`); with `rerank` and an OverArch, the top
        `overarch.rerank_top` are re-scored by the OverArch and combined by the Value Model.
        Returns: item ids [B, k] (dataset's ids; -1 where fewer than k items are eligible), and
        scores f32[B, k] when `return_scores`.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows = self.dataset.user_rows(user_ids)
        t = self.task_index(task)
        u = self.users_embeddings_by_row(rows)                       # [T, B, D]
        items = self.item_embeddings()
        scores = u[t] @ items.T                                      # [B, N]
        if exclude_seen:
            mask = self.dataset.seen("all").dense_mask(rows, self.dataset.num_items)
            scores = np.where(mask, -np.inf, scores)
        pool = min(self.dataset.num_items,
                   max(k, self.config.overarch.rerank_top if rerank and self.has_overarch else k))
        s, idx = jax.lax.top_k(jnp.asarray(scores, jnp.float32), pool)
        s, idx = np.asarray(s), np.asarray(idx)
        if rerank and self.has_overarch:
            logits = self.overarch_logits(u, idx)                    # [B, C, T]
            vs = np.asarray(self.value_model_apply(jax.nn.sigmoid(jnp.asarray(logits))))
            vs = np.where(np.isfinite(s), vs, -np.inf)
            order = np.argsort(-vs, axis=1, kind="stable")[:, :k]
            idx = np.take_along_axis(idx, order, 1)
            s = np.take_along_axis(vs, order, 1)
        idx, s = idx[:, :k], s[:, :k]
        ids = np.where(np.isfinite(s), self.dataset.item_ids[idx], -1)
        return (ids, s) if return_scores else ids


def _user_apply(graph, params, user_features):
    return nnx.merge(graph, params)(user_features)


def _item_apply(graph, params, item_features):
    return nnx.merge(graph, params)(item_features)


def _overarch_apply(graph, params, user_emb, item_emb):
    return nnx.merge(graph, params)(user_emb, item_emb)


_jit_user_apply = jax.jit(_user_apply, static_argnums=0)
_jit_item_apply = jax.jit(_item_apply, static_argnums=0)
_jit_overarch_apply = jax.jit(_overarch_apply, static_argnums=0)


def with_value_model(model: TrainedModel, value_model: ValueModel) -> TrainedModel:
    """A copy of `model` that ranks with another Value Model (same parameters)."""
    if tuple(value_model.tasks) != tuple(model.tasks):
        raise ValueError(f"value model tasks {value_model.tasks} != model tasks {model.tasks}")
    cfg = dataclasses.replace(model.config, value_formula=value_model.formula)
    return TrainedModel(cfg, model.dataset, model.graphs, model.params, value_model)


def fit_value_model(model: TrainedModel, target: str = "like", split: str = "valid",
                    num_negatives: int = 20, seed: int = 0, **fit_kwargs) -> ValueModel:
    """Learnable Value Model weighting: fits `sum_t w_t * p_t + b` (p = OverArch probabilities)
    to one task's labels on held-out (user, item) pairs of `split` plus `num_negatives` uniform
    unseen items per user (label 0). Returns the fitted ValueModel (use `with_value_model`)."""
    from training._value_model import fit_value_weights
    ds = model.dataset
    j = model.task_index(target)
    held = ds.split(split)
    rng = np.random.default_rng([seed, 4])
    cands = np.concatenate([held.item[:, None],
                            rng.integers(0, ds.num_items, (len(held), num_negatives))], 1)
    seen = ds.seen(split).dense_mask(held.user, ds.num_items)
    keep = ~np.take_along_axis(seen, cands, 1)
    keep[:, 1:] &= cands[:, 1:] != held.item[:, None]
    u = model.users_embeddings_by_row(held.user)
    probs = np.asarray(jax.nn.sigmoid(jnp.asarray(model.overarch_logits(u, cands))))
    y = np.zeros(cands.shape, np.float32)
    y[:, 0] = held.labels[:, j]
    return fit_value_weights(probs[keep], y[keep], model.tasks, **fit_kwargs)
