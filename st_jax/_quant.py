"""Symmetric per-row Int8 quantisation.

Error bound (documented and tested): for a row ``x`` with ``s = max|x| / 127``,
every element satisfies ``|x_i - codes_i * s| <= s / 2``. For a query ``q`` quantised the
same way (scale ``t``) the Int8 inner product ``t * s * <codes_q, codes_x>`` differs from the
float inner product ``<q, x>`` by at most ``(s * ||q||_1 + t * ||x_hat||_1) / 2`` where
``x_hat = codes_x * s`` — see :func:`score_error_bound`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_topk import QMAX, quantize_rows
from st_jax._types import Int8Matrix

__all__ = ["QMAX", "dequantize", "quantize_int8", "quantize_rows", "score_error_bound"]


def _check_finite_rows(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=-1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:10])) + (" ..." if rows.size > 10 else "")
        raise ValueError(
            f"{what} has NaN or Inf values in {rows.size} row(s): {shown}; "
            "clean or drop these rows before building the index")


def quantize_int8(x) -> Int8Matrix:
    """Quantise a float matrix to Int8 with one symmetric scale per row.

    Args:
      x: ``f32[N, D]`` (array-like; bf16/f16/f64 accepted and converted), finite.
    Returns:
      :class:`Int8Matrix` with ``codes i8[N, D]`` and ``scale f32[N]``.
    Raises:
      ValueError: if ``x`` is not 2-D or has NaN/Inf (the message names the rows).
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D array f32[N, D]; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16):
        raise ValueError(f"quantize_int8 expects floating-point input; got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    _check_finite_rows(arr, "input")
    codes, scale = jax.jit(quantize_rows)(arr)
    return Int8Matrix(codes=codes, scale=scale)


def dequantize(m: Int8Matrix) -> jax.Array:
    """``f32[N, D]``: ``codes * scale[:, None]``."""
    return m.codes.astype(jnp.float32) * m.scale[:, None]


def score_error_bound(q: jax.Array, m: Int8Matrix) -> jax.Array:
    """Upper bound ``f32[B, N]`` on ``|<q, x> - int8_score(q, x)|`` (both sides quantised).

    Args:
      q: ``f32[B, D]`` queries; m: the quantised items.
    """
    qc, qs = quantize_rows(q)
    x_hat_l1 = jnp.sum(jnp.abs(m.codes.astype(jnp.float32)), axis=-1) * m.scale
    q_l1 = jnp.sum(jnp.abs(q.astype(jnp.float32)), axis=-1)
    return 0.5 * (m.scale[None, :] * q_l1[:, None] + qs[:, None] * x_hat_l1[None, :])
