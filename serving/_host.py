"""Host side of serving, shared by the in-process and the exported retriever: request
validation, filter compilation, id <-> row maps, batch buckets, padding and results.

Nothing here imports the model code (``training``): an exported graph runs with this file,
``st_jax``'s filter compiler and the artifacts alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from st_jax._filter_lang import compile_filter, matches_everything, split_filters

DEFAULT_BUCKETS = (1, 8, 32, 128)
MIN_EXCLUDE = 16


class RequestError(ValueError):
    """A request cannot be served as given (features, filter, ids, k); the message says why."""


class UnknownUserError(RequestError, KeyError):
    """A user id is not in the bundle's user table."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Recommendations:
    """Results of one batch of B users (numpy arrays).

    Attributes:
      ids: ``[B, k]`` item ids, best first; -1 where fewer than k items qualified.
      scores: ``f32[B, k]`` Value Model score (or retrieval score), -inf padded.
      task_scores: ``f32[B, k, T]`` per-task predictions (OverArch probabilities, or exact
        dot products of each task's user embedding when ranking by retrieval); NaN padded.
      count: ``i32[B]`` valid results per user.
      num_candidates: ``i32[B]`` candidates after the task merge (what the OverArch scored).
      path: ``i32[B, T]`` per task: 0 flat scan, 1 IVF probe, 2 IVF starved -> flat scan.
      tasks: task names (the last axis of ``task_scores``).
    """

    ids: np.ndarray
    scores: np.ndarray
    task_scores: np.ndarray
    count: np.ndarray
    num_candidates: np.ndarray
    path: np.ndarray
    tasks: tuple[str, ...]


def lookup(sorted_keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(j, found)``: index into ``sorted_keys`` of each id (clipped; meaningful where
    ``found``) and whether the id is there."""
    ids = np.asarray(ids).reshape(-1)
    if not sorted_keys.size:
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    j = np.minimum(np.searchsorted(sorted_keys, ids), sorted_keys.size - 1)
    return j, sorted_keys[j] == ids


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (n <= max(buckets))."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise AssertionError("caller splits batches larger than the largest bucket")


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    bs = tuple(sorted({int(b) for b in buckets}))
    if not bs or bs[0] < 1:
        raise ValueError(f"batch buckets must be positive ints; got {buckets!r}")
    return bs


class HostSide:
    """Request preparation for one published bundle.

    Args:
      user_specs: the user side of the feature schema (``FeatureSpec.to_json`` dicts).
      filter_schema: the index's ``FilterSchema`` or None (built without attributes).
      item_ids: ``[N]`` external item ids by catalogue position.
      perm: ``i32[n_rows]`` catalogue position of each storage row (-1 holes) or None.
      num_rows: storage rows of the index.
      tasks: task names; titles: item titles by position or None.
      users: optional user table ``{"ids": [U], "features": {...}, "seen_indptr": [U+1],
        "seen_items": [nnz] catalogue positions}``.
    """

    def __init__(self, user_specs: Sequence[Mapping], filter_schema, item_ids: np.ndarray,
                 perm: np.ndarray | None, num_rows: int, tasks: Sequence[str],
                 titles: Sequence[str] | None = None, users: Mapping | None = None):
        self.user_specs = [dict(s) for s in user_specs]
        self.filter_schema = filter_schema
        self.item_ids = np.asarray(item_ids)
        self._id_order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[self._id_order]
        n = self.item_ids.shape[0]
        if perm is None:
            self.row_of_pos = np.arange(n, dtype=np.int32)
        else:
            perm = np.asarray(perm)
            self.row_of_pos = np.full(n, -1, np.int32)
            real = perm >= 0
            self.row_of_pos[perm[real]] = np.flatnonzero(real).astype(np.int32)
        self.num_rows = num_rows
        self.tasks = tuple(tasks)
        self.titles = None if titles is None else list(titles)
        self.users = users
        if users is not None:
            uid = np.asarray(users["ids"])
            self._user_order = np.argsort(uid, kind="stable")
            self._sorted_users = uid[self._user_order]

    # --- ids -------------------------------------------------------------------------------
    def positions_of(self, item_ids, what: str = "item") -> np.ndarray:
        """Catalogue positions of external item ids; RequestError naming unknown ids."""
        ids = np.asarray(item_ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"{what} ids must be integers; got dtype {ids.dtype}")
        j, found = lookup(self._sorted_ids, ids)
        bad = ids[~found]
        if bad.size:
            raise RequestError(f"unknown {what} ids {bad[:10].tolist()} (not in the catalogue)")
        return self._id_order[j].astype(np.int64)

    def known(self, item_ids) -> np.ndarray:
        """bool[n]: which external ids are in the published catalogue."""
        return lookup(self._sorted_ids, item_ids)[1]

    def title(self, item_id) -> str:
        if item_id < 0:
            return ""
        if self.titles is None:
            return str(int(item_id))
        return self.titles[int(self.positions_of([item_id])[0])]

    def user_rows(self, user_ids) -> np.ndarray:
        if self.users is None:
            raise RequestError("this bundle has no user table: pass user features instead "
                               "(publish(..., include_users=True) stores one)")
        ids = np.asarray(user_ids).reshape(-1)
        j, found = lookup(self._sorted_users, ids)
        bad = ids[~found]
        if bad.size:
            raise UnknownUserError(f"unknown user ids {bad[:10].tolist()}")
        return self._user_order[j]

    def user_features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v)[rows] for k, v in self.users["features"].items()}

    def seen_items(self, rows: np.ndarray) -> list[np.ndarray]:
        """External ids of the items each user (table row) interacted with."""
        ip, items = self.users["seen_indptr"], self.users["seen_items"]
        return [self.item_ids[items[ip[r]:ip[r + 1]]] for r in rows]

    # --- validation ------------------------------------------------------------------------
    def check_user_features(self, features: Mapping) -> int:
        """Validates a user feature dict against the schema; returns B."""
        if not isinstance(features, Mapping):
            raise RequestError(f"user features must be a mapping {{field: array}}; got "
                               f"{type(features).__name__}")
        names = [s["name"] for s in self.user_specs]
        missing = sorted(set(names) - set(features))
        extra = sorted(set(features) - set(names))
        if missing or extra:
            raise RequestError(f"user features: missing {missing}, unknown {extra}; "
                               f"expected fields {names}")
        b = None
        for s in self.user_specs:
            a = np.asarray(features[s["name"]])
            multi = s["kind"] == "multi"
            if a.ndim != (2 if multi else 1):
                raise RequestError(f"user feature {s['name']!r} must have rank "
                                   f"{2 if multi else 1}; got shape {a.shape}")
            if multi and a.shape[1] != s["max_len"]:
                raise RequestError(f"user feature {s['name']!r} must be padded to width "
                                   f"{s['max_len']}; got {a.shape[1]}")
            if b is None:
                b = a.shape[0]
            elif a.shape[0] != b:
                raise RequestError(f"user feature {s['name']!r} has {a.shape[0]} rows, "
                                   f"expected {b}")
            if s["kind"] == "numeric":
                if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
                    raise RequestError(f"user feature {s['name']!r} must be finite numbers")
            else:
                if a.size and not np.issubdtype(a.dtype, np.integer):
                    raise RequestError(f"user feature {s['name']!r} must be integer codes; "
                                       f"got {a.dtype}")
                if a.size and (a.min() < 0 or a.max() >= s["cardinality"]):
                    raise RequestError(f"user feature {s['name']!r} has codes outside "
                                       f"[0, {s['cardinality'] - 1}] (0 = unknown)")
        if not b:
            raise RequestError("empty batch: pass at least one user")
        return int(b)

    def _feature_dtype(self, s) -> Any:
        return np.float32 if s["kind"] == "numeric" else np.int32

    # --- one bucket's inputs ---------------------------------------------------------------
    def filters_for(self, filter, b: int) -> list | None:
        """Normalises ``filter`` to a list of B filters, or None when nothing is filtered."""
        fl, per_user = split_filters(filter)          # FilterError: not a filter or a list
        if not per_user:
            fl = fl * b
        elif len(fl) != b:
            raise RequestError(f"got {len(fl)} filters for {b} users")
        if not fl or matches_everything(fl):           # no users, or all match everything
            return None
        if self.filter_schema is None:
            raise RequestError("this bundle was published without item attributes: "
                               "filters are not available")
        return ["*" if f is None else f for f in fl]

    def inputs(self, features: Mapping, filters: list | None, exclude: list | None,
               bucket: int, exclude_width: int, always_filter: bool = False) -> dict:
        """Padded inputs of one bucket (rows beyond B repeat row 0; their results are cut).

        ``exclude``: per user a sequence of item ids, or None. ``exclude_width`` E > 0 adds
        ``exclude i32[bucket, E]``. ``always_filter`` compiles a match-all program when
        ``filters`` is None (exported graphs always take a program).
        """
        b = len(next(iter(features.values())))
        pad = bucket - b
        out = {}
        for s in self.user_specs:
            a = np.asarray(features[s["name"]]).astype(self._feature_dtype(s))
            out[f"user/{s['name']}"] = np.concatenate([a, np.repeat(a[:1], pad, 0)], 0)
        if filters is None and always_filter:
            filters = ["*"] * b
        if filters is not None:
            fl = list(filters) + [filters[0]] * pad
            prog = compile_filter(self.filter_schema, fl, batch_size=bucket)
            out.update({"filter/ops": prog.ops, "filter/rowids": prog.rowids,
                        "filter/terms": prog.terms, "filter/lengths": prog.lengths})
        if exclude_width:
            ex = np.full((bucket, exclude_width), -1, np.int32)
            if exclude is not None:
                lists = [np.asarray(e).reshape(-1) if np.size(e) else np.zeros(0, np.int64)
                         for e in exclude]
                lens = np.array([e.size for e in lists], np.int64)
                if lens.max(initial=0) > exclude_width:
                    raise RequestError(f"a user excludes {int(lens.max())} items; this graph "
                                       f"takes at most {exclude_width}")
                flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
                rows = self.row_of_pos[self.positions_of(flat, "excluded")]
                user = np.repeat(np.arange(len(lists)), lens)
                col = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
                ex[user, col] = rows
            out["exclude"] = ex
        return out

    def exclude_width(self, exclude: list | None, b: int) -> int:
        """E bucket for a request: 0 (no exclusions) or a power of two >= 16."""
        if exclude is None:
            return 0
        if len(exclude) != b:
            raise RequestError(f"exclude has {len(exclude)} entries for {b} users")
        n = max((np.asarray(e).size for e in exclude), default=0)
        if n == 0:
            return 0
        return max(MIN_EXCLUDE, 1 << (n - 1).bit_length())

    def result(self, out: Mapping, b: int, k: int) -> Recommendations:
        o = {key: np.asarray(v)[:b] for key, v in out.items()}
        return Recommendations(ids=o["ids"][:, :k], scores=o["scores"][:, :k],
                               task_scores=o["task_scores"][:, :k],
                               count=np.minimum(o["count"], k).astype(np.int32),
                               num_candidates=o["num_candidates"], path=o["path"],
                               tasks=self.tasks)


def concat_results(parts: list[Recommendations]) -> Recommendations:
    if len(parts) == 1:
        return parts[0]
    return Recommendations(*(np.concatenate([getattr(p, f.name) for p in parts], 0)
                             for f in dataclasses.fields(Recommendations)[:-1]),
                           tasks=parts[0].tasks)
