"""Exported retrieval graphs: ``jax.export`` artifacts + weights, run without model code.

Layout (atomic and versioned like a bundle, see ``serving._store``)::

    EXPORT/CURRENT, EXPORT/versions/vNNNNNN/
        export.json             platform, k, k0, buckets, input layout, user schema, filter
                                schema, titles, content hash
        graphs/b{B}.jaxexport   one serialised ``jax.export.Exported`` per batch bucket
        arrays/                 Orbax: weights (model/..., index/...), host/..., users/...

``load_exported`` needs only ``jax``, ``numpy``, ``orbax`` and ``st_jax``'s filter compiler: not
``training``, not ``flax``. Deserialising runs the artifact's code: load trusted files only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving._host import HostSide, RequestError, check_buckets
from serving._runner import Runner
from serving._store import (StoreError, TamperedError, array_table, canonical_json,
                            content_hash, current_version, load_arrays, save_arrays,
                            write_version)
from st_jax._export import PLATFORMS

FORMAT = "st_jax.export"
FORMAT_VERSION = 1


def export_retriever(retriever, path: str, *, platform: str, batch_sizes: Sequence[int],
                     k: int, k0: int, exclude_max: int) -> str:
    """See :meth:`serving.Retriever.export`."""
    import functools

    from serving._graph import retrieval_graph
    from st_jax._export import export_for
    from training import _io

    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
    buckets = check_buckets(batch_sizes)
    retriever._check_k(k, k0)
    if not isinstance(exclude_max, int) or exclude_max < 0:
        raise ValueError(f"exclude_max must be an int >= 0; got {exclude_max!r}")
    host = retriever.host
    if retriever.fresh_stats()["updates"]:
        raise ValueError("this retriever holds item updates (fresh index); exported graphs "
                         "serve the published bundle only: compact into a new bundle "
                         "(serving.compact) and export that")
    weights = {key: np.asarray(v) for key, v in retriever.weights.items()}
    w_specs = {key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in weights.items()}
    fn = functools.partial(retrieval_graph, retriever.spec, k=int(k), k0=int(k0))
    has_filters = host.filter_schema is not None
    blobs = {}
    layout = {}
    for b in buckets:
        sample = host.user_features(np.zeros(b, np.int64)) if host.users is not None else None
        if sample is None:
            sample = {s["name"]: np.zeros((b, s["max_len"]) if s["kind"] == "multi" else (b,),
                                          np.float32 if s["kind"] == "numeric" else np.int32)
                      for s in host.user_specs}
        inputs = host.inputs(sample, None, None, b, exclude_max, always_filter=has_filters)
        in_specs = {key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in inputs.items()}
        exp = export_for(fn, platform, w_specs, in_specs)
        blobs[b] = bytes(exp.serialize())
        layout[str(b)] = {key: [list(v.shape), np.dtype(v.dtype).name]
                          for key, v in in_specs.items()}
    arrays = {f"weights/{key}": v for key, v in weights.items()}
    arrays["host/item_ids"] = host.item_ids
    arrays["host/row_of_pos"] = host.row_of_pos
    if host.users is not None:
        u = host.users
        arrays["users/ids"] = np.asarray(u["ids"])
        arrays["users/seen_indptr"] = np.asarray(u["seen_indptr"])
        arrays["users/seen_items"] = np.asarray(u["seen_items"])
        for f, v in u["features"].items():
            arrays[f"users/features/{f}"] = np.asarray(v)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "platform": platform,
        "jax_version": jax.__version__, "k": int(k), "k0": int(k0),
        "buckets": list(buckets), "exclude_max": int(exclude_max), "inputs": layout,
        "tasks": list(host.tasks), "user_specs": host.user_specs,
        "filter_schema": host.filter_schema.to_json() if has_filters else None,
        "num_rows": int(host.num_rows),
        "user_fields": list(host.users["features"]) if host.users is not None else None,
        "titles": host.titles, "bundle": retriever.path,
        "graphs": {str(b): f"graphs/b{b}.jaxexport" for b in buckets},
        "arrays": array_table(arrays),
    }
    meta["content_hash"] = content_hash(arrays, canonical_json(meta),
                                        *(blobs[b] for b in buckets))

    def fill(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "graphs"))
        for b in buckets:
            with open(os.path.join(tmp, meta["graphs"][str(b)]), "wb") as f:
                f.write(blobs[b])
        save_arrays(os.path.join(tmp, "arrays"), arrays)
        _io.write_json_atomic(os.path.join(tmp, "export.json"), meta)

    return write_version(path, fill)


class ExportedRetriever(Runner):
    """Runs exported graphs (see :func:`load_exported`); same call API as ``Retriever``.

    ``k`` may be at most the exported k; ``k0`` is fixed at export time.
    """

    _always_filter = True

    def __init__(self, path: str, meta: dict, arrays: dict, blobs: dict[int, bytes]):
        from jax import export
        self.path = path
        self.meta = meta
        self.platform = meta["platform"]
        self.buckets = tuple(meta["buckets"])
        self.default_k0 = int(meta["k0"])
        self.k_max = int(meta["k"])
        self.exclude_max = int(meta["exclude_max"])
        self.weights = jax.device_put({key[len("weights/"):]: v for key, v in arrays.items()
                                       if key.startswith("weights/")})
        self._calls = {b: jax.jit(export.deserialize(bytearray(blob)).call)
                       for b, blob in blobs.items()}
        fs = None
        if meta["filter_schema"] is not None:
            from st_jax._filter_index import FilterSchema
            fs = FilterSchema.from_json(meta["filter_schema"])
        users = None
        if meta["user_fields"] is not None:
            users = {"ids": arrays["users/ids"], "seen_indptr": arrays["users/seen_indptr"],
                     "seen_items": arrays["users/seen_items"],
                     "features": {f: arrays[f"users/features/{f}"] for f in meta["user_fields"]}}
        host = HostSide(meta["user_specs"], fs, arrays["host/item_ids"], None, meta["num_rows"],
                        meta["tasks"], meta["titles"], users)
        host.row_of_pos = arrays["host/row_of_pos"]
        self.host = host
        self._always_filter = fs is not None

    def _prepare(self, b: int, exclude) -> int:
        need = self.host.exclude_width(exclude, b)
        if need and not self.exclude_max:
            raise RequestError("these artifacts were exported without exclusion support: "
                               "export with exclude_max > 0")
        return self.exclude_max

    def _check_k(self, k: int, k0: int) -> None:
        super()._check_k(k, k0)
        if k > self.k_max:
            raise RequestError(f"k={k} exceeds the exported k={self.k_max}; re-export with a "
                               "larger k")
        if k0 != self.default_k0:
            raise RequestError(f"k0 is fixed at {self.default_k0} in exported graphs; re-export "
                               "to change it")

    def _graph(self, snap, bucket: int, k: int, k0: int, inputs: dict) -> dict:
        return self._calls[bucket](self.weights,
                                   {key: jnp.asarray(v) for key, v in inputs.items()})


def load_exported(path: str) -> ExportedRetriever:
    """Loads an export written by ``Retriever.export`` (verifying its content hash).

    Raises:
      StoreError: not an export / wrong format; TamperedError: content hash mismatch;
      RuntimeError: artifacts for a platform this machine does not have.
    """
    vdir = current_version(path)
    try:
        with open(os.path.join(vdir, "export.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"{vdir!r} is incomplete or corrupt: {e}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{vdir!r} is not an st_jax export of format version {FORMAT_VERSION}")
    backend = jax.default_backend()
    want = "cuda" if backend == "gpu" else backend
    if meta["platform"] != want:
        raise RuntimeError(f"these artifacts are for {meta['platform']!r}; this machine runs "
                           f"{want!r}: export for {want!r}")
    arrays = load_arrays(os.path.join(vdir, "arrays"), meta["arrays"])
    blobs = {}
    for b, rel in meta["graphs"].items():
        with open(os.path.join(vdir, rel), "rb") as f:
            blobs[int(b)] = f.read()
    stated = meta.pop("content_hash", None)
    actual = content_hash(arrays, canonical_json(meta),
                          *(blobs[b] for b in sorted(blobs)))
    meta["content_hash"] = stated
    if stated != actual:
        raise TamperedError(f"export {vdir!r} does not match its content hash: a file was "
                            "modified after exporting; re-export it")
    return ExportedRetriever(vdir, meta, arrays, blobs)
