"""``publish``: a trained model + an item catalogue -> one index bundle on disk.

item tower -> item embeddings -> k-means (IVF) -> Int8 codes -> Bloom/exact filter data from
the item attributes -> bf16 embedding cache for the OverArch -> one bundle:

    BUNDLE/CURRENT, BUNDLE/versions/vNNNNNN/   (atomic, see serving._store)
        manifest.json     format, model config + schema + value formula, index spec,
                          array table, fingerprints, content hash
        catalogue.json    item titles (display only)
        arrays/           Orbax: model/<param>, index/<array>, users/<array>

Version skew: ``manifest["model"]["fingerprint"]`` digests the model weights and architecture;
the index records the fingerprint of the model whose item tower produced it
(``manifest["index"]["built_with"]``). Loading recomputes both and the content hash over every
array and JSON file, refusing a bundle whose parts do not belong together or were altered.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from serving import _journal as journal
from serving._store import (VERSIONS, StoreError, TamperedError, array_table, canonical_json,
                            content_hash, current_version, load_arrays, save_arrays,
                            write_version)
from st_jax._index import build_index
from st_jax._persist import index_to_flat

FORMAT = "st_jax.bundle"
FORMAT_VERSION = 1


class BundleError(StoreError):
    """A bundle is missing, incomplete or of an unknown format."""


class SkewError(BundleError):
    """The model and the index of a bundle come from different training runs (version skew)."""


class CatalogueError(ValueError):
    """An item catalogue cannot be published (bad ids, features, embeddings or attributes)."""


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """Items to publish.

    Attributes:
      ids: ``int[N]`` unique item ids (>= 0).
      features: item features per the model's schema (``{field: [N, ...]}``).
      attributes: filter attributes ``{field: one value per item}`` (str / int, a list of
        them for multi-valued fields, None or [] when missing), or None.
      titles: display names, or None.
    """

    ids: Any
    features: Mapping[str, Any]
    attributes: Mapping[str, Sequence] | None = None
    titles: Sequence[str] | None = None

    @classmethod
    def from_dataset(cls, dataset) -> "Catalogue":
        """The catalogue a ``training.Dataset`` was trained on."""
        return cls(ids=dataset.item_ids, features=dataset.item_features,
                   attributes=dataset.item_attributes(), titles=dataset.item_titles)


# ----------------------------------------------------------------------------- fingerprints

def _arch(schema_json: Mapping, config_json: Mapping) -> dict:
    """What, besides the weights, defines a model: schema, tower and OverArch settings
    (normalised through JSON so a published manifest gives the same bytes)."""
    return json.loads(json.dumps({"schema": schema_json, "tower": config_json["tower"],
                                  "overarch": config_json["overarch"]}))


def model_fingerprint(model) -> str:
    """Digest of a trained model's weights, architecture and feature schema."""
    from training import _io
    return _digest(_io.flatten(model.params),
                   _arch(model.dataset.schema.to_json(), model.config.to_json()))


def _digest(model_flat: Mapping, arch: Mapping) -> str:
    return content_hash(model_flat, canonical_json(arch))


# ----------------------------------------------------------------------------- validation

def _check_attributes(attributes: Mapping, ids: np.ndarray) -> dict[str, list]:
    """Refuses values that are not str / int (or lists of them), naming the items."""
    if not isinstance(attributes, Mapping):
        raise CatalogueError("attributes must be a mapping {field: one value per item}")
    out = {}
    for field, values in attributes.items():
        vals = list(values)
        if len(vals) != ids.shape[0]:
            raise CatalogueError(f"attributes[{field!r}] has {len(vals)} values for "
                                 f"{ids.shape[0]} items")

        def ok(v):
            return (v is None or isinstance(v, str)
                    or (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))))

        def norm(v):
            return int(v) if isinstance(v, np.integer) else v

        bad, clean = [], []
        for i, v in enumerate(vals):  # host-side validation pass over the catalogue
            if isinstance(v, (list, tuple, np.ndarray)):
                items = list(v)
                if not all(ok(x) and x is not None for x in items):
                    bad.append(i)
                clean.append([norm(x) for x in items])
            else:
                if not ok(v):
                    bad.append(i)
                clean.append(norm(v))
        if bad:
            kinds = sorted({type(vals[i]).__name__ for i in bad})
            raise CatalogueError(
                f"attribute {field!r}: items {ids[bad[:10]].tolist()} have values of type "
                f"{kinds}; filter attributes must be str or int (or lists of them): "
                "convert or bucket them (e.g. str(x) or int(price // 10))")
        out[field] = clean
    return out


def _check_embeddings(emb: np.ndarray, ids: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise CatalogueError(
            f"the item tower produced NaN/Inf embeddings for {bad.size} items, ids "
            f"{ids[bad[:10]].tolist()}: check their features (and the model)")


def default_num_clusters(n: int) -> int:
    """Flat below 200k items; else about sqrt(N) clusters (a power of two, <= 16384)."""
    if n < 200_000:
        return 0
    return int(min(16384, 2 ** round(math.log2(math.sqrt(n)))))


# ----------------------------------------------------------------------------- writing

def seen_positions(indptr: np.ndarray, seen_ids: np.ndarray, catalogue_ids: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-user seen-item lists (CSR ``indptr i64[U+1]`` over item ids) -> the same lists as
    positions of ``catalogue_ids`` (``i64[U+1]``, ``i32[nnz']``); ids the catalogue lacks are
    dropped (they cannot be recommended anyway)."""
    from serving._host import lookup
    order = np.argsort(catalogue_ids, kind="stable")
    j, present = lookup(catalogue_ids[order], seen_ids)
    owner = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    counts = np.bincount(owner[present], minlength=indptr.size - 1)
    return (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            order[j][present].astype(np.int32))


def _write_bundle(out_dir: str, arrays: dict, manifest: dict, catalogue: bytes,
                  on_stage: Callable[[str], None] | None) -> str:
    """Seals ``manifest`` (array table + content hash) and writes a new bundle version
    atomically (:func:`serving._store.write_version`); returns its directory."""
    from st_jax._atomic import write_json_atomic
    manifest["arrays"] = array_table(arrays)
    manifest.pop("content_hash", None)
    manifest["content_hash"] = content_hash(arrays, canonical_json(manifest), catalogue)

    def fill(tmp: str) -> None:
        if on_stage:
            on_stage("arrays")
        save_arrays(os.path.join(tmp, "arrays"), arrays)
        with open(os.path.join(tmp, "catalogue.json"), "wb") as f:
            f.write(catalogue)
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)

    path = write_version(out_dir, fill, on_stage=on_stage)
    _collect_journal(out_dir)
    return path


def _collect_journal(root: str) -> None:
    """Drops journal segments every kept version has folded in (see ``serving._journal``)."""
    vdir = os.path.join(root, VERSIONS)
    seqs = []
    for name in os.listdir(vdir):
        if name.startswith("v") and name[1:].isdigit():
            try:
                with open(os.path.join(vdir, name, "manifest.json")) as f:
                    seqs.append(int(json.load(f).get("journal_seq", 0)))
            except (OSError, ValueError, TypeError):
                return                                   # unsure: keep everything
    if seqs:
        journal.collect(root, min(seqs))


# ----------------------------------------------------------------------------- publish

def publish(model, items: Catalogue | None, out_dir: str, *, num_clusters: int | None = None,
            bloom_bits: int | None = None, num_hashes: int = 5, nprobe: int | None = None,
            k0: int | None = None, merge: str = "union", cache_dtype: str = "bf16",
            include_users: bool = True, seed: int = 0, progress: bool = False,
            _on_stage: Callable[[str], None] | None = None) -> str:
    """Publishes a trained model and an item catalogue as one bundle; returns its version dir.

    Args:
      model: a ``training.TrainedModel`` or the directory ``training.train`` wrote.
      items: a :class:`Catalogue`, or None for the catalogue the model was trained on.
      out_dir: the bundle directory (created, or a previous bundle: a new version is added
        atomically; the previous one stays loadable until the switch).
      num_clusters: IVF clusters (None: :func:`default_num_clusters`; 0: flat index).
      bloom_bits / num_hashes: Bloom filter sizing (None: the sizing rule of ``build_index``).
      nprobe: default clusters probed per query (IVF; None: ``min(32, C)``).
      k0: default candidates per task (None: the model's ``overarch.rerank_top``).
      merge: default task merge, ``"union"`` or ``"intersection"``.
      cache_dtype: ``"bf16"`` or ``"f32"`` embedding cache for the OverArch.
      include_users: store the training users' features and seen items (``recommend`` by
        user id, ``exclude_seen``).
      seed: k-means / Bloom hash seed; progress: print stages and progress bars.
    Raises:
      CatalogueError: duplicate / negative ids, features not matching the schema, NaN/Inf item
        embeddings or attribute values of unsupported types — naming the items.
      StoreError: ``out_dir`` exists and is not a bundle.

    Item updates a server acknowledged for a previous version of ``out_dir`` (its journal, see
    ``serving._journal``) before this call are superseded by this catalogue; to keep them,
    fold them in with :func:`compact` instead (or include them in ``items``).
    """
    from training import _io
    from training._train import load as load_model
    from serving._graph import MERGES

    journal_seq = journal.end_seq(out_dir)

    if isinstance(model, (str, os.PathLike)):
        model = load_model(os.fspath(model))
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}; got {merge!r}")
    if cache_dtype not in ("bf16", "f32"):
        raise ValueError(f"cache_dtype must be 'bf16' or 'f32'; got {cache_dtype!r}")
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    cat = Catalogue.from_dataset(model.dataset) if items is None else items
    ids = np.asarray(cat.ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise CatalogueError(f"item ids must be a 1-D integer array; got {ids.dtype}{ids.shape}")
    if ids.size == 0:
        raise CatalogueError("the catalogue is empty")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CatalogueError(f"duplicate item ids {uniq[counts > 1][:10].tolist()}")
    if ids.min() < 0:
        raise CatalogueError(f"item ids must be >= 0; got {ids[ids < 0][:10].tolist()}")
    from training._schema import FeatureError
    try:
        n = model.dataset.schema.validate(cat.features, "item")
    except FeatureError as e:
        raise CatalogueError(f"item features: {e}") from None
    if n != ids.shape[0]:
        raise CatalogueError(f"{n} feature rows for {ids.shape[0]} item ids")
    attrs = None if cat.attributes is None else _check_attributes(cat.attributes, ids)
    if cat.titles is not None and len(cat.titles) != n:
        raise CatalogueError(f"{len(cat.titles)} titles for {n} items")

    say(f"[publish] item tower over {n:,} items")
    emb = model.item_embeddings({k: np.asarray(v) for k, v in cat.features.items()})
    _check_embeddings(emb, ids)
    c = default_num_clusters(n) if num_clusters is None else int(num_clusters)
    say(f"[publish] index: {'flat' if not c else f'IVF {c} clusters'}, Int8 codes, "
        f"{'filters, ' if attrs else ''}{cache_dtype} cache")
    index = build_index(emb, ids=ids, num_clusters=c, store_embeddings=cache_dtype,
                        attributes=attrs, bloom_bits=bloom_bits, num_hashes=num_hashes,
                        seed=seed, progress=progress)
    if index.ivf is not None:
        nc = index.ivf.num_clusters
        nprobe = min(32, nc) if nprobe is None else int(nprobe)
        if not 1 <= nprobe <= nc:
            raise ValueError(f"nprobe must be in [1, {nc}]; got {nprobe}")
    elif nprobe is not None:
        raise ValueError("nprobe needs an IVF index (num_clusters > 0)")
    k0 = int(k0 or model.config.overarch.rerank_top or 200)

    model_flat = _io.flatten(model.params)
    config_json = json.loads(json.dumps(model.config.to_json()))
    arch = _arch(model.dataset.schema.to_json(), config_json)
    fp = _digest(model_flat, arch)
    index_flat, index_spec = index_to_flat(index)
    arrays = {f"model/{k}": v for k, v in model_flat.items()}
    arrays.update({f"index/{k}": v for k, v in index_flat.items()})
    users_meta = None
    if include_users:
        ds = model.dataset
        seen = ds.seen("all")
        # seen items as positions of *this* catalogue (items the catalogue lacks are dropped
        # from the exclusion lists: they cannot be recommended anyway)
        indptr, items = seen_positions(seen.indptr, ds.item_ids[seen.indices], ids)
        arrays["users/ids"] = np.asarray(ds.user_ids)
        arrays["users/seen_indptr"] = indptr
        arrays["users/seen_items"] = items
        for f, v in ds.user_features.items():
            arrays[f"users/features/{f}"] = np.asarray(v)
        users_meta = {"count": int(ds.num_users), "fields": list(ds.user_features)}
    catalogue = canonical_json({"titles": None if cat.titles is None else list(cat.titles)})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"config": config_json, "schema": arch["schema"],
                  "tasks": list(model.tasks), "value_formula": model.value_model.formula,
                  "has_overarch": bool(model.has_overarch), "fingerprint": fp,
                  "source": dict(model.dataset.source)},
        "index": {"spec": index_spec, "built_with": fp, "num_items": int(n),
                  "num_clusters": int(index.ivf.num_clusters) if index.ivf is not None else 0,
                  "nprobe": int(nprobe or 0), "bytes_per_item": index.bytes_per_item()},
        "serving": {"k0": k0, "merge": merge},
        "users": users_meta,
        # a publish supersedes the item updates acknowledged before it started
        "journal_seq": journal_seq,
    }
    say(f"[publish] writing {sum(a.nbytes for a in arrays.values()) / 2**20:.1f} MiB "
        f"to {out_dir}")
    path = _write_bundle(out_dir, arrays, manifest, catalogue, _on_stage)
    say(f"[publish] done in {time.perf_counter() - t0:.1f} s: {path}")
    return path


# ----------------------------------------------------------------------------- load

@dataclasses.dataclass(frozen=True)
class BundleData:
    """A verified bundle in memory (no model code needed)."""

    path: str
    manifest: dict
    arrays: dict[str, np.ndarray]
    titles: list[str] | None

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}


def read_bundle(bundle_dir: str) -> BundleData:
    """Reads and verifies the live version of a bundle.

    Raises:
      BundleError: not a bundle / unknown format / unreadable.
      TamperedError: content hash mismatch (a file was changed after publishing).
      SkewError: the index was built with another model than the bundle's.
    """
    path = current_version(bundle_dir)
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        with open(os.path.join(path, "catalogue.json"), "rb") as f:
            catalogue = f.read()
    except (OSError, ValueError) as e:
        raise BundleError(f"{path!r} is incomplete or corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path!r} is not an st_jax bundle (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {manifest.get('format_version')} is not "
                          f"supported (this st_jax reads {FORMAT_VERSION}); republish it")
    arrays = load_arrays(os.path.join(path, "arrays"), manifest["arrays"])
    stated = manifest.pop("content_hash", None)
    actual = content_hash(arrays, canonical_json(manifest), catalogue)
    manifest["content_hash"] = stated
    if stated != actual:
        raise TamperedError(f"bundle {path!r} does not match its content hash (stated "
                            f"{str(stated)[:12]}, actual {actual[:12]}): a file was modified "
                            "after publishing; republish it")
    model_flat = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    m = manifest["model"]
    fp = _digest(model_flat, _arch(m["schema"], m["config"]))
    if fp != m["fingerprint"] or manifest["index"]["built_with"] != fp:
        raise SkewError(
            f"version skew in {path!r}: the index was published with model "
            f"{manifest['index']['built_with'][:12]}, the bundle's model is {fp[:12]}; "
            "republish the bundle from the model you want to serve")
    titles = json.loads(catalogue)["titles"]
    return BundleData(path=path, manifest=manifest, arrays=arrays, titles=titles)


def check_model_matches(data: BundleData, model) -> None:
    """Refuses to serve ``model``'s towers with an index published from another model."""
    fp = model_fingerprint(model)
    built = data.manifest["index"]["built_with"]
    if fp != built:
        raise SkewError(f"version skew: this model is {fp[:12]}, the bundle's index was "
                        f"published with {built[:12]}; republish with this model")


# ----------------------------------------------------------------------------- compaction

def compact(retriever, bundle_dir: str | None = None, *,
            _on_stage: Callable[[str], None] | None = None) -> str:
    """Folds a retriever's item updates (fresh index, tombstones) into a new bundle version.

    The model, users and settings are carried over; the index is rebuilt from every live item
    (``st_jax.fresh.compact``: Int8 codes kept bit for bit, IVF re-clustered with the same
    size); the users' seen-item lists are re-mapped to the new catalogue (deleted items
    dropped). Written atomically like :func:`publish` (a crash leaves the previous version
    live). Load the result with ``Retriever.load`` (or let the server hot-swap to it).

    Args:
      retriever: a ``serving.Retriever`` that received ``add/update/delete_items``.
      bundle_dir: where to write (default: the bundle the retriever was loaded from).
    Returns: the new version directory.
    """
    from st_jax._fresh import compact as compact_index

    st = retriever._state
    data = retriever.data
    out = bundle_dir or os.path.dirname(os.path.dirname(data.path))
    if st.fresh is None:
        index = retriever.index
    else:
        index = compact_index(st.main, st.fresh)
    index_flat, index_spec = index_to_flat(index)
    arrays = {k: v for k, v in data.arrays.items() if not k.startswith("index/")}
    arrays.update({f"index/{k}": v for k, v in index_flat.items()})
    new_ids = np.asarray(index.ids) if index.ids is not None else np.arange(index.num_items)
    old_ids = retriever.host.item_ids
    if "users/seen_items" in arrays:                    # positions -> ids -> new positions
        arrays["users/seen_indptr"], arrays["users/seen_items"] = seen_positions(
            arrays["users/seen_indptr"], old_ids[arrays["users/seen_items"]], new_ids)
    titles = None
    if data.titles is not None or st.titles:
        old = {} if data.titles is None else dict(zip(old_ids.tolist(), data.titles))
        old.update(st.titles)
        titles = [old.get(int(i), str(int(i))) for i in new_ids]
    catalogue = canonical_json({"titles": titles})
    manifest = json.loads(json.dumps({k: v for k, v in data.manifest.items()
                                      if k != "content_hash"}))
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["index"].update({
        "spec": index_spec, "num_items": int(index.num_items),
        "num_clusters": int(index.ivf.num_clusters) if index.ivf is not None else 0,
        "bytes_per_item": index.bytes_per_item(),
        "compacted_from": os.path.basename(data.path), "updates": int(st.updates)})
    # folded: the journal through the last update of this snapshot (later ones are replayed)
    manifest["journal_seq"] = int(st.seq)
    return _write_bundle(out, arrays, manifest, catalogue, _on_stage)
