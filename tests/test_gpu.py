"""On a CUDA GPU: every Pallas kernel, compiled and run for real (not interpret mode), equals
its XLA twin at serving sizes, and st.search with the kernels equals st.search with the twins.

Skipped where JAX has no GPU (CI). On a GPU machine:

    JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import st_jax as st
from st_jax.synthetic import clustered_catalogue
from pallas_kernels.int8_topk import (int8_topk_pallas, int8_topk_reference, pack_mask,
                                      saturation_rate)
from pallas_kernels.ivf_scan import ivf_topk_pallas, ivf_topk_reference

from .test_int8_topk import adversarial, brute_force, ids_match

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU (JAX_PLATFORMS=cuda)")


def _np(t):
    return tuple(map(np.asarray, t))


@pytest.mark.parametrize("b,n,d,k,p,per_query", [
    (64, 300_000, 128, 1024, 1.0, False),
    (16, 300_000, 128, 100, 0.1, False),
    (16, 300_000, 128, 10, 0.01, True),
    (5, 100_003, 96, 37, 0.4, False),        # nothing a power of two
    (8, 50_000, 64, 2048, 0.02, False),      # fewer eligible than k
    (4, 20_000, 32, 16, 0.0, False),         # all masked
])
def test_int8_kernel_equals_twin(b, n, d, k, p, per_query):
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
    m = st.quantize_int8(x)
    allow = rng.random((b, n) if per_query else n) < p
    mask = pack_mask(jnp.asarray(allow))
    got = jax.jit(lambda: int8_topk_pallas(q, m.codes, m.scale, mask, k=k))()
    want = jax.jit(lambda: int8_topk_reference(q, m.codes, m.scale, mask, k=k))()
    ids_match(_np(got), _np(want))


def test_int8_kernel_saturated_tiles_stay_exact():
    rng = np.random.default_rng(5)
    q, m = adversarial(rng, tiles=512, tn=256, d=64, hot=200)   # tn = default block_n
    assert float(saturation_rate(q, m.codes, m.scale, k=150)) > 0
    got = int8_topk_pallas(q, m.codes, m.scale, k=150)
    ids_match(_np(got), brute_force(q, m, None, 150))


@pytest.mark.parametrize("b,nb,block,d,p,k,density", [
    (16, 4096, 64, 128, 256, 1024, 1.0),
    (16, 4096, 64, 128, 64, 100, 0.1),
    (5, 1000, 128, 96, 33, 37, 0.01),
    (3, 200, 64, 40, 13, 5, 0.0),
])
def test_ivf_kernel_equals_twin(b, nb, block, d, p, k, density):
    rng = np.random.default_rng(nb + k)
    codes = jnp.asarray(rng.integers(-127, 128, (nb * block, d), dtype=np.int8))
    scale = jnp.asarray(rng.random(nb * block, dtype=np.float32))
    q = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
    blocks = jnp.asarray(np.stack([rng.choice(nb, p, replace=False)
                                   for _ in range(b)]).astype(np.int32))
    bits = rng.random((b, p, block)) < density
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    got = ivf_topk_pallas(q, codes, scale, blocks, pm, k=k, block=block)
    want = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=block)
    ids_match(_np(got), _np(want))


def test_filter_kernel_equals_twin():
    from st_jax._filter_index import build_filter_index, filter_mask
    from st_jax._filter_lang import compile_filter
    rng = np.random.default_rng(2)
    n = 200_000
    attrs = {"t": [[f"v{int(x)}" for x in rng.integers(0, 500, 4)] for _ in range(n)],
             "c": [f"c{int(x)}" for x in rng.integers(0, 30, n)]}
    fi = build_filter_index(attrs, n, 1 << 18, bloom_bits=256, num_hashes=3)
    prog = compile_filter(fi, ["c:c1 AND NOT (t:v1 OR t:v2)", "t:v3 | !c:c0",
                               "(c:c4 OR c:c5) AND t:v9", "NOT c:c7"], 4)
    a = filter_mask(fi, prog, backend="pallas")
    b = filter_mask(fi, prog, backend="xla")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # "auto" (the CUDA branch of the platform dispatch) on all words and on selected words
    # (the probed words of an IVF search; -1 padding and out-of-range ids give 0)
    np.testing.assert_array_equal(np.asarray(filter_mask(fi, prog)), np.asarray(b))
    words = rng.integers(-1, fi.rows.shape[1] + 2, (4, 300)).astype(np.int32)
    np.testing.assert_array_equal(
        np.asarray(filter_mask(fi, prog, word_ids=words)),
        np.asarray(filter_mask(fi, prog, word_ids=words, backend="xla")))


@pytest.fixture(scope="module")
def catalogue():
    cat = clustered_catalogue(200_000, 64, num_queries=16, seed=3)
    rng = np.random.default_rng(4)
    n = cat.embeddings.shape[0]
    attrs = {"country": [f"c{int(x)}" for x in rng.integers(0, 20, n)],
             "tag": [[f"t{int(x)}" for x in rng.integers(0, 200, 3)] for _ in range(n)]}
    flat = st.build_index(cat.embeddings, attributes=attrs)
    ivf = st.build_index(cat.embeddings, attributes=attrs, num_clusters=256,
                         store_embeddings="bf16")
    return cat, flat, ivf


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("filt,p", [(None, 1.0), ("country:c3 AND NOT tag:t1", 1.0),
                                    (None, 0.1), (None, 0.002)])
def test_search_kernels_equal_twins(catalogue, kind, filt, p):
    cat, flat, ivf = catalogue
    index = flat if kind == "flat" else ivf
    n = cat.embeddings.shape[0]
    allow = None if p == 1.0 else np.random.default_rng(7).random(n) < p
    kw = {} if kind == "flat" else {"nprobe": 16}
    outs = [st.search(index, cat.queries, 100, allow, filter=filt, backend=be, **kw)
            for be in ("pallas", "xla")]
    if filt is not None:          # "auto": the filter mask through the platform dispatch
        auto = st.search(index, cat.queries, 100, allow, filter=filt, **kw)
        np.testing.assert_array_equal(np.asarray(auto.ids), np.asarray(outs[0].ids))
    np.testing.assert_array_equal(np.asarray(outs[0].path), np.asarray(outs[1].path))
    np.testing.assert_array_equal(np.asarray(outs[0].count), np.asarray(outs[1].count))
    ids_match((outs[0].scores, outs[0].ids), _np((outs[1].scores, outs[1].ids)))


def test_jitted_search_takes_the_kernels_on_gpu(catalogue):
    cat, _, ivf = catalogue
    f = jax.jit(lambda q: st.search(ivf, q, 64, nprobe=16, rerank=4))
    text = f.lower(cat.queries).as_text()
    assert "triton" in text.lower()
    got = f(cat.queries)
    want = st.search(ivf, cat.queries, 64, nprobe=16, rerank=4, backend="xla")
    np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(want.ids))
