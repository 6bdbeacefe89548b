"""``Retriever``: a published bundle as one jitted retrieval graph (in process)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serving._bundle import BundleData, BundleError, check_model_matches, read_bundle
from serving._graph import MERGES, RANKS, GraphSpec, retrieval_graph
from serving._host import DEFAULT_BUCKETS, HostSide, check_buckets
from serving._runner import Runner
from st_jax._filter_lang import DEFAULT_STACK_DEPTH
from st_jax._persist import index_from_flat


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


class Retriever(Runner):
    """A bundle served as one jitted function: user tower -> per-task filtered Int8 IVF top-k0
    -> task merge -> OverArch -> Value Model -> top-k.

    ``Retriever.load(bundle_dir)``; ``retriever(user_features, filter=..., k=10)`` or
    ``retriever.recommend(user_ids, filter=..., k=10)``. One compilation per batch bucket
    (and k, k0); new users and new filters reuse it. CPU runs the XLA twins, GPU the Pallas
    kernels (``backend="auto"``).
    """

    def __init__(self, data: BundleData, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 nprobe: int | None = None, merge: str | None = None, rank: str = "overarch",
                 backend: str = "auto", min_eligible_factor: float = 16.0):
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
        index = index_from_flat(data.group("index"), m["index"]["spec"])
        wm, ptree, pkeys = flat_weights(params, "model/", _io._key)
        wi, itree, ikeys = flat_weights(index, "index/", _dot_key)
        self.weights = jax.device_put({**wm, **wi})
        self.index = index
        self.value_model = ValueModel.parse(m["model"]["value_formula"], tasks)
        nc = m["index"]["num_clusters"]
        if nprobe is None:
            nprobe = m["index"]["nprobe"]
        elif not nc or not 1 <= nprobe <= index.ivf.num_clusters:
            raise ValueError(f"nprobe must be in [1, {index.ivf.num_clusters if nc else 0}] "
                             "(it needs an IVF index)")
        fs = index.filters.schema if index.filters is not None else None
        self.spec = GraphSpec(
            user_graph=graphs.user_tower, overarch_graph=graphs.overarch,
            params_treedef=ptree, params_keys=pkeys, index_treedef=itree, index_keys=ikeys,
            user_fields=tuple(s.name for s in schema.user), value_fn=self.value_model.fn,
            num_tasks=len(tasks), primary_task=0,
            num_hashes=fs.num_hashes if fs is not None else 1,
            stack_depth=DEFAULT_STACK_DEPTH, nprobe=int(nprobe) if nc else 0,
            min_eligible_factor=float(min_eligible_factor), merge=merge, rank=rank,
            backend=backend)
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

    @classmethod
    def load(cls, bundle_dir: str, *, model=None, **kw) -> "Retriever":
        """Loads and verifies the live version of a bundle.

        Args:
          model: optional ``training.TrainedModel`` (or its directory) you intend to serve
            with this bundle: refused (``SkewError``) unless it is the model the index was
            published with.
          **kw: ``buckets`` (batch sizes compiled, default 1, 8, 32, 128), ``nprobe``,
            ``merge`` ("union" | "intersection"), ``rank`` ("overarch" | "retrieval"),
            ``backend``, ``min_eligible_factor``.
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
        """The same bundle with other serving options (``rank``, ``merge``, ``nprobe`` ...)."""
        base = {"buckets": self.buckets, "nprobe": self.spec.nprobe or None,
                "merge": self.spec.merge, "rank": self.spec.rank, "backend": self.spec.backend,
                "min_eligible_factor": self.spec.min_eligible_factor}
        return Retriever(self.data, **{**base, **kw})

    def _graph(self, bucket: int, k: int, k0: int, inputs: dict) -> dict:
        return self._fn(self.weights, {key: jnp.asarray(v) for key, v in inputs.items()},
                        k=int(k), k0=int(k0))

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
        """
        from serving._export import export_retriever
        return export_retriever(self, path, platform=platform,
                                batch_sizes=batch_sizes or self.buckets, k=k,
                                k0=self.default_k0 if k0 is None else k0,
                                exclude_max=exclude_max)
