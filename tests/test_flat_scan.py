"""The flat filtered scan (pallas_kernels.flat_scan): the native CPU kernel against brute force
and the XLA twin, its dispatch (native in jit, twin in jax.export, Pallas kernel for CUDA),
and the generic (non-VNNI) build."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import st_jax as st
from pallas_kernels import native
from pallas_kernels.flat_scan import flat_topk, flat_topk_native, flat_topk_reference
from pallas_kernels.int8_topk import int8_scores_reference, pack_mask

from ._cuda import lower_for_cuda

needs_compiler = pytest.mark.skipif(native._compiler() is None,
                                    reason="no C++ compiler on this machine")


def make(rng, n, d, b, density=1.0, per_query=False):
    codes = jnp.asarray(rng.integers(-127, 128, (n, d), dtype=np.int8))
    scale = jnp.asarray(rng.random(n, dtype=np.float32) + 0.01)
    q = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
    mask = None
    if density < 1.0:
        mask = pack_mask(jnp.asarray(rng.random((b, n) if per_query else n) < density))
    return q, codes, scale, mask


def brute(q, codes, scale, mask, k, num_valid=None):
    """Exact top-k in lax.top_k's order: best first, +0.0 above -0.0, equal scores by
    ascending row; -inf / -1 padded."""
    s = np.asarray(int8_scores_reference(q, codes, scale, mask, num_valid=num_valid))
    order = np.lexsort((np.signbit(s), -s), axis=-1)[:, :k]
    v = np.take_along_axis(s, order, axis=1)
    rows = np.where(v > -np.inf, order, -1)
    pad = k - v.shape[1]
    return (np.pad(v, ((0, 0), (0, pad)), constant_values=-np.inf),
            np.pad(rows, ((0, 0), (0, pad)), constant_values=-1))


def same(got, want):
    """Bit for bit (-0.0 is not 0.0 here)."""
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, (g.shape, w.shape)
        if np.float32 in (g.dtype, w.dtype):
            g, w = g.astype(np.float32).view(np.uint32), w.astype(np.float32).view(np.uint32)
        np.testing.assert_array_equal(g, w)


CASES = [  # n, d, b, k, density, per_query, num_valid
    (5000, 128, 8, 10, 1.0, False, None),       # VNNI layout, unfiltered
    (5000, 128, 5, 300, 0.3, True, None),       # per-query masks, B not a multiple of 4
    (4100, 192, 6, 50, 0.5, False, 4050),       # 3 VNNI chunks; padding rows (num_valid)
    (3000, 37, 7, 20, 0.4, True, None),         # D not a multiple of 4: padded layout
    (2000, 64, 2, 40, 1.0, False, None),        # few queries: row-by-row dots
    (2000, 40, 1, 9, 0.05, True, None),         # one query, selective, plain dots
    (777, 32, 4, 2000, 0.5, True, 700),         # k > eligible: padding
    (3000, 96, 5, 30, 0.0, False, None),        # nothing eligible
    (40_000, 128, 12, 512, 0.005, False, None),   # sparse: tiles of scattered rows
]


@needs_compiler
@pytest.mark.parametrize("n,d,b,k,density,per_query,num_valid", CASES)
def test_native_equals_brute_force_and_twin(rng, n, d, b, k, density, per_query, num_valid):
    q, codes, scale, mask = make(rng, n, d, b, density, per_query)
    got = flat_topk_native(q, codes, scale, mask, k=k, num_valid=num_valid)
    same(got, brute(q, codes, scale, mask, k, num_valid))
    same(got, flat_topk_reference(q, codes, scale, mask, k=k, num_valid=num_valid))
    same(jax.jit(functools.partial(flat_topk, k=k, num_valid=num_valid))(q, codes, scale, mask),
         got)


@needs_compiler
def test_padding_bits_past_num_valid_are_never_returned(rng):
    q, codes, scale, _ = make(rng, 3000, 64, 5)
    mask = jnp.full((5, 3000 // 32 + 1), 0xFFFFFFFF, jnp.uint32)   # bits past N and num_valid
    for fn in (flat_topk_native, flat_topk_reference):
        v, rows = fn(q, codes, scale, mask, k=3000, num_valid=2500)
        assert int(jnp.max(rows)) == 2499 and int(jnp.sum(rows >= 0)) == 5 * 2500


@needs_compiler
def test_ties_come_in_row_order(rng):
    """Repeated rows score the same: they come out by ascending row, as lax.top_k orders."""
    q, codes, scale, _ = make(rng, 64, 64, 6)
    codes = jnp.tile(codes, (40, 1))                 # 40 copies of 64 rows
    scale = jnp.ones((codes.shape[0],), jnp.float32)
    for k in (5, 100, 2000):
        same(flat_topk_native(q, codes, scale, k=k), brute(q, codes, scale, None, k))


@needs_compiler
def test_auto_uses_native_in_jit_and_twin_in_export(rng):
    q, codes, scale, mask = make(rng, 3000, 64, 4, 0.5)
    fn = jax.jit(functools.partial(flat_topk, k=9))
    assert native.FLAT_SCAN_TARGET in fn.lower(q, codes, scale, mask).as_text()
    exp = export.export(fn, platforms=["cpu"])(q, codes, scale, mask)
    assert native.FLAT_SCAN_TARGET not in exp.mlir_module()
    exp = export.deserialize(exp.serialize())
    same(exp.call(q, codes, scale, mask), flat_topk_reference(q, codes, scale, mask, k=9))


@needs_compiler
def test_vmap(rng):
    q, codes, scale, mask = make(rng, 2000, 64, 4, 0.5)
    qs = jnp.stack([q, -q, 2 * q])
    got = jax.vmap(lambda x: flat_topk(x, codes, scale, mask, k=5))(qs)
    for i in range(3):
        same((got[0][i], got[1][i]), flat_topk_reference(qs[i], codes, scale, mask, k=5))


def test_lowers_for_cuda_with_the_pallas_kernel():
    """backend="auto" exported for CUDA: the compaction branches and the Pallas kernel."""
    S = jax.ShapeDtypeStruct
    b, n, d, k = 16, 1 << 17, 128, 256
    exp = lower_for_cuda(functools.partial(flat_topk, k=k),
                         S((b, d), jnp.float32), S((n, d), jnp.int8), S((n,), jnp.float32),
                         S((n // 32,), jnp.uint32))
    text = exp.mlir_module()
    assert "xla.gpu.triton" in text and native.FLAT_SCAN_TARGET not in text
    assert exp.out_avals[0].shape == (b, k)


@needs_compiler
def test_flat_index_search_native_equals_twin(rng):
    """st.search on a flat index: native (auto) and twin give the same ids and scores,
    unfiltered, shared, per-query and attribute-filtered."""
    n = 20_000
    x = rng.standard_normal((n, 48)).astype(np.float32)
    index = st.build_index(x, attributes={"g": rng.integers(0, 8, n)})
    q = rng.standard_normal((9, 48)).astype(np.float32)
    for allow, filt in [(None, None), (rng.random(n) < 0.1, None),
                        (rng.random((9, n)) < 0.02, None), (None, "g:3")]:
        a = st.search(index, q, 64, allow, filter=filt)
        b = st.search(index, q, 64, allow, filter=filt, backend="xla")
        same((a.ids, a.scores, a.count), (b.ids, b.scores, b.count))


@needs_compiler
@pytest.mark.parametrize("flags", ["-mno-avx512vnni -O0", "-mno-avx2 -O0"],
                         ids=["avx2", "plain"])
def test_generic_build_without_vnni(tmp_path, flags):
    """A CPU without AVX-512 VNNI runs the AVX2 code (flat scan: blocks of 4 queries x 2
    rows; dots 4 rows at a time), one without AVX2 the plain C++ loops: each built here with
    those switched off (in a fresh process, its own cache; -O0: half the compile time), they
    must return what brute force returns."""
    script = textwrap.dedent("""
        import numpy as np
        from pallas_kernels import native
        from pallas_kernels.flat_scan import flat_topk_native
        from pallas_kernels.ivf_scan import ivf_topk_native, ivf_topk_reference
        from tests.test_flat_scan import CASES, brute, make, same
        native.ensure_loaded()
        rng = np.random.default_rng(0)
        for n, d, b, k, density, per_query, num_valid in [CASES[i] for i in (0, 1, 2, 3, 5, 6)]:
            q, codes, scale, mask = make(rng, n, d, b, density, per_query)
            got = flat_topk_native(q, codes, scale, mask, k=k, num_valid=num_valid)
            same(got, brute(q, codes, scale, mask, k, num_valid))
        blocks = np.stack([rng.choice(40, 9, replace=False) for _ in range(3)]).astype(np.int32)
        pm = rng.integers(0, 2**32, (3, 9, 2), dtype=np.uint32)
        q, codes, scale, _ = make(rng, 40 * 64, 128, 3)
        same(ivf_topk_native(q, codes, scale, blocks, pm, k=50, block=64),
             ivf_topk_reference(q, codes, scale, blocks, pm, k=50, block=64))
        print(native.loaded_path(), native.isa())
    """)
    env = dict(os.environ, ST_JAX_CACHE_DIR=str(tmp_path),
               ST_JAX_NATIVE_CXXFLAGS=flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(tmp_path) in res.stdout
    assert res.stdout.strip().endswith({"-mno-avx512vnni -O0": "avx2",
                                        "-mno-avx2 -O0": "plain C++"}[flags])
