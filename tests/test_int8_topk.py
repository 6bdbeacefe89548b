"""The fused Int8 top-k: XLA twin vs brute force, Pallas kernel (interpret mode) vs twin,
and lowering of the kernel for CUDA from a CPU-only machine."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import st_jax as st
from pallas_kernels.int8_topk import (BlockSizes, hierarchy_fanout, int8_topk,
                                      int8_topk_pallas, int8_topk_reference, pack_mask,
                                      saturation_rate, unpack_mask)
from st_jax._quant import quantize_rows

from ._cuda import lower_for_cuda
from .conftest import clustered

SMALL = BlockSizes(block_n=64)   # 16 tiles for 1024 items: small interpret grids


def brute_force(q, m, allow, k, num_valid=None):
    """numpy int64 reference: exact int8 scores, masked, sorted (stable by id)."""
    qc, qs = quantize_rows(jnp.asarray(q))
    dots = np.asarray(qc, np.int64) @ np.asarray(m.codes, np.int64).T
    s = (dots.astype(np.float32) * np.asarray(m.scale)[None, :]) * np.asarray(qs)[:, None]
    n = s.shape[1]
    ok = np.ones_like(s, bool) if allow is None else np.broadcast_to(allow, s.shape)
    if num_valid is not None:
        ok = ok & (np.arange(n) < num_valid)
    s = np.where(ok, s, -np.inf)
    order = np.lexsort((np.signbit(s), -s), axis=-1)[:, :k]   # lax.top_k: +0.0 above -0.0
    vals = np.take_along_axis(s, order, axis=1)
    ids = np.where(vals > -np.inf, order, -1)
    if k > n:
        vals = np.pad(vals, ((0, 0), (0, k - n)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, k - n)), constant_values=-1)
    return vals, ids


def ids_match(got, want):
    """The same float bits (-0.0 is not 0.0 here), the same rows, the same order."""
    gv, gi = map(np.asarray, got)
    wv, wi = map(np.asarray, want)
    assert gv.shape == wv.shape and gi.shape == wi.shape
    np.testing.assert_array_equal(gv.view(np.uint32), wv.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(gi, wi)


def make(rng, b, n, d, p=0.4, per_query=False):
    x = clustered(rng, n, d)
    q = rng.standard_normal((b, d)).astype(np.float32)
    m = st.quantize_int8(x)
    allow = rng.random((b, n) if per_query else n) < p
    return q, m, allow


# ---------------- the XLA twin ----------------

@pytest.mark.parametrize("b,n,d,k", [(3, 1000, 50, 10), (5, 777, 33, 100), (2, 20000, 24, 64),
                                      (4, 300, 16, 300), (4, 300, 16, 500), (1, 5000, 1100, 7),
                                      (1, 20000, 1040, 1)])
@pytest.mark.parametrize("per_query", [False, True])
def test_twin_matches_brute_force(rng, b, n, d, k, per_query):
    q, m, allow = make(rng, b, n, d, per_query=per_query)
    got = int8_topk_reference(q, m.codes, m.scale, pack_mask(jnp.asarray(allow)), k=k)
    ids_match(got, brute_force(q, m, allow, k))


@pytest.mark.parametrize("n,k,fanout", [(60_000, 1024, 16), (70_000, 300, 4),
                                         (140_000, 2048, 4), (300_000, 1024, 8),
                                         (1_048_576, 1024, 16)])
def test_twin_fanout_shrinks_for_large_k(rng, n, k, fanout):
    """Past 64k items a large k takes a smaller fanout (more groups to pre-select from)
    instead of a top-k over every stored score; the result is still the brute force's."""
    assert hierarchy_fanout(n, k) == fanout
    if n > 300_000:
        return
    q, m, allow = make(rng, 2, n, 16, p=0.7)
    got = int8_topk_reference(q, m.codes, m.scale, pack_mask(jnp.asarray(allow)), k=k)
    ids_match(got, brute_force(q, m, allow, k))


def test_twin_no_mask_and_num_valid(rng):
    q, m, _ = make(rng, 3, 2000, 40)
    got = int8_topk_reference(q, m.codes, m.scale, None, k=50, num_valid=1500)
    ids_match(got, brute_force(q, m, None, 50, num_valid=1500))
    assert (np.asarray(got[1]) < 1500).all()


@pytest.mark.parametrize("n,k,p", [(4096, 10, 1.0), (4096, 50, 1.0), (70_000, 300, 1.0),
                                   (70_000, 100, 0.3)])
def test_twin_orders_ties_by_row(rng, n, k, p):
    """Equal scores come in row order, whichever path ran (hierarchy, stored scores), and
    the lowest rows win the ties at the k-th score: every distinct item is stored ~8 times,
    so most results are tied."""
    distinct = clustered(rng, n // 8, 24)
    x = distinct[rng.integers(0, n // 8, n)]
    q = rng.standard_normal((3, 24)).astype(np.float32)
    m = st.quantize_int8(x)
    allow = rng.random(n) < p
    vals, ids = map(np.asarray, int8_topk_reference(q, m.codes, m.scale,
                                                   pack_mask(jnp.asarray(allow)), k=k))
    wv, wi = brute_force(q, m, allow, k)
    np.testing.assert_array_equal(vals, wv)
    same = vals[:, 1:] == vals[:, :-1]
    assert same.sum() > k                                   # the data does tie
    assert (ids[:, 1:][same] > ids[:, :-1][same]).all()     # ties in row order
    # the brute force's ids (stable by row) everywhere, the ties at the k-th value included:
    # the lowest rows among them are kept, as lax.top_k over all scores keeps them
    np.testing.assert_array_equal(ids, wi)


def test_twin_all_masked(rng):
    q, m, _ = make(rng, 2, 500, 16)
    vals, ids = int8_topk_reference(q, m.codes, m.scale, jnp.zeros(16, jnp.uint32), k=5)
    assert (np.asarray(ids) == -1).all() and np.isneginf(np.asarray(vals)).all()


def test_mask_pack_roundtrip(rng):
    a = rng.random((3, 77)) < 0.5
    w = pack_mask(jnp.asarray(a))
    assert w.shape == (3, 3) and w.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(unpack_mask(w, 77)), a)
    # bit i of word i // 32, little-endian within the word
    one = np.zeros(40, bool)
    one[33] = True
    np.testing.assert_array_equal(np.asarray(pack_mask(jnp.asarray(one))), [0, 2])


# ---------------- the Pallas kernel in interpret mode ----------------

@pytest.mark.parametrize("b,n,d,k,per_query,p", [
    (5, 1000, 50, 37, False, 0.4),     # nothing a power of two
    (3, 999, 33, 10, True, 0.3),       # per-query masks
    (17, 700, 64, 5, False, 1.0),      # two query blocks
    (2, 300, 20, 300, False, 1.0),     # k = N
    (2, 300, 20, 512, True, 0.5),      # k > N
    (2, 600, 40, 8, False, 0.0),       # all masked
    (2, 900, 48, 200, False, 0.02),    # fewer eligible than k
])
def test_kernel_matches_twin(rng, b, n, d, k, per_query, p):
    q, m, allow = make(rng, b, n, d, p=p, per_query=per_query)
    mask = pack_mask(jnp.asarray(allow))
    want = int8_topk_reference(q, m.codes, m.scale, mask, k=k)
    got = int8_topk_pallas(q, m.codes, m.scale, mask, k=k, interpret=True, block_sizes=SMALL)
    ids_match(got, tuple(map(np.asarray, want)))
    ids_match(got, brute_force(q, m, allow, k))


def edge_scores(rng, kind, b, n, d):
    """``(q f32[b, d], codes i8[n, d], scale f32[n])``: most scores tied ("ties": tiny codes,
    integer queries), or +0.0 and -0.0 by underflow ("zeros")."""
    if kind == "ties":
        return (rng.integers(-1, 2, (b, d)).astype(np.float32),
                rng.integers(-1, 2, (n, d), dtype=np.int8), np.ones(n, np.float32))
    codes = rng.integers(-127, 128, (n, d), dtype=np.int8)
    codes[::3] = 0
    q = np.zeros((b, d), np.float32)
    q[:, 0] = 1e-30
    return q, codes, np.full(n, 1e-20, np.float32)


@pytest.mark.parametrize("kind", ["ties", "zeros"])
@pytest.mark.parametrize("k", [5, 37, 200])
def test_kernel_equals_twin_bit_for_bit_on_ties_and_zeros(rng, kind, k):
    """lax.top_k's order in the kernel too: of the items tied at the k-th score the lowest
    rows (though the strided tiles interleave rows), +0.0 above -0.0."""
    q, codes, scale = map(jnp.asarray, edge_scores(rng, kind, 3, 1024, 4))
    mask = pack_mask(jnp.asarray(rng.random(1024) < 0.7))
    want = tuple(map(np.asarray, int8_topk_reference(q, codes, scale, mask, k=k)))
    assert (want[0][:, 1:] == want[0][:, :-1]).any()                 # the data does tie
    got = int8_topk_pallas(q, codes, scale, mask, k=k, interpret=True, block_sizes=SMALL)
    ids_match(got, want)


def adversarial(rng, tiles=16, tn=64, d=32, hot=40):
    """Every top item sits in the same strided tile (items t, t + T, t + 2T, ...)."""
    n = tiles * tn
    x = rng.standard_normal((n, d)).astype(np.float32) * 0.1
    q = rng.standard_normal((2, d)).astype(np.float32)
    for j in range(hot):
        x[j * tiles + 3] = q[0] * (1 + 0.01 * j)
    return q, st.quantize_int8(x)


def test_kernel_saturated_tile_is_still_exact(rng):
    q, m = adversarial(rng)
    k = 20
    assert float(saturation_rate(q, m.codes, m.scale, k=k, interpret=True,
                                 block_sizes=SMALL)) > 0
    got = int8_topk_pallas(q, m.codes, m.scale, k=k, interpret=True, block_sizes=SMALL)
    ids_match(got, brute_force(q, m, None, k))


def test_kernel_inexact_mode_can_miss_but_never_returns_ineligible(rng):
    q, m = adversarial(rng)
    k = 20
    allow = np.ones(m.codes.shape[0], bool)
    allow[::5] = False
    mask = pack_mask(jnp.asarray(allow))
    vals, ids = int8_topk_pallas(q, m.codes, m.scale, mask, k=k, interpret=True,
                                 block_sizes=SMALL, exact=False)
    ids = np.asarray(ids)
    assert allow[ids[ids >= 0]].all()
    _, want = brute_force(q, m, allow, k)
    recall = np.mean([len(set(ids[b]) & set(want[b])) / k for b in range(2)])
    assert recall < 1.0   # the one-pass mode really is approximate on this input


def test_dispatcher_backends_agree(rng):
    q, m, allow = make(rng, 4, 800, 24)
    mask = pack_mask(jnp.asarray(allow))
    outs = [int8_topk(q, m.codes, m.scale, mask, k=16, backend=be, block_sizes=SMALL)
            for be in ("auto", "xla", "interpret")]
    for o in outs[1:]:
        ids_match(o, tuple(map(np.asarray, outs[0])))
    with pytest.raises(ValueError, match="backend"):
        int8_topk(q, m.codes, m.scale, mask, k=16, backend="tpu")


@pytest.mark.parametrize("bad,msg", [
    (dict(k=0), "k must be"), (dict(mask=jnp.zeros(3, jnp.uint32)), "mask must be"),
    (dict(mask=jnp.zeros(32, jnp.int32)), "uint32"), (dict(q=np.ones((2, 7), np.float32)), "D=7"),
])
def test_shape_errors(rng, bad, msg):
    q, m, _ = make(rng, 2, 1000, 16)
    args = dict(q=q, mask=None, k=5) | bad
    with pytest.raises(ValueError, match=msg):
        int8_topk_reference(args["q"], m.codes, m.scale, args["mask"], k=args["k"])


# ---------------- lowering for CUDA from CPU ----------------

@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("k,d", [(1, 128), (1024, 96), (4096, 200)])
def test_kernel_lowers_for_cuda(per_query, k, d):
    S = jax.ShapeDtypeStruct
    b, n = 64, 1 << 16
    w = n // 32
    exp = lower_for_cuda(functools.partial(int8_topk, k=k),
                         S((b, d), jnp.bfloat16), S((n, d), jnp.int8), S((n,), jnp.float32),
                         S((b, w) if per_query else (w,), jnp.uint32))
    text = exp.mlir_module()
    assert "xla.gpu.triton" in text     # the auto dispatcher chose the Pallas kernel
    assert exp.out_avals[0].shape == (b, k) and exp.out_avals[1].shape == (b, k)
