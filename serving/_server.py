"""The HTTP endpoint of a bundle: a JSON API on Starlette + uvicorn (``st-jax serve``).

    st-jax serve bundles/ml100k --port 8080 [--host 127.0.0.1 --max-batch 128
                                              --max-wait-ms 2 --queue 1024]

Endpoints (all JSON; errors are ``{"error": message}`` with a 4xx/5xx status):

``POST /v1/recommend``
    ``{"users": [42, 7]}`` (ids of the bundle's user table) or ``{"features": {field: [...]}}``
    (raw user features, one row per user; a ``multi`` field is a list of lists, padded with 0
    to the schema's ``max_len`` when shorter), plus optional ``"filter"`` (one string for
    every user, or a list with one string/null per user), ``"k"`` (default 10) and
    ``"exclude_seen"`` (default true; users form only). Response::

        {"results": [{"user": 42, "items": [{"id", "title", "score", "tasks": {task: p}}]}],
         "bundle_version": "v000003", "took_ms": 3.1}

    (the features form gives ``"row": i`` instead of ``"user"``).
``POST /v1/items``
    ``{"add": [{"id", "features", "attributes"?, "title"?}], "update": [{"id", "features"?,
    "attributes"?}], "delete": [ids]}`` -> the retriever's item-update API, applied in the
    order add, update, delete; responds ``{"applied": {...}, "fresh": stats}``.
``POST /v1/admin/reload``
    Loads the version ``BUNDLE/CURRENT`` names (``{"force": true}``: even if it is the one
    served), warms it up and swaps it in; in-flight batches finish on the old version.
``POST /v1/admin/compact``
    Folds the item updates into a new bundle version and swaps to it; responds with the
    reload report plus ``"compacted"`` (the version) and ``"compaction_s"``.
``GET /healthz``, ``GET /metrics``
    200 + bundle version (503 while the first version loads); Prometheus text format.

Micro-batching (:mod:`serving._batcher`): concurrent recommend requests share one retriever
call of up to ``max_batch`` users (waiting at most ``max_wait_ms``), run in a worker thread;
users of one batch may have different filters and k (the batch runs with the largest k and
each request's results are cut to its own). A full queue answers 503.

Hot swap: ``BUNDLE/CURRENT`` is polled every ``poll_s`` seconds (and ``/v1/admin/reload``);
the new version is loaded and warmed in a background thread, then the served reference is
replaced in one assignment.

Item updates (``/v1/items``) live in the served retriever's fresh index and, by default
(``durable``), in the bundle's journal (:mod:`serving._journal`): each is fsynced before it
is applied and acknowledged. A restart replays them; a reload replays those the new version
has not folded in, including the ones acknowledged while it loaded (caught up under the
items lock right before the swap). ``POST /v1/admin/compact`` folds them into a new version
(``serving.compact``, atomic) and swaps to it; a crash at any point leaves the previous
version, and the journal, to the next start. A version published from a catalogue
(``serving.publish``) supersedes the updates acknowledged before it started; the reload
response and the log say how many.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from serving._batcher import Batcher, QueueFullError, ShuttingDownError
from serving._host import RequestError, UnknownUserError, bucket_for
from serving._store import CURRENT, StoreError
from st_jax._filter_lang import FilterError, parse_filter

log = logging.getLogger("serving.server")

MAX_K_DEFAULT = 1000
RECOMMEND_FIELDS = ("users", "features", "filter", "k", "exclude_seen")
ITEMS_FIELDS = ("add", "update", "delete")


# ============================================================================ configuration

@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Serving options.

    Attributes:
      bundle: bundle directory (``BUNDLE/CURRENT`` names the live version).
      max_batch: users per retriever call; max_wait_ms: batching window.
      queue: recommend requests that may wait (one more gets 503).
      max_users: users one request may ask for (more: 413).
      max_k: largest ``k`` accepted.
      poll_s: seconds between checks of ``BUNDLE/CURRENT`` (0: only ``/v1/admin/reload``).
      retriever_kw: passed to ``serving.Retriever.load`` (``buckets``, ``fresh_capacity``...).
      warmup_filters: filters compiled during warm-up (besides no filter).
      durable: journal every ``/v1/items`` update in the bundle (fsynced) before it is
        applied and acknowledged, so restarts and reloads keep it (``serving._journal``);
        False keeps updates in memory only (a restart or reload loses them).
      auto_compact: compact in the background (as ``POST /v1/admin/compact``) once this
        fraction of the fresh index's slots is used, so updates never run into a full fresh
        index while compaction keeps up (0: only on request).
    """

    bundle: str
    max_batch: int = 128
    max_wait_ms: float = 2.0
    queue: int = 1024
    max_users: int = 1024
    max_k: int = MAX_K_DEFAULT
    poll_s: float = 5.0
    retriever_kw: Mapping = dataclasses.field(default_factory=dict)
    warmup_filters: tuple[str, ...] = ()
    durable: bool = True
    auto_compact: float = 0.8

    def __post_init__(self):
        if not 0.0 <= self.auto_compact <= 1.0:
            raise ValueError(f"auto_compact must be a fraction in [0, 1] (0: off); got "
                             f"{self.auto_compact!r}")


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


# ============================================================================ metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = next((j for j, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip(self.bounds + (math.inf,), self.counts):
            acc += c
            le = "+Inf" if b == math.inf else repr(float(b))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum!r}", f"{name}_count{lab} {self.n}"]
        return out


class Metrics:
    """Counters and histograms of the server, rendered in the Prometheus text format."""

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        bs, b = [], 1
        while b < max_batch:
            bs.append(b)
            b *= 2
        self.batch_size = _Histogram(bs + [max_batch])
        self.batch_requests = _Histogram(bs + [max_batch])
        self.batch_seconds = _Histogram(LATENCY_BUCKETS)
        self.reloads: dict[str, int] = defaultdict(int)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, num_requests: int, num_users: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(num_users)
            self.batch_requests.observe(num_requests)
            self.batch_seconds.observe(seconds)

    def reload(self, result: str) -> None:
        with self._lock:
            self.reloads[result] += 1

    def render(self, gauges: Mapping[str, tuple[str, Mapping[str, float]]]) -> str:
        """``gauges``: ``{name: (help, {label text: value})}`` read at scrape time."""
        with self._lock:
            out = ["# HELP st_requests_total HTTP requests by endpoint and status.",
                   "# TYPE st_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'st_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP st_request_seconds HTTP request latency by endpoint.",
                    "# TYPE st_request_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("st_request_seconds", f'endpoint="{ep}"')
            for name, h, help_ in (
                    ("st_batch_size", self.batch_size, "Users per retriever call."),
                    ("st_batch_requests", self.batch_requests, "Requests per retriever call."),
                    ("st_batch_seconds", self.batch_seconds, "Seconds per retriever call.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + h.lines(name)
            out += ["# HELP st_reloads_total Bundle reloads by result.",
                    "# TYPE st_reloads_total counter"]
            for res, n in sorted(self.reloads.items()):
                out.append(f'st_reloads_total{{result="{res}"}} {n}')
        for name, (help_, values) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            for lab, v in values.items():
                out.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")
        return "\n".join(out) + "\n"


# ============================================================================ batch execution

@dataclasses.dataclass
class RecommendJob:
    """One parsed recommend request.

    ``users``: list of U user ids, or None; ``features``: ``{field: array [U, ...]}`` or None;
    ``filters``: None or a list of U filters (str or None); ``k``; ``exclude_seen``.
    """

    users: list[int] | None
    features: dict[str, np.ndarray] | None
    filters: list | None
    k: int
    exclude_seen: bool

    @property
    def size(self) -> int:
        if self.users is not None:
            return len(self.users)
        return len(next(iter(self.features.values())))


def _resolve(retriever, job: RecommendJob):
    """-> (features [U, ...], exclude list of U id arrays or None); RequestError if bad."""
    host = retriever.host
    if job.users is not None:
        rows = host.user_rows(job.users)
        feats = host.user_features(rows)
        return feats, (host.seen_items(rows) if job.exclude_seen else None)
    host.check_user_features(job.features)
    return job.features, None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _format(retriever, out, lo: int, job: RecommendJob) -> list[dict]:
    """JSON results of rows ``lo .. lo + U`` of a batch's Recommendations, cut to ``job.k``."""
    res = []
    tasks = list(out.tasks)
    for r in range(job.size):
        b = lo + r
        items = []
        for j in range(min(int(out.count[b]), job.k)):
            i = int(out.ids[b, j])
            if i < 0:
                continue
            items.append({"id": i, "title": retriever.title(i),
                          "score": _finite(float(out.scores[b, j])),
                          "tasks": {t: _finite(float(p))
                                    for t, p in zip(tasks, out.task_scores[b, j])}})
        key = {"user": int(job.users[r])} if job.users is not None else {"row": r}
        res.append({**key, "items": items})
    return res


def _run_together(retriever, jobs: list[RecommendJob], resolved: list) -> list[list[dict]]:
    feats = {f: np.concatenate([np.asarray(r[0][f]) for r in resolved], 0)
             for f in resolved[0][0]}
    sizes = [j.size for j in jobs]
    if all(j.filters is None for j in jobs):
        filters = None
    else:
        filters = [f for j, n in zip(jobs, sizes) for f in (j.filters or [None] * n)]
    if all(r[1] is None for r in resolved):
        exclude = None
    else:
        empty = np.zeros(0, np.int64)
        exclude = [e for r, n in zip(resolved, sizes) for e in (r[1] or [empty] * n)]
    out = retriever(feats, filter=filters, k=k_bucket(max(j.k for j in jobs)), exclude=exclude)
    offsets = np.cumsum([0] + sizes)
    return [_format(retriever, out, int(lo), j) for lo, j in zip(offsets, jobs)]


def k_bucket(k: int) -> int:
    """The k a batch runs with: the next power of two >= max(k, 16), so batches mixing
    different k reuse a few compiled graphs (each request's results are cut to its own k;
    only ties at the cut may order differently from a call with that exact k)."""
    return max(16, 1 << (int(k) - 1).bit_length())


def warmup_filter(retriever) -> str | None:
    """A filter on a real term of the bundle (compiles the filtered graph), or None."""
    fs = getattr(retriever.host, "filter_schema", None)
    if fs is None:
        return None
    for field, vocab in fs.vocab.items():
        for value in vocab:
            text = f"NOT {field}:{value}"
            if re.fullmatch(r"[A-Za-z0-9_.-]+", str(value)) and re.fullmatch(r"[A-Za-z_]\w*",
                                                                             str(field)):
                try:
                    parse_filter(text)
                    return text
                except FilterError:
                    pass
    return None


def run_batch(retriever, jobs: list[RecommendJob]) -> list:
    """One retriever call for all ``jobs`` (per-user filters, the largest k, exclusions);
    returns per job its JSON results or the exception that job alone raises. If the joint
    call fails (e.g. one request's filter names an unknown field), each job is retried alone
    so one bad request never fails the others."""
    outcomes: list[Any] = [None] * len(jobs)
    ok, resolved = [], []
    for i, job in enumerate(jobs):
        try:
            resolved.append(_resolve(retriever, job))
            ok.append(i)
        except Exception as e:  # noqa: BLE001 - that request's own error
            outcomes[i] = e
    if not ok:
        return outcomes
    try:
        for i, res in zip(ok, _run_together(retriever, [jobs[i] for i in ok], resolved)):
            outcomes[i] = res
    except Exception as e:  # noqa: BLE001
        if len(ok) == 1:
            outcomes[ok[0]] = e
        else:
            for i, r in zip(ok, resolved):
                try:
                    outcomes[i] = _run_together(retriever, [jobs[i]], [r])[0]
                except Exception as e1:  # noqa: BLE001
                    outcomes[i] = e1
    return outcomes


def warm_up(retriever, max_batch: int, filters: Sequence[str] = ()) -> None:
    """Compiles the graph for every batch bucket up to ``max_batch`` (k=16, the smallest
    :func:`k_bucket`; no filter, a filter on one of the bundle's terms, and each of
    ``filters``) so the first requests after a (re)load do not wait for XLA."""
    host = retriever.host
    auto = warmup_filter(retriever)
    filters = ([auto] if auto else []) + list(filters)
    buckets = [b for b in retriever.buckets if b <= bucket_for(min(max_batch,
                                                                   max(retriever.buckets)),
                                                               retriever.buckets)]
    for b in buckets:
        if host.users is not None:
            ids = np.asarray(host.users["ids"])
            ids = ids[np.arange(b) % len(ids)]
            for f in (None, *filters):
                retriever.recommend(ids, filter=f, k=k_bucket(1))
        else:
            feats = {s["name"]: (np.zeros((b, s["max_len"]), np.int32) if s["kind"] == "multi"
                                 else np.zeros(b, np.float32 if s["kind"] == "numeric"
                                               else np.int32))
                     for s in host.user_specs}
            for f in (None, *filters):
                retriever(feats, filter=f, k=k_bucket(1))


def version_of(retriever) -> str:
    """The version directory name of a loaded retriever (e.g. ``"v000002"``)."""
    return os.path.basename(os.path.normpath(str(retriever.path)))


def read_current(bundle: str) -> str | None:
    """The version ``BUNDLE/CURRENT`` names, or None if unreadable (mid-write, missing)."""
    try:
        with open(os.path.join(bundle, CURRENT)) as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ============================================================================ request parsing

def _check_int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise HTTPError(400, f"{name!r} must be an integer in [{lo}, {hi}]; got {v!r}")
    return v


def _json_object(body: bytes, allowed: Sequence[str], what: str) -> dict:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise HTTPError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, f"the body must be a JSON object with fields {list(allowed)}; "
                             f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unknown fields {unknown} in {what}; allowed: {list(allowed)}")
    return obj


def _ids(name: str, v) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                          for i in v):
        raise HTTPError(400, f"{name!r} must be a list of integer ids; got {v!r}"[:300])
    return v


def feature_array(field: str, value, spec: Mapping | None) -> np.ndarray:
    """A JSON feature column -> array ``[N]`` or ``[N, max_len]`` (ragged multi-valued rows
    are padded with 0, the padding code; longer rows are refused)."""
    if not isinstance(value, list):
        raise HTTPError(400, f"feature {field!r} must be a list with one entry per row; got "
                             f"{type(value).__name__}")
    if spec is not None and spec.get("kind") == "multi":
        width = int(spec["max_len"])
        rows = []
        for r, row in enumerate(value):
            if not isinstance(row, list):
                raise HTTPError(400, f"multi-valued feature {field!r}: row {r} must be a list "
                                     f"of codes; got {row!r}"[:300])
            if len(row) > width:
                raise HTTPError(400, f"multi-valued feature {field!r}: row {r} has {len(row)} "
                                     f"codes, at most {width} (max_len)")
            rows.append(list(row) + [0] * (width - len(row)))
        value = rows
    try:
        a = np.asarray(value)
    except ValueError as e:
        raise HTTPError(400, f"feature {field!r} is not a rectangular array: {e}") from None
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise HTTPError(400, f"feature {field!r} must hold numbers; got {a.dtype} values")
    if a.dtype.kind == "b":
        raise HTTPError(400, f"feature {field!r} must hold numbers, not booleans")
    return a


def parse_recommend(obj: dict, *, specs: Sequence[Mapping], max_users: int,
                    max_k: int) -> RecommendJob:
    """Validates a recommend body (the JSON object) -> :class:`RecommendJob`."""
    if ("users" in obj) == ("features" in obj):
        raise HTTPError(400, "pass exactly one of 'users' (user ids) or 'features' "
                             "({field: [one value per user]})")
    k = _check_int("k", obj.get("k", 10), 1, max_k)
    users = features = None
    if "users" in obj:
        users = _ids("users", obj["users"])
        n = len(users)
        ex = obj.get("exclude_seen", True)
        if not isinstance(ex, bool):
            raise HTTPError(400, f"'exclude_seen' must be true or false; got {ex!r}")
    else:
        if "exclude_seen" in obj:
            raise HTTPError(400, "'exclude_seen' applies to the 'users' form only (raw "
                                 "features have no interaction history)")
        ex = False
        f = obj["features"]
        if not isinstance(f, dict) or not f:
            raise HTTPError(400, "'features' must be an object {field: [one value per user]}")
        by_name = {s["name"]: s for s in specs}
        features = {name: feature_array(name, v, by_name.get(name)) for name, v in f.items()}
        lens = {name: a.shape[0] if a.ndim else -1 for name, a in features.items()}
        n = max(lens.values())
    if n == 0:
        raise HTTPError(400, "empty request: pass at least one user")
    if n > max_users:
        raise HTTPError(413, f"{n} users in one request; this server takes at most "
                             f"{max_users} (split the request)")
    filt = obj.get("filter")
    filters = None
    if filt is not None:
        if isinstance(filt, str):
            filters = [filt] * n
        elif isinstance(filt, list) and all(x is None or isinstance(x, str) for x in filt):
            if len(filt) != n:
                raise HTTPError(400, f"'filter' has {len(filt)} entries for {n} users (pass one "
                                     "string for all users, or one per user)")
            filters = list(filt)
        else:
            raise HTTPError(400, "'filter' must be a string or a list of strings/nulls (one "
                                 "per user)")
        for f in set(filters) - {None}:
            parse_filter(f)                       # syntax errors now, with their column
    return RecommendJob(users, features, filters, k, ex)


def _item_features(items: list[dict], specs: Sequence[Mapping], what: str) -> dict | None:
    fields = [set(it["features"]) if it.get("features") is not None else None for it in items]
    if all(f is None for f in fields):
        return None
    if any(f is None for f in fields) or any(f != fields[0] for f in fields):
        raise HTTPError(400, f"{what}: every item must give the same feature fields")
    by_name = {s["name"]: s for s in specs}
    return {name: feature_array(name, [it["features"][name] for it in items], by_name.get(name))
            for name in sorted(fields[0])}


def _item_attributes(items: list[dict], what: str) -> dict | None:
    fields = [set(it["attributes"]) if it.get("attributes") is not None else None
              for it in items]
    if all(f is None for f in fields):
        return None
    if any(f is None for f in fields) or any(f != fields[0] for f in fields):
        raise HTTPError(400, f"{what}: every item must give the same attribute fields")
    return {name: [it["attributes"][name] for it in items] for name in sorted(fields[0])}


def _item_list(obj: dict, key: str, allowed: set[str], required: set[str]) -> list[dict]:
    items = obj.get(key, [])
    if not isinstance(items, list):
        raise HTTPError(400, f"{key!r} must be a list of objects")
    for n, it in enumerate(items):
        if not isinstance(it, dict):
            raise HTTPError(400, f"{key}[{n}] must be an object with fields {sorted(allowed)}")
        bad = sorted(set(it) - allowed)
        if bad:
            raise HTTPError(400, f"unknown fields {bad} in {key}[{n}]; allowed: "
                                 f"{sorted(allowed)}")
        miss = sorted(required - set(it))
        if miss:
            raise HTTPError(400, f"{key}[{n}] lacks {miss}")
        _check_int(f"{key}[{n}].id", it["id"], -(2 ** 63), 2 ** 63 - 1)
        for f in ("features", "attributes"):
            if it.get(f) is not None and not isinstance(it[f], dict):
                raise HTTPError(400, f"{key}[{n}].{f} must be an object {{field: value}}")
    return items


# ============================================================================ the server

@dataclasses.dataclass(frozen=True)
class _Live:
    """What one batch reads (replaced as one reference on reload)."""

    retriever: Any
    version: str


def _default_loader(config: ServerConfig) -> Callable[[str], Any]:
    def load(bundle: str):
        from serving._retriever import Retriever
        return Retriever.load(bundle, **{"durable": config.durable, **config.retriever_kw})
    return load


def _swap_report(old, new) -> dict:
    """What a swap from retriever ``old`` to ``new`` does to the item updates ``old`` served."""
    if old is None or not hasattr(old, "fresh_stats"):
        return {}
    st = old.fresh_stats()
    data = getattr(new, "data", None)
    source = data.manifest["index"].get("compacted_from") if data is not None else None
    folded_old = source is not None and source == os.path.basename(getattr(old, "path", ""))
    out = {}
    if not st.get("durable", False) and not folded_old:     # in memory only: not carried
        out["item_updates_discarded"] = int(st.get("updates", 0) - st.get("replayed", 0))
    base, seq = getattr(old, "journal_seq", 0), getattr(new, "journal_seq", 0)
    if seq > base:
        out["item_updates_folded" if source else "item_updates_superseded"] = seq - base
    return out


class Server:
    """The API over one bundle; ``server.app`` is the Starlette application.

    Args:
      config: :class:`ServerConfig`.
      loader: ``loader(bundle_dir) -> retriever`` (default ``serving.Retriever.load`` with
        ``config.retriever_kw``); anything with the ``Retriever`` interface works (tests).
    """

    def __init__(self, config: ServerConfig, loader: Callable[[str], Any] | None = None):
        self.config = config
        self.loader = loader or _default_loader(config)
        self.metrics = Metrics(config.max_batch)
        self._live: _Live | None = None
        self._load_error: str | None = None
        self._reloading = False
        self._reload_lock: asyncio.Lock | None = None
        self._items_lock: asyncio.Lock | None = None
        self._compact_lock: asyncio.Lock | None = None
        self._batch_pool = ThreadPoolExecutor(1, thread_name_prefix="st-batch")
        self._items_pool = ThreadPoolExecutor(1, thread_name_prefix="st-items")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="st-load")
        self.batcher = Batcher(self._process, max_batch=config.max_batch,
                               max_wait_s=config.max_wait_ms / 1e3, queue_size=config.queue,
                               executor=self._batch_pool, on_batch=self.metrics.batch)
        self._tasks: list[asyncio.Task] = []
        self.app = Starlette(routes=[
            Route("/v1/recommend", self._endpoint("recommend", self.recommend), methods=["POST"]),
            Route("/v1/items", self._endpoint("items", self.items), methods=["POST"]),
            Route("/v1/admin/reload", self._endpoint("reload", self.reload), methods=["POST"]),
            Route("/v1/admin/compact", self._endpoint("compact", self.compact),
                  methods=["POST"]),
            Route("/healthz", self._endpoint("healthz", self.healthz), methods=["GET"]),
            Route("/metrics", self._endpoint("metrics", self.metrics_text), methods=["GET"]),
        ], lifespan=self._lifespan)

    # --- lifecycle ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self._reload_lock = asyncio.Lock()
        self._items_lock = asyncio.Lock()
        self._compact_lock = asyncio.Lock()
        self.batcher.start()
        self._tasks = [asyncio.create_task(self._initial_load(), name="initial-load")]
        if self.config.poll_s > 0:
            self._tasks.append(asyncio.create_task(self._poll(), name="poll-current"))
        try:
            yield
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.batcher.stop()
            pools = (self._batch_pool, self._items_pool, self._load_pool)
            for pool in pools:
                pool.shutdown(wait=False, cancel_futures=True)     # queued jobs: dropped
            # jobs already running (a warm-up, a batch) hand their results back through this
            # event loop: let them finish while it still runs, not call into a closed loop
            # from their threads (the interpreter would wait for them at exit anyway)
            await asyncio.to_thread(lambda: [pool.shutdown(wait=True) for pool in pools])

    def _load_and_warm(self) -> _Live:
        t = time.perf_counter()
        r = self.loader(self.config.bundle)
        if hasattr(r, "enable_fresh"):       # the first item update then compiles nothing
            r.enable_fresh()
        warm_up(r, self.config.max_batch, self.config.warmup_filters)
        live = _Live(r, version_of(r))
        log.info("loaded and warmed bundle %s version %s in %.1f s", self.config.bundle,
                 live.version, time.perf_counter() - t)
        return live

    async def _initial_load(self) -> None:
        async with self._reload_lock:
            self._reloading = True
            try:
                self._live = await asyncio.get_running_loop().run_in_executor(
                    self._load_pool, self._load_and_warm)
                self._load_error = None
                self.metrics.reload("initial")
            except Exception as e:  # noqa: BLE001 - reported by /healthz; polling retries
                log.exception("loading bundle %s failed", self.config.bundle)
                self._load_error = f"{type(e).__name__}: {e}"
                self.metrics.reload("failed")
            finally:
                self._reloading = False

    async def _poll(self) -> None:
        """Reloads when ``CURRENT`` names another version; a version that failed to load is
        not retried by polling (``/v1/admin/reload`` retries it) until ``CURRENT`` changes."""
        failed = None
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                v = read_current(self.config.bundle)
                live = self._live
                if v is not None and v != failed and (live is None or v != live.version) \
                        and not self._reload_lock.locked():
                    log.info("%s names version %s (serving %s): reloading", CURRENT, v,
                             live.version if live else None)
                    try:
                        await self.do_reload(force=False)
                    except HTTPError:                 # logged by do_reload
                        failed = v
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep polling
                log.exception("polling %s failed", self.config.bundle)

    async def do_reload(self, force: bool, items_held: bool = False) -> dict:
        """Loads + warms what ``CURRENT`` names and swaps it in; returns a report.
        ``items_held``: the caller holds the items lock (no update may run until the swap)."""
        async with self._reload_lock:
            old = self._live
            on_disk = read_current(self.config.bundle)
            if not force and old is not None and on_disk == old.version:
                return {"reloaded": False, "bundle_version": old.version,
                        "reason": f"{CURRENT} names the version already served"}
            self._reloading = True
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    self._load_pool, self._load_and_warm)
            except Exception as e:
                self.metrics.reload("failed")
                log.exception("reload of %s failed; still serving %s", self.config.bundle,
                              old.version if old else None)
                raise HTTPError(500 if not isinstance(e, StoreError) else 409,
                                f"reload failed, still serving "
                                f"{old.version if old else 'nothing'}: "
                                f"{type(e).__name__}: {e}") from None
            finally:
                self._reloading = False
            async with (contextlib.nullcontext() if items_held else self._items_lock):
                # no item update straddles the swap
                try:                                  # updates journaled while it loaded
                    caught = await asyncio.get_running_loop().run_in_executor(
                        self._items_pool, getattr(new.retriever, "catch_up", lambda: 0))
                except Exception as e:
                    self.metrics.reload("failed")
                    log.exception("replaying the journal onto %s failed; still serving %s",
                                  new.version, old.version if old else None)
                    raise HTTPError(500, f"reload failed, still serving "
                                         f"{old.version if old else 'nothing'}: "
                                         f"{type(e).__name__}: {e}") from None
                report = _swap_report(old.retriever if old else None, new.retriever)
                self._live = new
                self._load_error = None
            self.metrics.reload("ok")
            if report.get("item_updates_discarded"):
                log.warning("reload to %s discarded %d in-memory item updates (the server "
                            "runs with durable=False)", new.version,
                            report["item_updates_discarded"])
            if report.get("item_updates_superseded"):
                log.warning("version %s was published from a catalogue: it supersedes %d "
                            "journaled item updates made before the publish",
                            new.version, report["item_updates_superseded"])
            return {"reloaded": True, "bundle_version": new.version,
                    "previous_version": old.version if old else None,
                    "item_updates_replayed": int(getattr(new.retriever, "replayed", 0)),
                    "item_updates_caught_up": int(caught or 0), **report}

    async def compact(self, request: Request, t0: float):
        rep = await self.do_compact()
        return JSONResponse({**rep, "took_ms": round((time.perf_counter() - t0) * 1e3, 3)})

    async def do_compact(self) -> dict:
        """Folds the served fresh index (item updates) into a new bundle version, then swaps
        to it. Updates keep flowing while it runs (durable: they are journaled and replayed
        on the new version; not durable: they wait until the swap)."""
        from serving._bundle import compact as compact_bundle
        live = self._require_live()
        if not hasattr(live.retriever, "add_items"):
            raise HTTPError(501, "this retriever has no item-update API")
        if self._compact_lock.locked():
            raise HTTPError(409, "a compaction is already running")
        async with self._compact_lock:
            loop = asyncio.get_running_loop()
            hold = None if self.config.durable else self._items_lock
            async with (hold or contextlib.nullcontext()):
                live = self._require_live()
                t = time.perf_counter()
                try:
                    path = await loop.run_in_executor(self._load_pool, compact_bundle,
                                                      live.retriever)
                except Exception as e:
                    log.exception("compaction of %s failed; still serving %s",
                                  self.config.bundle, live.version)
                    raise HTTPError(500, f"compaction failed, still serving {live.version}: "
                                         f"{type(e).__name__}: {e}") from None
                written = time.perf_counter() - t
                rep = await self.do_reload(force=False, items_held=hold is not None)
            return {**rep, "compacted": os.path.basename(path), "compaction_s": round(written, 3)}

    def _maybe_auto_compact(self, stats: Mapping) -> None:
        """Starts a background compaction once the fresh index is ``auto_compact`` full."""
        frac = self.config.auto_compact
        cap = stats.get("capacity") or 0
        if not frac or not cap or stats.get("used", 0) < frac * cap \
                or self._compact_lock.locked():
            return

        async def run():
            try:
                rep = await self.do_compact()
                log.info("auto-compaction at %d/%d fresh slots: now serving %s", stats["used"],
                         cap, rep["bundle_version"])
            except HTTPError as e:               # another one started first, or it failed
                log.warning("auto-compaction did not run: %s", e)
        self._tasks = [t for t in self._tasks if not t.done()]      # finished compactions
        self._tasks.append(asyncio.create_task(run(), name="auto-compact"))

    # --- plumbing -----------------------------------------------------------------------------
    def _endpoint(self, name: str, handler):
        async def run(request: Request):
            t = time.perf_counter()
            try:
                resp = await handler(request, t)
            except HTTPError as e:
                resp = JSONResponse({"error": str(e), **e.extra}, status_code=e.status)
            except Exception as e:  # noqa: BLE001
                status, body = self._map_error(e)
                if status == 500:
                    log.exception("%s failed", name)
                resp = JSONResponse(body, status_code=status)
            self.metrics.request(name, resp.status_code, time.perf_counter() - t)
            return resp
        return run

    @staticmethod
    def _map_error(e: Exception) -> tuple[int, dict]:
        from serving._journal import JournalError
        from st_jax._fresh import DuplicateIdError, IndexFullError, UnknownIdError
        if isinstance(e, FilterError):
            return 400, {"error": f"bad filter: {e}", "column": e.column, "field": e.field}
        if isinstance(e, UnknownUserError):
            return 404, {"error": str(e)}
        if isinstance(e, (QueueFullError, ShuttingDownError)):
            return 503, {"error": str(e)}
        if isinstance(e, DuplicateIdError):
            return 409, {"error": str(e)}
        if isinstance(e, UnknownIdError):
            return 404, {"error": str(e)}
        if isinstance(e, IndexFullError):
            return 409, {"error": f"{e} (the fresh index is full: republish the bundle with "
                                  "the new items, or load with a larger fresh_capacity)"}
        if isinstance(e, RequestError):
            return 400, {"error": str(e)}
        if isinstance(e, JournalError):
            return 503, {"error": f"the update journal is unavailable, nothing was applied: {e}"}
        return 500, {"error": f"internal error ({type(e).__name__}: {e}); the server keeps "
                              "running, see its log"}

    def _require_live(self) -> _Live:
        live = self._live
        if live is None:
            msg = ("the bundle is still loading" if self._load_error is None
                   else f"no bundle is loaded: {self._load_error}")
            raise HTTPError(503, msg + "; retry later")
        return live

    def _process(self, jobs: list[RecommendJob]) -> list:
        live = self._live                        # one reference for the whole batch
        outs = run_batch(live.retriever, jobs)
        return [o if isinstance(o, BaseException) else (o, live.version) for o in outs]

    # --- endpoints ----------------------------------------------------------------------------
    async def recommend(self, request: Request, t0: float):
        live = self._require_live()
        obj = _json_object(await request.body(), RECOMMEND_FIELDS, "a recommend request")
        job = parse_recommend(obj, specs=live.retriever.host.user_specs,
                              max_users=self.config.max_users, max_k=self.config.max_k)
        results, version = await self.batcher.submit(job, job.size)
        return JSONResponse({"results": results, "bundle_version": version,
                             "took_ms": round((time.perf_counter() - t0) * 1e3, 3)})

    async def items(self, request: Request, t0: float):
        live = self._require_live()
        obj = _json_object(await request.body(), ITEMS_FIELDS, "an items request")
        r = live.retriever
        if not hasattr(r, "add_items"):
            raise HTTPError(501, "this retriever has no item-update API")
        specs = [s.to_json() for s in r.schema.item] if hasattr(r, "schema") else []
        add = _item_list(obj, "add", {"id", "features", "attributes", "title"},
                         {"id", "features"})
        upd = _item_list(obj, "update", {"id", "features", "attributes"}, {"id"})
        dele = _ids("delete", obj.get("delete", []))
        if not (add or upd or dele):
            raise HTTPError(400, "nothing to do: pass 'add', 'update' and/or 'delete'")
        steps: list[tuple[str, Callable[[], dict]]] = []
        if add:
            ids = [it["id"] for it in add]
            feats = _item_features(add, specs, "add")
            attrs = _item_attributes(add, "add")
            titles = ([str(it.get("title", it["id"])) for it in add]
                      if any("title" in it for it in add) else None)
            steps.append(("added", lambda: r.add_items(ids, feats, attrs, titles)))
        # updates: one call per group of items giving the same feature/attribute fields
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for it in upd:
            groups[(it.get("features") is not None,
                    tuple(sorted(it.get("attributes") or ())))].append(it)
        for (has_f, attr_fields), its in groups.items():
            if not has_f and not attr_fields:
                raise HTTPError(400, f"update of item {its[0]['id']} gives neither "
                                     "'features' nor 'attributes'")
            ids_u = [it["id"] for it in its]
            f_u = _item_features(its, specs, "update") if has_f else None
            a_u = _item_attributes(its, "update") if attr_fields else None
            steps.append(("updated", lambda i=ids_u, f=f_u, a=a_u: r.update_items(i, f, a)))
        if dele:
            steps.append(("deleted", lambda: r.delete_items(dele)))
        applied: dict[str, list] = {"added": [], "updated": [], "deleted": []}
        loop = asyncio.get_running_loop()
        async with self._items_lock:
            if self._live is not live:
                raise HTTPError(503, "the bundle was reloaded while this request was parsed; "
                                     "retry")
            for n, (kind, fn) in enumerate(steps):
                try:
                    rep = await loop.run_in_executor(self._items_pool, fn)
                except Exception as e:  # noqa: BLE001
                    status, body = self._map_error(e) if not isinstance(e, HTTPError) else (
                        e.status, {"error": str(e)})
                    if status == 500:
                        log.exception("item update failed")
                    body["applied"] = applied      # what earlier steps already changed
                    body["failed_step"] = kind
                    return JSONResponse(body, status_code=status)
                applied[kind] += list(rep.get(kind, []))
        stats = r.fresh_stats() if hasattr(r, "fresh_stats") else {}
        self._maybe_auto_compact(stats)
        return JSONResponse({"applied": applied, "fresh": stats, "bundle_version": live.version,
                             "took_ms": round((time.perf_counter() - t0) * 1e3, 3)})

    async def reload(self, request: Request, t0: float):
        body = await request.body()
        obj = _json_object(body, ("force",), "a reload request") if body.strip() else {}
        force = obj.get("force", False)
        if not isinstance(force, bool):
            raise HTTPError(400, f"'force' must be true or false; got {force!r}")
        return JSONResponse(await self.do_reload(force))

    async def healthz(self, request: Request, t0: float):
        live = self._live
        if live is None:
            return JSONResponse({"status": "loading" if self._load_error is None else "error",
                                 "error": self._load_error}, status_code=503)
        fresh = None
        if hasattr(live.retriever, "fresh_stats"):
            with contextlib.suppress(Exception):
                fresh = live.retriever.fresh_stats()
        return JSONResponse({"status": "ok", "bundle_version": live.version,
                             "reloading": self._reloading, "fresh": fresh})

    async def metrics_text(self, request: Request, t0: float):
        live = self._live
        gauges = {"st_queue_depth": ("Recommend requests waiting for a batch.",
                                     {"": self.batcher.depth}),
                  "st_bundle_loaded": ("1 for the bundle version served.",
                                       {f'version="{live.version}"': 1} if live else {})}
        if live is not None and hasattr(live.retriever, "fresh_stats"):
            try:
                st = live.retriever.fresh_stats()
                gauges["st_fresh_items"] = (
                    "Fresh index: slots (capacity), written (used), live items (live).",
                    {f'state="{k}"': v for k, v in st.items()
                     if k in ("capacity", "used", "live")})
            except Exception:  # noqa: BLE001
                log.exception("fresh_stats failed")
        return PlainTextResponse(self.metrics.render(gauges),
                                 media_type="text/plain; version=0.0.4")


# ============================================================================ running

class ServerThread:
    """Runs a :class:`Server` under uvicorn in a background thread (tests, benchmarks).

        with ServerThread(Server(ServerConfig(bundle))) as s:
            httpx.get(s.url + "/healthz")
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn
        self.server = server
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._uv = uvicorn.Server(uvicorn.Config(server.app, log_level=log_level,
                                                 access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="uvicorn")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        t = time.monotonic()
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() - t > timeout:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Waits until the bundle is loaded and warm; returns its version."""
        t = time.monotonic()
        while self.server._live is None:
            if self.server._load_error is not None:
                raise RuntimeError(f"the bundle failed to load: {self.server._load_error}")
            if time.monotonic() - t > timeout:
                raise TimeoutError("the bundle did not load in time")
            time.sleep(0.05)
        return self.server._live.version

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Runs the server in the foreground until interrupted (``st-jax serve``)."""
    import uvicorn
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(Server(config).app, host=host, port=port, log_level=log_level,
                access_log=False)
