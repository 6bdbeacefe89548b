"""The index as data: ``Index`` (a pytree) and ``build_index``."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_topk import pack_mask, padded_dim, padded_rows
from st_jax._filter_index import build_filter_index
from st_jax._ivf import IVF, balanced_kmeans, ivf_layout, probe_caps
from st_jax._quant import quantize_int8
from st_jax._types import Int8Matrix, _static, pytree_dataclass

CACHE_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


@pytree_dataclass
class Index:
    """A searchable item index.

    Items are stored in *rows*: padded (rows to a multiple of 1024, features to the kernel's
    width) so no search copies them, and cluster-major when the index has an IVF layer. Every
    public result speaks in the caller's ids; rows are internal.

    Attributes:
      items: :class:`Int8Matrix` with ``codes i8[n_rows, d_pad]``, ``scale f32[n_rows]``.
      ids: ``i32[N]`` external ids by original position (``i64`` with ``jax_enable_x64``),
        or None: the ids are the positions ``0..N-1``.
      perm: ``i32[n_rows]`` original position stored at each row (-1 for holes), or None:
        row r holds item r.
      live: ``u32[n_rows // 32]`` bits of the rows holding real items, or None: the first N.
      ivf: :class:`~st_jax._ivf.IVF` or None (flat index).
      cache: ``bf16/f32[n_rows, D]`` float embeddings for exact re-ranking, or None.
      filters: :class:`~st_jax._filter_index.FilterIndex` over the rows (bit-sliced Bloom +
        exact rows + verification lists), or None when built without attributes.
      num_items: N (static); dim: D (static).
    """

    items: Int8Matrix
    ids: Any = None
    perm: Any = None
    live: Any = None
    ivf: Any = None
    cache: Any = None
    filters: Any = None
    num_items: int = _static(default=0)
    dim: int = _static(default=0)

    @property
    def num_rows(self) -> int:
        """Stored (padded) rows, ``n_rows``."""
        return int(self.items.codes.shape[0])

    @property
    def num_words(self) -> int:
        """u32 words of an eligibility mask over the rows: ``n_rows // 32``."""
        return self.num_rows // 32

    def allow_words(self, allow) -> jax.Array:
        """Packs an item mask into eligibility words over this index's rows, once, to reuse.

        Args:
          allow: ``bool[N]`` (shared by the batch) or ``bool[B, N]`` (per query), by item
            position.
        Returns:
          ``u32[W]`` / ``u32[B, W]`` (``W = num_words``), which ``st.search(index, q, k,
          allow=words)`` takes as it is. A bool mask passed to ``search`` is permuted into row
          order and packed on every call (~5 ms for 1M items on CPU); a mask used for many
          calls (a served segment, a benchmark's filter) is better packed here once.
        Raises:
          ValueError: not a bool mask of N items (per query or shared).
        """
        from st_jax._search import eligibility_words
        a = jnp.asarray(allow)
        if a.dtype != jnp.bool_ or a.ndim not in (1, 2):
            raise ValueError(f"allow must be bool[{self.num_items}] or bool[B, "
                             f"{self.num_items}]; got {a.dtype}{list(a.shape)}")
        return jax.jit(eligibility_words, static_argnums=2)(self, a, a.shape[0])

    def bytes_per_item(self) -> float:
        """Index memory per real item (all arrays: codes, scales, ids, IVF, cache)."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(x.size * x.dtype.itemsize for x in leaves) / max(self.num_items, 1)


def _check_ids(ids, n: int):
    arr = np.asarray(ids)
    if arr.shape != (n,):
        raise ValueError(f"ids must have shape [{n}] (one per embedding row); got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers; got dtype {arr.dtype}")
    if arr.size and np.unique(arr).size != n:
        vals, counts = np.unique(arr, return_counts=True)
        dup = vals[counts > 1][:10].tolist()
        raise ValueError(f"ids must be unique; duplicated: {dup}")
    if arr.size and (arr.min() < 0):
        raise ValueError("ids must be >= 0 (-1 marks an empty result slot)")
    fits32 = not arr.size or arr.max() <= np.iinfo(np.int32).max
    if fits32:
        return jnp.asarray(arr.astype(np.int32))
    if not jax.config.jax_enable_x64:
        raise ValueError("ids exceed the int32 range: enable 64-bit ids with "
                         "jax.config.update('jax_enable_x64', True) before building the index")
    return jnp.asarray(arr.astype(np.int64))


def build_index(embeddings, *, ids=None, num_clusters: int = 0, ivf_block: int = 64,
                balance: float | None = 2.0, store_embeddings: str | None = None,
                attributes=None, bloom_bits: int | None = None, num_hashes: int = 5,
                seed: int = 0, progress: bool = False) -> Index:
    """Builds an Int8 index, flat or IVF.

    Args:
      embeddings: ``f32[N, D]`` item embeddings (array-like, finite).
      ids: optional ``int[N]`` unique external ids (returned by search instead of positions).
      num_clusters: 0 (default) keeps the flat index; C > 0 adds an IVF layer with C k-means
        clusters (rule of thumb: C ≈ 4·sqrt(N) to N / 1000; see the README).
      ivf_block: items per IVF block (multiple of 32): the unit the probe reads.
      balance: clusters larger than ``balance * N / C`` are split (None: never).
      store_embeddings: ``"bf16"`` or ``"f32"`` keeps float embeddings for exact re-ranking
        (``search(..., rerank=R)``); None keeps Int8 only.
      attributes: optional ``{field: values}`` with one value per item (str or int, a list
        of them for multi-valued fields, None / [] when missing) for exact filtering with
        ``search(..., filter=...)``.
      bloom_bits: Bloom bits per item M (None: the sizing rule, see the README);
        num_hashes: K hashes per Bloom term.
      seed: k-means and Bloom hash seed; progress: show progress bars for long builds.
    Returns:
      :class:`Index`.
    Raises:
      ValueError: wrong shape/dtype, NaN/Inf rows (named), bad ids or options.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array f32[N, D]; got shape {x.shape}")
    if store_embeddings not in (None, *CACHE_DTYPES):
        raise ValueError(f"store_embeddings must be None, 'bf16' or 'f32'; got {store_embeddings!r}")
    n, d = x.shape
    if not isinstance(num_clusters, (int, np.integer)) or not 0 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an int in [0, N={n}]; got {num_clusters!r}")
    if ivf_block % 32 or ivf_block <= 0:
        raise ValueError(f"ivf_block must be a positive multiple of 32; got {ivf_block}")
    m = quantize_int8(x)                       # validates finiteness, names bad rows
    ext_ids = None if ids is None else _check_ids(ids, n)
    d_pad = padded_dim(d)
    perm = live = ivf = None
    if num_clusters:
        max_size = None if balance is None else max(ivf_block, int(balance * n / num_clusters))
        cents, assign = balanced_kmeans(x.astype(np.float32), num_clusters, max_size=max_size,
                                        seed=seed, progress=progress)
        perm_np, bstart, bcount = ivf_layout(assign, cents.shape[0], ivf_block)
        n_rows = perm_np.shape[0]
        rows = np.maximum(perm_np, 0)
        hole = perm_np < 0
        codes = jnp.where(hole[:, None], 0, m.codes[rows])
        scale = jnp.where(hole, 0.0, m.scale[rows])
        perm = jnp.asarray(perm_np)
        live = pack_mask(jnp.asarray(~hole))
        ivf = IVF(centroids=jnp.asarray(cents), block_start=jnp.asarray(bstart),
                  block_count=jnp.asarray(bcount), block=ivf_block,
                  probe_caps=probe_caps(bcount))
    else:
        n_rows, codes, scale = padded_rows(n), m.codes, m.scale
    items = Int8Matrix(codes=jnp.pad(codes, ((0, n_rows - codes.shape[0]), (0, d_pad - d))),
                       scale=jnp.pad(scale, (0, n_rows - scale.shape[0])))
    cache = None
    if store_embeddings:
        xf = jnp.asarray(x.astype(np.float32))
        if perm is not None:
            xf = jnp.where((perm < 0)[:, None], 0.0, xf[jnp.maximum(perm, 0)])
        cache = jnp.pad(xf, ((0, n_rows - xf.shape[0]), (0, 0))).astype(
            CACHE_DTYPES[store_embeddings])
    filters = None
    if attributes is not None:
        filters = build_filter_index(_rows_of(attributes, n, perm), n if perm is None else n_rows,
                                     n_rows, bloom_bits=bloom_bits, num_hashes=num_hashes,
                                     seed=seed)
    return Index(items=items, ids=ext_ids, perm=perm, live=live, ivf=ivf, cache=cache,
                 filters=filters, num_items=n, dim=d)


def _rows_of(attributes, n: int, perm) -> dict:
    """Attributes by item position -> by index row (holes: missing)."""
    if not hasattr(attributes, "items"):
        raise ValueError("attributes must be a mapping {field: one value per item}")
    out = {}
    for field, values in attributes.items():
        vals = list(values)
        if len(vals) != n:
            raise ValueError(f"attributes[{field!r}] has {len(vals)} values for {n} items")
        if perm is None:
            out[field] = vals
        else:
            arr = np.empty(len(vals) + 1, dtype=object)
            arr[:-1] = vals
            arr[-1] = None                     # holes read the extra None
            out[field] = arr[np.asarray(perm)].tolist()
    return out
