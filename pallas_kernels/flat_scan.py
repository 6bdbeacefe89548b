"""Flat filtered scan: the masked Int8 top-k over a whole item matrix.

The flat index's search and the IVF search's fallback for starved queries. Contract (every
implementation): queries ``q f32[B, D]`` (quantised per row inside), ``codes i8[N, D]``,
``scale f32[N]``, eligibility ``mask`` None / ``u32[W]`` (shared) / ``u32[B, W]`` (per query;
``W = ceil(N / 32)``), ``k``, ``num_valid`` (rows from it on are padding) -> ``(scores f32[B,
k], rows i32[B, k])``, best first, ``-inf`` / ``-1`` padded.

- :func:`flat_topk_reference` (XLA): a selective mask first gathers the eligible rows (union
  over the batch) into a compact sub-matrix (``lax.switch`` over a few sizes), so the work
  follows the eligible items, not N; then :func:`~pallas_kernels.int8_topk.int8_topk_reference`.
- :func:`flat_topk_native` (C++ XLA FFI handler, ``native/flat_scan_cpu.cc``): one pass over
  the rows in tiles, skipping rows no query may return, AVX-512 VNNI dots for the whole batch
  per tile and a running threshold per query; the exact top-k in ``lax.top_k``'s order (equal
  scores by ascending row).
- :func:`flat_topk`: dispatcher -- the Pallas kernel on GPU (after the same compaction), the
  native kernel on CPU where it can be built (never in ``jax.export`` artifacts), else the
  XLA twin.

The XLA twin and the native kernel return the same floats, rows and order, bit for bit:
``lax.top_k``'s order over all scores (by value, +0.0 above -0.0, then by ascending row; of
the items tied at the k-th score the lowest rows are kept), ``-1`` for a row whose score is
``-inf`` (overflow) as for padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import native
from pallas_kernels._ffi import native_cpu_primitive
from pallas_kernels._select import pack_mask, popcount_rows, set_bit_positions
from pallas_kernels.int8_topk import (_check_inputs, dispatch, int8_topk_pallas, quantize_rows,
                                      reference_scan, unpack_mask)

# Selective masks: when the eligible items (union over the batch) fit in one of these
# fractions of the rows, they are gathered into a compact sub-matrix first, so the work
# follows the number of eligible items instead of N. Larger: dense scan with the mask.
# (1M items, B = 32, AMD EPYC: 13-20 % eligible in 11-24 ms with the 1/4 cap, 23-48 ms
# dense, k = 100 and 1024; a 1/2 cap would gather about as much as the dense scan reads.)
_SPARSE_FRACTIONS = (1 / 512, 1 / 64, 1 / 8, 1 / 4)
_MIN_SPARSE_ROWS = 1 << 14


def _sparse_caps(n_rows: int) -> tuple[int, ...]:
    if n_rows < 4 * _MIN_SPARSE_ROWS:
        return ()
    caps = sorted({max(1024, -(-int(n_rows * f) // 1024) * 1024) for f in _SPARSE_FRACTIONS})
    return tuple(c for c in caps if c <= n_rows // 2)


def _compacted(dense, codes, scale, mask, num_valid: int):
    """``dense(codes, scale, mask, num_valid)`` on the whole matrix, or, for a selective
    ``mask``, on the sub-matrix of its eligible rows (union over the batch), mapped back."""
    n_rows = codes.shape[0]
    caps = _sparse_caps(n_rows) if mask is not None else ()
    if not caps:
        return dense(codes, scale, mask, num_valid)

    union = mask if mask.ndim == 1 else jnp.bitwise_or.reduce(mask, axis=0)
    eligible = popcount_rows(union)

    def sparse(cap):
        def run():
            # word-level compaction (~5x jnp.nonzero over the N bits on XLA:CPU)
            rows = set_bit_positions(union[None], cap)[0]
            in_use = (jnp.arange(cap) < eligible) & (rows < num_valid)
            rows = jnp.where(in_use, rows, 0)
            if mask.ndim == 1:
                sub_mask = pack_mask(in_use)
            else:
                sub_mask = pack_mask(unpack_mask(mask, n_rows)[:, rows] & in_use)
            vals, sub = dense(codes[rows], scale[rows], sub_mask, cap)
            return vals, jnp.where(sub >= 0, rows[jnp.maximum(sub, 0)], -1)
        return run

    branches = [sparse(c) for c in caps] + [lambda: dense(codes, scale, mask, num_valid)]
    which = jnp.sum(eligible > jnp.asarray(caps, jnp.int32))
    return lax.switch(which, branches)


def _twin(qc, qs, codes, scale, mask, *, k: int, num_valid: int):
    """The XLA twin on quantised queries; ``mask`` None or ``u32[W]`` / ``u32[B, W]``."""
    def dense(c, s, m, nv):
        return reference_scan(qc, qs, c, s, m, k=k, num_valid=nv)
    return _compacted(dense, codes, scale, mask, num_valid)


def _check(q, codes, scale, mask, k, num_valid):
    _check_inputs(q, codes, scale, mask, k)
    n = codes.shape[0]
    num_valid = n if num_valid is None else num_valid
    if not isinstance(num_valid, int) or not 0 <= num_valid <= n:
        raise ValueError(f"num_valid must be an int in [0, {n}]; got {num_valid!r}")
    return num_valid


@functools.partial(jax.jit, static_argnames=("k", "num_valid"))
def flat_topk_reference(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None):
    """Plain-XLA flat filtered scan (the module's contract)."""
    num_valid = _check(q, codes, scale, mask, k, num_valid)
    qc, qs = quantize_rows(q)
    return _twin(qc, qs, codes, scale, mask, k=k, num_valid=num_valid)


def _twin_words(qc, qs, codes, scale, words, *, k: int, num_valid: int):
    """The twin on the native kernel's operands: ``words u32[M, W]`` (M = 0: no mask,
    1: shared, B: per query)."""
    m = words.shape[0]
    mask = None if m == 0 else (words[0] if m == 1 else words)
    return _twin(qc, qs, codes, scale, mask, k=k, num_valid=num_valid)


_flat_cpu_p = native_cpu_primitive(
    "st_flat_scan_cpu", native.FLAT_SCAN_TARGET, _twin_words,
    lambda qc, *_, k, num_valid: [((qc.shape[0], k), jnp.float32),
                                  ((qc.shape[0], k), jnp.int32)])


def _scan_cpu(q, codes, scale, mask, *, k: int, num_valid, require_native: bool):
    num_valid = _check(q, codes, scale, mask, k, num_valid)
    qc, qs = quantize_rows(q)
    w = -(-codes.shape[0] // 32)
    words = (jnp.zeros((0, w), jnp.uint32) if mask is None
             else mask.reshape(-1, w))
    return tuple(_flat_cpu_p.bind(qc, qs, codes, scale, words, k=int(k),
                                  num_valid=int(num_valid), require_native=require_native))


def flat_topk_native(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None):
    """The native CPU flat scan (C++ XLA FFI handler, :mod:`pallas_kernels.native`); the
    module's contract, the exact top-k in ``lax.top_k``'s order. CPU only.

    Raises:
      pallas_kernels.native.NativeUnavailable: the library cannot be built or loaded (when
        the program is lowered); ``backend="auto"`` then uses the twin instead.
    """
    return _scan_cpu(q, codes, scale, mask, k=k, num_valid=num_valid, require_native=True)


def _pallas(q, codes, scale, mask, *, k: int, num_valid, interpret: bool = False):
    num_valid = _check(q, codes, scale, mask, k, num_valid)

    def dense(c, s, m, nv):
        return int8_topk_pallas(q, c, s, m, k=k, num_valid=nv, interpret=interpret)
    return _compacted(dense, codes, scale, mask, num_valid)


def flat_topk(q, codes, scale, mask=None, *, k: int, num_valid: int | None = None,
              backend: str = "auto"):
    """Flat filtered scan: the Pallas kernel on GPU; on CPU the native kernel when it is
    available (:mod:`pallas_kernels.native`; not in ``jax.export`` artifacts), else the XLA
    twin; ``backend="xla"`` always takes the twin, ``"pallas"`` / ``"interpret"`` the kernel.
    Returns ``(scores f32[B, k], rows i32[B, k])``."""
    return dispatch(backend, (q, codes, scale, mask),
                    twin=functools.partial(flat_topk_reference, k=k, num_valid=num_valid),
                    kernel=functools.partial(_pallas, k=k, num_valid=num_valid),
                    cpu=functools.partial(_scan_cpu, k=k, num_valid=num_valid,
                                          require_native=False))
