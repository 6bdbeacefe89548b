"""Core pytree data types shared by every st_jax stage.

All of them are frozen dataclasses registered as JAX pytrees, so they pass through
``jax.jit``, ``shard_map`` and Orbax unchanged. Array fields are leaves; fields marked
``static`` are hashable metadata (part of the jit cache key).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax


def _static(**kw: Any) -> Any:
    return dataclasses.field(metadata=dict(static=True), **kw)


def pytree_dataclass(cls):
    """Frozen dataclass + ``jax.tree_util.register_dataclass``."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls)


@pytree_dataclass
class Int8Matrix:
    """Row-wise symmetric Int8 quantisation of a float matrix.

    Attributes:
      codes: ``i8[N, D]`` — ``round(x / scale[:, None])`` clipped to [-127, 127].
      scale: ``f32[N]`` — ``max(|x[n]|) / 127`` (0 for an all-zero row).

    ``dequantize(m)[n] = codes[n] * scale[n]``.
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


@pytree_dataclass
class SearchResult:
    """The one result type of every search in st_jax.

    Attributes:
      ids: ``i32[B, k]`` (or ``i64`` with external 64-bit ids) — item ids, best first,
        ``-1`` where fewer than ``k`` items were eligible.
      scores: ``f32[B, k]`` — approximate inner products (Int8 scores), ``-inf`` padded.
      count: ``i32[B]`` — number of valid entries per row (= ``min(k, eligible)``).
      path: ``i32[B]`` — how each query was served: 0 flat scan, 1 IVF probe,
        2 IVF probe starved by a selective filter, answered by the exact flat scan,
        3 starved IVF probe widened to enough clusters (``search(..., max_nprobe=)``).
    """

    ids: jax.Array
    scores: jax.Array
    count: jax.Array
    path: Any = None
