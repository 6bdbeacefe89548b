"""``Retriever``: a published bundle as one jitted retrieval graph (in process).

``Retriever.load(bundle_dir, mesh=Mesh(np.array(jax.devices()), ("items",)))`` serves the
same graph with the main index sharded over the mesh's item axis (``st_jax.shard_index``):
each device filters and scores its shard, the shards' top-k0 candidates (with their cache
rows) are merged globally, and the user tower, filters, fresh index, OverArch and Value
Model run replicated. Results equal the unsharded retriever. The published index then stays
in host memory (numpy: host-side look-ups, item updates, ``serving.compact``); devices hold
only their shard (item updates re-shard only the live words). A sharded retriever does not
export (``export`` says to export the bundle loaded without ``mesh``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serving import _journal as journal
from serving._bundle import BundleData, BundleError, check_model_matches, read_bundle
from serving._graph import MERGES, RANKS, GraphSpec, retrieval_graph
from serving._host import DEFAULT_BUCKETS, HostSide, RequestError, check_buckets, lookup
from serving._runner import Runner
from st_jax._shard import shard_index, shard_live
from st_jax._filter_lang import DEFAULT_STACK_DEPTH
from st_jax._persist import index_from_flat
from st_jax._search import check_max_nprobe, check_min_eligible_factor


def _dot_key(path) -> str:
    return ".".join(str(getattr(p, "name", getattr(p, "key", getattr(p, "idx", p))))
                    for p in path)


def flat_weights(tree, prefix: str, key_fn) -> tuple[dict, object, tuple[str, ...]]:
    """pytree -> ({prefix + key: leaf}, treedef, keys in leaf order)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = tuple(key_fn(p) for p, _ in leaves)
    return {prefix + k: v for k, (_, v) in zip(keys, leaves)}, treedef, keys


def _restore(template, flat: dict, key_fn):
    """Abstract parameter tree (ShapeDtypeStruct leaves) + ``{key: array}`` -> arrays, checking
    every shape (the bundle's arrays were already checked against its manifest)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, t in leaves:
        key = key_fn(p)
        if key not in flat:
            raise BundleError(f"the bundle lacks model parameter {key!r}")
        v = flat[key]
        if tuple(v.shape) != tuple(t.shape):
            raise BundleError(f"model parameter {key!r} has shape {v.shape}, the model "
                              f"architecture in the manifest expects {tuple(t.shape)}")
        out.append(jnp.asarray(v, t.dtype))
    extra = set(flat) - {key_fn(p) for p, _ in leaves}
    if extra:
        raise BundleError(f"the bundle has parameters the model lacks: {sorted(extra)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class _State:
    """What queries read (swapped as one reference): graph spec and jitted function, weights
    (model, main index, fresh store), the main index and fresh index, titles of fresh items,
    the number of updates applied since loading (journal replay included), the journal
    sequence number of the last update applied (the version's ``journal_seq`` if none), and
    the served sharded main index (None: unsharded)."""

    spec: GraphSpec
    fn: object
    weights: dict
    main: object
    fresh: object
    titles: dict
    updates: int
    seq: int
    sharded: object = None


def _item_apply(graph, params, features):
    return nnx.merge(graph, params)(features)


class Retriever(Runner):
    """A bundle served as one jitted function: user tower -> per-task filtered Int8 IVF top-k0
    -> task merge -> OverArch -> Value Model -> top-k.

    ``Retriever.load(bundle_dir)``; ``retriever(user_features, filter=..., k=10)`` or
    ``retriever.recommend(user_ids, filter=..., k=10)``. One compilation per batch bucket
    (and k, k0); new users and new filters reuse it. CPU runs the XLA twins, GPU the Pallas
    kernels (``backend="auto"``). With ``mesh=`` the main index is sharded over the mesh's
    item axis (module docstring); results equal the unsharded retriever.
    """

    def __init__(self, data: BundleData, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 nprobe: int | None = None, merge: str | None = None, rank: str = "overarch",
                 backend: str = "auto", min_eligible_factor: float = 16.0,
                 fresh_capacity: int = 4096, durable: bool = False, mesh=None,
                 item_axis: str | None = None, max_nprobe: int | None = None):
        from training import _io
        from training._config import TrainConfig
        from training._models import TwoTower, make_overarch
        from training._schema import FeatureSchema
        from training._trained import split_params
        from training._value_model import ValueModel

        m = data.manifest
        self.data = data
        self.path = data.path
        self.buckets = check_buckets(buckets)
        cfg = TrainConfig.from_json(m["model"]["config"])
        schema = FeatureSchema.from_json(m["model"]["schema"])
        tasks = tuple(m["model"]["tasks"])
        if merge is None:
            merge = m["serving"]["merge"]
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}; got {merge!r}")
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}; got {rank!r}")

        def make():
            rngs = nnx.Rngs(params=jax.random.key(0))
            return (TwoTower(schema.user, schema.item, len(tasks), cfg.tower, rngs=rngs),
                    make_overarch(len(tasks), cfg.tower.out_dim, cfg.overarch, rngs=rngs))

        tt, oa = nnx.eval_shape(make)          # structure only: no parameter allocation
        graphs, template = split_params(tt, oa)
        params = _restore(template, data.group("model"), _io._key)
        self.mesh, self.item_axis, sharded = mesh, item_axis, None
        # sharded: the full index stays in host memory, devices hold their shards only
        index = index_from_flat(data.group("index"), m["index"]["spec"], host=mesh is not None)
        wm, ptree, pkeys = flat_weights(params, "model/", _io._key)
        if mesh is None:
            wi, itree, ikeys = flat_weights(index, "index/", _dot_key)
            self.weights = jax.device_put({**wm, **wi})
        else:
            sharded = shard_index(index, mesh, item_axis)
            self.item_axis = sharded.axis
            wi, itree, ikeys = flat_weights(sharded, "index/", _dot_key)
            self.weights = {**self._replicated(wm), **wi}
        self.index = index
        self.value_model = ValueModel.parse(m["model"]["value_formula"], tasks)
        nc = m["index"]["num_clusters"]
        if nprobe is None:
            nprobe = m["index"]["nprobe"]
        elif not nc or not 1 <= nprobe <= index.ivf.num_clusters:
            raise ValueError(f"nprobe must be in [1, {index.ivf.num_clusters if nc else 0}] "
                             "(it needs an IVF index)")
        fs = index.filters.schema if index.filters is not None else None
        self._max_nprobe = max_nprobe                     # as given (None: the default)
        if not nc and max_nprobe is not None:
            raise ValueError("max_nprobe needs an IVF index (publish with num_clusters)")
        self.spec = GraphSpec(
            user_graph=graphs.user_tower, overarch_graph=graphs.overarch,
            params_treedef=ptree, params_keys=pkeys, index_treedef=itree, index_keys=ikeys,
            user_fields=tuple(s.name for s in schema.user), value_fn=self.value_model.fn,
            num_tasks=len(tasks), primary_task=0,
            num_hashes=fs.num_hashes if fs is not None else 1,
            stack_depth=DEFAULT_STACK_DEPTH, nprobe=int(nprobe) if nc else 0,
            min_eligible_factor=check_min_eligible_factor(min_eligible_factor), merge=merge,
            rank=rank, backend=backend,
            max_nprobe=check_max_nprobe(index.ivf, int(nprobe), max_nprobe) if nc else 0)
        users = None
        if m.get("users"):
            u = data.group("users")
            users = {"ids": u["ids"], "seen_indptr": u["seen_indptr"],
                     "seen_items": u["seen_items"],
                     "features": {f: u[f"features/{f}"] for f in m["users"]["fields"]}}
        self.host = HostSide([s.to_json() for s in schema.user], fs,
                             np.asarray(index.ids) if index.ids is not None
                             else np.arange(index.num_items),
                             None if index.perm is None else np.asarray(index.perm),
                             index.num_rows, tasks, data.titles, users)
        self.default_k0 = int(m["serving"]["k0"])
        self._fn = jax.jit(functools.partial(retrieval_graph, self.spec),
                           static_argnames=("k", "k0"))
        # item updates: the published state above stays as is; `_state` is what queries use
        self.schema = schema
        self.fresh_capacity = int(fresh_capacity)
        self._item_fn = jax.jit(functools.partial(_item_apply, graphs.item_tower))
        self._item_params = params["item_tower"]
        self._lock = threading.Lock()
        self.root = os.path.dirname(os.path.dirname(os.path.abspath(data.path)))
        self.durable = bool(durable)
        self.journal_seq = int(m.get("journal_seq", 0))
        self._state = _State(self.spec, self._fn, self.weights, index, None, {}, 0,
                             self.journal_seq, sharded)
        self.replayed = 0
        self.catch_up()

    @classmethod
    def load(cls, bundle_dir: str, *, model=None, **kw) -> "Retriever":
        """Loads and verifies the live version of a bundle.

        Args:
          model: optional ``training.TrainedModel`` (or its directory) you intend to serve
            with this bundle: refused (``SkewError``) unless it is the model the index was
            published with.
          **kw: ``buckets`` (batch sizes compiled, default 1, 8, 32, 128), ``nprobe``,
            ``merge`` ("union" | "intersection"), ``rank`` ("overarch" | "retrieval"),
            ``backend``, ``min_eligible_factor``, ``max_nprobe``, ``fresh_capacity`` (items
            ``add_items`` / ``update_items`` can write before ``serving.compact``),
            ``durable`` (journal every item update in the bundle before applying it, so
            it survives a restart; ``st-jax serve`` does). Updates journaled for this
            version (by a durable retriever, e.g. a server) are always replayed on load.
            ``mesh`` (a ``jax.sharding.Mesh``: shard the main index over its item axis,
            ``item_axis`` naming it when the mesh has several axes; results equal the
            unsharded retriever; see ``serving._retriever``).
        Raises:
          BundleError, TamperedError, SkewError (see ``serving``).
        """
        data = read_bundle(bundle_dir)
        if model is not None:
            if isinstance(model, str):
                from training._train import load as load_model
                model = load_model(model)
            check_model_matches(data, model)
        return cls(data, **kw)

    def with_options(self, **kw) -> "Retriever":
        """The same bundle with other serving options (``rank``, ``merge``, ``nprobe``,
        ``mesh`` ...; ``mesh=None`` serves it unsharded): a new retriever over the published
        version plus its journal (in-memory updates of a non-durable retriever are not
        carried over)."""
        base = {"buckets": self.buckets, "nprobe": self.spec.nprobe or None,
                "merge": self.spec.merge, "rank": self.spec.rank, "backend": self.spec.backend,
                "min_eligible_factor": self.spec.min_eligible_factor,
                "max_nprobe": self._max_nprobe, "fresh_capacity": self.fresh_capacity,
                "durable": self.durable,
                "mesh": self.mesh, "item_axis": self.item_axis if "mesh" not in kw else None}
        return Retriever(self.data, **{**base, **kw})

    def _replicated(self, weights: dict) -> dict:
        """Weights placed on every device of the mesh (sharded serving)."""
        from jax.sharding import NamedSharding, PartitionSpec
        return jax.device_put(weights, NamedSharding(self.mesh, PartitionSpec()))

    def _graph(self, snap, bucket: int, k: int, k0: int, inputs: dict) -> dict:
        return snap.fn(snap.weights, {key: jnp.asarray(v) for key, v in inputs.items()},
                       k=int(k), k0=int(k0))

    # --- item updates (fresh index) ----------------------------------------------------------
    def _snapshot(self) -> "_State":
        return self._state

    def _split_exclude(self, snap, exclude):
        """Per user: ids of published items (excluded in the main index: harmless when
        tombstoned) and ids living in the fresh index (new or updated items: excluded there);
        an id in neither is an error."""
        if exclude is None or snap.fresh is None:
            return exclude, None
        slot_ids = np.asarray(snap.fresh.store.ids)
        live = np.sort(slot_ids[slot_ids >= 0])
        main, other = [], []
        for e in exclude:       # per user (host side)
            e = np.asarray(e).reshape(-1) if np.size(e) else np.zeros(0, np.int64)
            known = self.host.known(e)
            in_fresh = lookup(live, e)[1]
            bad = e[~known & ~in_fresh]
            if bad.size:
                raise RequestError(f"unknown excluded ids {bad[:10].tolist()} (not in the "
                                   "catalogue)")
            main.append(e[known])
            other.append(e[in_fresh])
        return main, other

    def _extra_inputs(self, snap, filters, exclude, bucket: int) -> dict:
        if snap.fresh is None:
            return {}
        from st_jax._fresh import compile_fresh_filter
        out = {}
        if filters is not None:
            fl = list(filters) + [filters[0]] * (bucket - len(filters))
            prog = compile_fresh_filter(snap.fresh, fl, batch_size=bucket)
            out.update({"ffilter/ops": prog.ops, "ffilter/rowids": prog.rowids,
                        "ffilter/terms": prog.terms, "ffilter/lengths": prog.lengths})
        if exclude is not None and any(np.size(e) for e in exclude):
            slot_ids = np.asarray(snap.fresh.store.ids)
            order = np.argsort(slot_ids, kind="stable")
            width = max(16, 1 << (max(np.size(e) for e in exclude) - 1).bit_length())
            ex = np.full((bucket, width), -1, np.int32)
            sorted_ids = slot_ids[order]
            for i, e in enumerate(exclude):          # per user: fresh ids -> live slots
                j = np.searchsorted(sorted_ids, e, side="right") - 1   # the last slot of an id
                ex[i, :e.size] = order[j]
            out["fexclude"] = ex
        return out

    def fresh_stats(self) -> dict:
        """``{"capacity", "used" (slots written), "live" (fresh items), "updates" (applied
        since loading, journal replay included), "replayed" (of those, from the journal),
        "journal_seq" (last journaled update applied), "durable"}``."""
        st = self._state
        return {"capacity": self.fresh_capacity,
                "used": 0 if st.fresh is None else st.fresh.num_used,
                "live": 0 if st.fresh is None else st.fresh.num_live,
                "updates": st.updates, "replayed": self.replayed,
                "journal_seq": st.seq, "durable": self.durable}

    def _embed(self, ids, features) -> np.ndarray:
        try:
            n = self.schema.validate(features, "item")
        except ValueError as e:
            raise RequestError(f"item features: {e}") from None
        if n != np.asarray(ids).reshape(-1).shape[0]:
            raise RequestError(f"{n} feature rows for {np.size(ids)} item ids")
        emb = np.asarray(self._item_fn(self._item_params,
                                       {f: jnp.asarray(v) for f, v in features.items()}))
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise RequestError(f"the item tower produced NaN/Inf embeddings for items "
                               f"{np.asarray(ids).reshape(-1)[bad[:10]].tolist()}")
        return emb

    @staticmethod
    def _op(record: dict):
        """A journal record -> ``(op(main, fresh) -> (main, fresh), {id: title})``."""
        from st_jax import fresh as fr
        ids = np.asarray(record["ids"], np.int64)
        emb = record.get("embeddings")
        emb = None if emb is None else journal.unpack_embeddings(emb)
        attrs = record.get("attributes")
        kind = record["op"]
        if kind == "add":
            titles = record.get("titles")
            return (lambda m, f: (m, fr.add(m, f, ids, emb, attrs))), (
                {} if titles is None else {int(i): str(t) for i, t in zip(ids, titles)})
        if kind == "update":
            return (lambda m, f: fr.update(m, f, ids, embeddings=emb, attributes=attrs)), {}
        if kind == "delete":
            return (lambda m, f: fr.delete(m, f, ids)), {}
        raise journal.JournalError(f"unknown journal operation {kind!r}")

    def _apply(self, record: dict, *, journaled_seq: int | None = None) -> bool:
        """Applies one update under the writer lock: computes the new indexes (bad input
        raises here, nothing changes), journals the record if ``durable`` (fsynced: the update
        is acknowledged only once it is on disk), then publishes the new state with one
        reference swap — queries see the old or the new state, never half of it.
        ``journaled_seq``: the record comes from the journal (replay), with this seq; it is
        skipped (False) if this retriever applied it already."""
        op, titles = self._op(record)
        with self._lock:
            if journaled_seq is not None and journaled_seq <= self._state.seq:
                return False                                   # applied already
            st = self._with_fresh(self._state)
            main, fresh = op(st.main, st.fresh)
            seq = st.seq
            if journaled_seq is not None:
                seq = journaled_seq
            elif self.durable:
                seq = journal.writer(self.root).append(record, after=st.seq)
            self._state = self._state_of(st, main, fresh, {**st.titles, **titles},
                                         st.updates + 1, seq)
        return True

    def _state_of(self, st: _State, main, fresh, titles: dict, updates: int, seq: int
                  ) -> _State:
        """``st`` with new main / fresh indexes (their weights re-flattened)."""
        weights = {k: v for k, v in st.weights.items() if k.startswith("model/")}
        wf = flat_weights(fresh.store, "fresh/", _dot_key)[0]
        sharded = st.sharded
        if sharded is None:
            weights.update(flat_weights(main, "index/", _dot_key)[0])
        else:               # the main index changes by its live words (tombstones) only
            sharded = shard_live(sharded, main.live)
            weights.update(flat_weights(sharded, "index/", _dot_key)[0])
            wf = self._replicated(wf)
        weights.update(wf)
        return _State(st.spec, st.fn, weights, main, fresh, titles, updates, seq, sharded)

    def _with_fresh(self, st: _State) -> _State:
        """``st`` with an (empty) fresh index and the graph that merges it, if it has none."""
        from st_jax import _fresh as fr
        if st.fresh is not None:
            return st
        main = fr._with_live(st.main)
        fresh = fr.create_fresh(main, self.fresh_capacity)
        _, ftree, fkeys = flat_weights(fresh.store, "fresh/", _dot_key)
        spec = dataclasses.replace(self.spec, fresh_treedef=ftree, fresh_keys=fkeys)
        if st.sharded is None:                     # the main index now has live words
            _, itree, ikeys = flat_weights(main, "index/", _dot_key)
            spec = dataclasses.replace(spec, index_treedef=itree, index_keys=ikeys)
        fn = jax.jit(functools.partial(retrieval_graph, spec), static_argnames=("k", "k0"))
        return self._state_of(dataclasses.replace(st, spec=spec, fn=fn), main, fresh,
                              st.titles, st.updates, st.seq)

    def enable_fresh(self) -> None:
        """Switches to the graph that merges the (empty) fresh index now, so that the first
        item update does not compile it while serving (``st-jax serve`` does this before
        warming up). Results are unchanged."""
        with self._lock:
            self._state = self._with_fresh(self._state)

    def catch_up(self) -> int:
        """Applies the journal's updates this retriever has not seen (made by a durable
        retriever of the same bundle, in this or another process); returns how many.
        Loading does this; the server does it again right before a hot swap.

        Raises:
          JournalError: a corrupt journal, or an update that cannot be replayed (e.g. the
            fresh index is full: load with a larger ``fresh_capacity``, or compact).
        """
        n = 0
        for rec in journal.read_records(self.root, after=self._state.seq):
            try:
                if not self._apply(rec, journaled_seq=rec["seq"]):
                    continue
            except Exception as e:  # noqa: BLE001 - re-raised with the record named
                raise journal.JournalError(
                    f"cannot replay journaled item update {rec['seq']} ({rec.get('op')} of "
                    f"{len(rec.get('ids', []))} items) on {self.path}: {type(e).__name__}: {e}"
                    " (a larger fresh_capacity may be needed; serving.compact folds the "
                    "journal into a new version)") from e
            n += 1
            self.replayed += 1
        return n

    def add_items(self, ids, features, attributes=None, titles=None) -> dict:
        """Adds new items (ids not live anywhere), embedded by the bundle's item tower; visible
        to the next query. Raises RequestError (bad input), DuplicateIdError, IndexFullError
        (compact / republish, or load with a larger ``fresh_capacity``)."""
        ids = np.asarray(ids).reshape(-1)
        emb = self._embed(ids, features)
        if titles is not None and len(titles) != ids.size:
            raise RequestError(f"{len(titles)} titles for {ids.size} items")
        self._apply({"op": "add", "ids": ids.tolist(),
                     "embeddings": journal.pack_embeddings(emb),
                     "attributes": journal.plain_attributes(attributes),
                     "titles": None if titles is None else [str(t) for t in titles]})
        return {"added": ids.tolist(), **self.fresh_stats()}

    def update_items(self, ids, features=None, attributes=None) -> dict:
        """Re-embeds (``features``) and/or re-tags (``attributes``: the named fields only)
        items of the bundle or the fresh index; visible to the next query."""
        ids = np.asarray(ids).reshape(-1)
        emb = None if features is None else self._embed(ids, features)
        self._apply({"op": "update", "ids": ids.tolist(),
                     "embeddings": None if emb is None else journal.pack_embeddings(emb),
                     "attributes": journal.plain_attributes(attributes)})
        return {"updated": ids.tolist(), **self.fresh_stats()}

    def delete_items(self, ids) -> dict:
        """Tombstones items (bundle or fresh); they are never returned from the next query on."""
        ids = np.asarray(ids).reshape(-1)
        self._apply({"op": "delete", "ids": ids.tolist()})
        return {"deleted": ids.tolist(), **self.fresh_stats()}

    def title(self, item_id: int) -> str:
        t = self._state.titles.get(int(item_id))
        if t is not None:
            return t
        if item_id >= 0 and not self.host.known([item_id])[0]:
            return str(int(item_id))
        return self.host.title(item_id)

    def export(self, path: str, *, platform: str = "cpu", batch_sizes: Sequence[int] | None = None,
               k: int = 100, k0: int | None = None, exclude_max: int = 0) -> str:
        """Writes ``jax.export`` artifacts of this graph (one per batch size) plus the weights
        and host metadata to ``path`` (atomically); run them with ``serving.load_exported``
        — no model code needed. Returns the version directory.

        Args:
          platform: ``"cpu"`` or ``"cuda"`` (one artifact set per platform; CUDA artifacts
            can be produced on a CPU-only machine).
          batch_sizes: buckets to export (default: this retriever's).
          k: the largest k callers may ask for; k0: candidates per task (default: bundle's).
          exclude_max: longest exclusion list per user the artifacts accept (0: none).
        Raises:
          ValueError: bad options; item updates pending (compact first); a sharded
            retriever (``mesh=``): exported graphs run on one device, so export the same
            bundle loaded without ``mesh`` (``Retriever.load(bundle_dir).export(...)``).
        """
        from serving._export import export_retriever
        if self.mesh is not None:
            raise ValueError("export needs an unsharded retriever: exported graphs run on one "
                             "device; load the bundle without mesh= "
                             "(serving.Retriever.load(bundle_dir).export(...)) and export that")
        return export_retriever(self, path, platform=platform,
                                batch_sizes=batch_sizes or self.buckets, k=k,
                                k0=self.default_k0 if k0 is None else k0,
                                exclude_max=exclude_max)
