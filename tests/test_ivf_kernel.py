"""The IVF gather-scan kernel: interpret mode vs XLA twin, and lowering for CUDA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ivf_scan import (ivf_topk, ivf_topk_pallas, ivf_topk_reference,
                                     set_bit_positions)
from pallas_kernels.int8_topk import quantize_rows

from ._cuda import lower_for_cuda
from .test_int8_topk import edge_scores, ids_match


def make(rng, b=3, nb=40, block=64, d=40, p=13, density=0.5):
    n = nb * block
    codes = jnp.asarray(rng.integers(-127, 128, (n, d), dtype=np.int8))
    scale = jnp.asarray(rng.random(n, dtype=np.float32))
    q = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
    blocks = jnp.asarray(rng.integers(0, nb, (b, p)).astype(np.int32))
    bits = rng.random((b, p, block)) < density
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    return q, codes, scale, blocks, pm, bits


def brute(q, codes, scale, blocks, bits, k, block):
    qc, qs = quantize_rows(q)
    out_v, out_i = [], []
    for b in range(q.shape[0]):
        rows = (np.asarray(blocks[b])[:, None] * block + np.arange(block)).ravel()
        ok = bits[b].ravel()
        s = (np.asarray(codes, np.int64)[rows] @ np.asarray(qc[b], np.int64)).astype(np.float32)
        with np.errstate(over="ignore"):               # scores may overflow to +-inf
            s = np.where(ok, s * np.asarray(scale)[rows] * np.asarray(qs)[b], -np.inf)
        # duplicated probed blocks: keep the first occurrence of each row
        _, first = np.unique(rows, return_index=True)
        keep = np.zeros(rows.size, bool)
        keep[first] = True
        s = np.where(keep, s, -np.inf)
        o = np.lexsort((np.signbit(s), -s))[:k]       # lax.top_k's order: +0.0 above -0.0
        v = s[o]
        out_v.append(np.pad(v, (0, k - v.size), constant_values=-np.inf))
        out_i.append(np.pad(np.where(v > -np.inf, rows[o], -1), (0, k - v.size),
                            constant_values=-1))
    return np.stack(out_v), np.stack(out_i)


def unique_blocks(rng, b, nb, p):
    return jnp.asarray(np.stack([rng.choice(nb, p, replace=False) for _ in range(b)]).astype(np.int32))


@pytest.mark.parametrize("d,p,k,density", [(40, 13, 5, 0.5), (33, 7, 100, 0.3),
                                           (64, 9, 700, 1.0), (24, 5, 9, 0.0)])
def test_kernel_matches_twin_and_brute_force(rng, d, p, k, density):
    q, codes, scale, _, _, _ = make(rng, d=d, p=p, density=density)
    blocks = unique_blocks(rng, 3, 40, p)
    bits = rng.random((3, p, 64)) < density
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    want = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64)
    got = ivf_topk_pallas(q, codes, scale, blocks, pm, k=k, block=64, interpret=True)
    ids_match(got, tuple(map(np.asarray, want)))
    ids_match(got, brute(q, codes, scale, blocks, bits, k, 64))


@pytest.mark.parametrize("kind", ["ties", "zeros"])
@pytest.mark.parametrize("k", [5, 200])
def test_kernel_equals_twin_bit_for_bit_on_ties_and_zeros(rng, kind, k):
    """Probe order among equal scores, the first probed kept at the k-th score, +0.0 above
    -0.0: the kernel's order is the twin's."""
    q, codes, scale = map(jnp.asarray, edge_scores(rng, kind, 2, 40 * 64, 32))
    blocks = unique_blocks(rng, 2, 40, 9)
    bits = rng.random((2, 9, 64)) < 0.7
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    want = tuple(map(np.asarray, ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64)))
    ids_match(want, brute(q, codes, scale, blocks, bits, k, 64))
    ids_match(ivf_topk_pallas(q, codes, scale, blocks, pm, k=k, block=64, interpret=True), want)


def test_saturated_group_is_still_exact(rng):
    """All the best items sit in one group of blocks: the first pass saturates."""
    q, codes, scale, _, _, _ = make(rng, b=1, d=32, p=16, density=1.0)
    blocks = unique_blocks(rng, 1, 40, 16)
    hot = np.asarray(blocks[0, :4])                 # the first group of 4 blocks
    c = np.array(codes)
    qc, _ = quantize_rows(q)
    for blk in hot:
        c[blk * 64:(blk + 1) * 64] = np.asarray(qc[0])
    codes = jnp.asarray(c)
    pm = jnp.full((1, 16, 2), 0xFFFFFFFF, jnp.uint32)
    bits = np.ones((1, 16, 64), bool)
    got = ivf_topk_pallas(q, codes, scale, blocks, pm, k=40, block=64, interpret=True)
    ids_match(got, brute(q, codes, scale, blocks, bits, 40, 64))


@pytest.mark.parametrize("step_items,k", [(64, 5), (128, 100), (192, 300), (1 << 15, 64)])
def test_twin_steps_and_segments_match_brute_force(rng, step_items, k):
    """The twin's loop over (query, live block) pairs: steps that cut across queries,
    queries whose live blocks differ in number (none, a few, all), every top_k size."""
    b, p, nb, d = 5, 24, 60, 48
    q, codes, scale, _, _, _ = make(rng, b=b, nb=nb, d=d, p=p)
    blocks = unique_blocks(rng, b, nb, p)
    density = np.array([0.5, 0.0, 0.02, 1.0, 0.2])[:, None, None]
    bits = rng.random((b, p, 64)) < density
    bits[4, :20] = False                         # query 4: live blocks only at the end
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    got = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64,
                             step_items=step_items)
    want = brute(q, codes, scale, blocks, bits, k, 64)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    ids_match(tuple(map(np.asarray, got)), want)
    assert np.all(np.asarray(got[1])[1] == -1)   # query 1 has nothing eligible
    if step_items == 128:   # the kernel skips the steps without an eligible item
        kern = ivf_topk_pallas(q, codes, scale, blocks, pm, k=k, block=64, interpret=True)
        ids_match(kern, want)


@pytest.mark.parametrize("cap", [1, 40, 512])
def test_set_bit_positions_match_flatnonzero(rng, cap):
    density = np.array([0.0, 0.01, 0.1, 0.5, 1.0, 0.03])[:, None]
    bits = rng.random((6, 320)) < density
    bits[5, :300] = False                                       # set bits only at the end
    words = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    got = np.asarray(set_bit_positions(words, cap))
    for b in range(6):
        want = np.flatnonzero(bits[b])[:cap]
        np.testing.assert_array_equal(got[b, :want.size], want)


@pytest.mark.parametrize("k", [1, 9, 100, 400])
def test_twin_item_path_equals_block_path(rng, k):
    """Scoring the compacted eligible items gives exactly what scoring the live blocks
    gives — scores, rows and the order among ties (codes in [-3, 3]: many ties)."""
    b, p, nb, d = 6, 30, 80, 56
    q, _, scale, _, _, _ = make(rng, b=b, nb=nb, d=d, p=p)
    codes = jnp.asarray(rng.integers(-3, 4, (nb * 64, d), dtype=np.int8))
    blocks = unique_blocks(rng, b, nb, p)
    density = np.array([0.0, 0.005, 0.05, 0.2, 0.6, 1.0])[:, None, None]
    bits = rng.random((b, p, 64)) < density
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    run = functools.partial(ivf_topk_reference, q, codes, scale, blocks, pm, k=k, block=64)
    by_blocks = tuple(map(np.asarray, run(by="blocks")))
    for by in ("items", "auto"):
        got = run(by=by)
        np.testing.assert_array_equal(np.asarray(got[0]), by_blocks[0])
        np.testing.assert_array_equal(np.asarray(got[1]), by_blocks[1])
    ids_match(by_blocks, brute(q, codes, scale, blocks, bits, k, 64))
    # a sparse mask (what auto sends down the item path) agrees too
    sparse = jnp.where(jnp.arange(b)[:, None, None] < 3, pm, jnp.uint32(0))
    run = functools.partial(ivf_topk_reference, q, codes, scale, blocks, sparse, k=k, block=64)
    for got, want in zip(run(), run(by="blocks")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("chunk,step", [(1, 64), (3, 192), (7, 4096), (32, 32768)])
def test_twin_block_path_chunking(rng, chunk, step):
    """Chunks of ``chunk`` probed blocks, several per loop step, queries of very different
    live counts (0 to all of P = 45): every chunking gives the brute-force result."""
    b, p, nb, d, k = 5, 45, 90, 48, 300
    q, codes, scale, _, _, _ = make(rng, b=b, nb=nb, d=d, p=p)
    blocks = unique_blocks(rng, b, nb, p)
    density = np.array([0.0, 0.02, 0.3, 1.0, 0.7])[:, None, None]
    bits = rng.random((b, p, 64)) < density
    bits[4, :30] = False                               # live blocks only at the end
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    got = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64, by="blocks",
                             chunk_blocks=chunk, step_items=step)
    ids_match(tuple(map(np.asarray, got)), brute(q, codes, scale, blocks, bits, k, 64))


def test_dispatcher_and_errors(rng):
    q, codes, scale, blocks, pm, _ = make(rng)
    a = ivf_topk(q, codes, scale, blocks, pm, k=7, block=64)
    b = ivf_topk(q, codes, scale, blocks, pm, k=7, block=64, backend="xla")
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    with pytest.raises(ValueError, match="pmask"):
        ivf_topk_reference(q, codes, scale, blocks, pm[:, :, :1], k=7, block=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        ivf_topk_reference(q, codes, scale, blocks, pm, k=7, block=48)
    with pytest.raises(ValueError, match="by must be"):
        ivf_topk_reference(q, codes, scale, blocks, pm, k=7, block=64, by="rows")


@pytest.mark.parametrize("k", [10, 1024])
def test_ivf_kernel_lowers_for_cuda(k):
    S = jax.ShapeDtypeStruct
    exp = lower_for_cuda(functools.partial(ivf_topk, k=k, block=64),
                         S((16, 128), jnp.float32), S((1 << 20, 128), jnp.int8),
                         S((1 << 20,), jnp.float32), S((16, 700), jnp.int32),
                         S((16, 700, 2), jnp.uint32))
    assert "xla.gpu.triton" in exp.mlir_module()
