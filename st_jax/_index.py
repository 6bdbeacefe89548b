"""The index as data: ``Index`` (a pytree) and ``build_index``."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_topk import padded_dim, padded_rows
from st_jax._quant import quantize_int8
from st_jax._types import Int8Matrix, _static, pytree_dataclass


@pytree_dataclass
class Index:
    """A searchable item index.

    Items are stored padded (rows to a multiple of 1024, features to the kernel's width) so
    no search call copies them; padded rows have zero codes and scale and are never returned.

    Attributes:
      items: :class:`Int8Matrix` with ``codes i8[n_pad, d_pad]``, ``scale f32[n_pad]``.
      ids: ``i32[N]`` (or ``i64[N]`` with ``jax_enable_x64``) external ids, or None when the
        ids are the row positions ``0..N-1``.
      num_items: N, the number of real items (static).
      dim: D, the embedding width callers use (static).
    """

    items: Int8Matrix
    ids: Any
    num_items: int = _static()
    dim: int = _static()

    @property
    def num_rows(self) -> int:
        """Stored (padded) rows, ``n_pad``."""
        return int(self.items.codes.shape[0])

    @property
    def num_words(self) -> int:
        """u32 words of an eligibility mask over this index: ``n_pad // 32``."""
        return self.num_rows // 32

    def bytes_per_item(self) -> float:
        """Index memory per real item (codes + scale + ids)."""
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


def build_index(embeddings, *, ids=None) -> Index:
    """Builds a flat Int8 index.

    Args:
      embeddings: ``f32[N, D]`` item embeddings (array-like, finite).
      ids: optional ``int[N]`` unique external ids (returned by search instead of rows).
    Returns:
      :class:`Index`.
    Raises:
      ValueError: wrong shape/dtype, NaN/Inf rows (named), bad ids.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array f32[N, D]; got shape {x.shape}")
    n, d = x.shape
    m = quantize_int8(x)
    n_pad, d_pad = padded_rows(n), padded_dim(d)
    items = Int8Matrix(codes=jnp.pad(m.codes, ((0, n_pad - n), (0, d_pad - d))),
                       scale=jnp.pad(m.scale, (0, n_pad - n)))
    return Index(items=items, ids=None if ids is None else _check_ids(ids, n),
                 num_items=n, dim=d)
