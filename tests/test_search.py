"""The public API: st.build_index / st.search."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import st_jax as st
from pallas_kernels import flat_scan
from st_jax import _search

from .conftest import clustered
from .test_int8_topk import brute_force, ids_match


@pytest.fixture
def small(rng):
    x = clustered(rng, 3000, 40)
    return x, st.build_index(x), rng.standard_normal((6, 40)).astype(np.float32)


def test_search_matches_brute_force(small, rng):
    x, index, q = small
    allow = rng.random(3000) < 0.3
    res = st.search(index, q, 25, allow)
    assert res.ids.shape == (6, 25) and res.scores.dtype == jnp.float32
    ids_match((res.scores, res.ids), brute_force(q, st.quantize_int8(x), allow, 25))
    np.testing.assert_array_equal(np.asarray(res.count), 25)
    assert allow[np.asarray(res.ids)].all()


def test_per_query_allow_and_packed_words(small, rng):
    x, index, q = small
    allow = rng.random((6, 3000)) < 0.1
    res = st.search(index, q, 10, allow)
    words = _search.eligibility_words(index, allow, 6)
    assert words.shape == (6, index.num_words)
    res2 = st.search(index, q, 10, words)
    np.testing.assert_array_equal(np.asarray(res.ids), np.asarray(res2.ids))
    for b in range(6):
        assert allow[b, np.asarray(res.ids[b])].all()


def test_allow_words_packs_once_for_flat_and_ivf(small, rng):
    x, index, q = small
    ivf = st.build_index(x, num_clusters=8)
    for idx in (index, ivf):
        for allow in (rng.random(3000) < 0.2, rng.random((6, 3000)) < 0.2):
            words = idx.allow_words(allow)
            assert words.dtype == jnp.uint32 and words.shape[-1] == idx.num_words
            kw = {"nprobe": 4} if idx.ivf is not None else {}
            a, b = st.search(idx, q, 10, allow, **kw), st.search(idx, q, 10, words, **kw)
            np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    with pytest.raises(ValueError, match="bool"):
        index.allow_words(np.ones(3000, np.int32))
    with pytest.raises(ValueError, match="bool"):
        index.allow_words(np.ones(2999, bool))


def test_fewer_eligible_than_k_pads(small):
    x, index, q = small
    allow = np.zeros(3000, bool)
    allow[[5, 77, 2999]] = True
    res = st.search(index, q, 8, allow)
    np.testing.assert_array_equal(np.asarray(res.count), 3)
    ids = np.asarray(res.ids)
    assert (np.sort(ids[:, :3], axis=1) == [5, 77, 2999]).all()
    assert (ids[:, 3:] == -1).all() and np.isneginf(np.asarray(res.scores)[:, 3:]).all()


def test_k_larger_than_catalogue(rng):
    x = rng.standard_normal((10, 8)).astype(np.float32)
    res = st.search(st.build_index(x), x[:2], 4096)
    assert res.ids.shape == (2, 4096)
    np.testing.assert_array_equal(np.asarray(res.count), 10)
    assert sorted(np.asarray(res.ids)[0, :10]) == list(range(10))


def test_external_ids(small):
    x, _, q = small
    ext = np.arange(3000) * 7 + 1_000_000
    index = st.build_index(x, ids=ext)
    res = st.search(index, q, 5)
    rows = st.search(st.build_index(x), q, 5).ids
    np.testing.assert_array_equal(np.asarray(res.ids), ext[np.asarray(rows)])


def test_sparse_path_equals_dense(rng):
    """Selective filters use a compacted sub-matrix in the XLA twin (the native CPU scan
    skips the ineligible rows itself); results must equal the dense scan."""
    n = 70_000
    x = rng.standard_normal((n, 16)).astype(np.float32)
    index = st.build_index(x)
    assert flat_scan._sparse_caps(index.num_rows)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    m = st.quantize_int8(x)
    for p, per_query in [(0.001, False), (0.01, True), (0.05, False), (0.5, False)]:
        allow = rng.random((3, n) if per_query else n) < p
        for backend in ("auto", "xla"):
            res = st.search(index, q, 50, allow, backend=backend)
            ids_match((res.scores, res.ids), brute_force(q, m, allow, 50))


def test_search_under_jit(small):
    x, index, q = small
    f = jax.jit(lambda idx, q: st.search(idx, q, 7))
    a, b = f(index, q), st.search(index, q, 7)
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(queries=np.ones((2, 39), np.float32)), r"\[B, 40\]"),
    (dict(queries=np.ones(40, np.float32)), "queries\\[None, :\\]"),
    (dict(queries=np.ones((2, 40), np.int32)), "f32 or bf16"),
    (dict(k=0), "k must be"), (dict(k=2.5), "k must be"),
    (dict(allow=np.ones(2999, bool)), r"bool\[3000\]"),
    (dict(allow=np.ones(3000, np.int8)), "dtype"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input(small, kwargs, msg):
    _, index, q = small
    args = dict(queries=q, k=5, allow=None) | kwargs
    backend = args.pop("backend", "auto")
    with pytest.raises(ValueError, match=msg):
        st.search(index, args["queries"], args["k"], args["allow"], backend=backend)


def test_nan_queries_named(small):
    _, index, q = small
    q = q.copy()
    q[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        st.search(index, q, 3)


def test_build_index_errors(rng):
    with pytest.raises(ValueError, match="non-empty 2-D"):
        st.build_index(np.zeros((0, 4), np.float32))
    x = rng.standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="unique"):
        st.build_index(x, ids=[1, 2, 2, 3, 4])
    with pytest.raises(ValueError, match="shape"):
        st.build_index(x, ids=[1, 2])
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="1 row\\(s\\): 2"):
        st.build_index(x)


def test_bytes_per_item(small):
    _, index, _ = small
    # codes (40 padded to 64) + scale, rows padded to 3072
    assert index.bytes_per_item() == pytest.approx(3072 * (64 + 4) / 3000)


def test_empty_batch_gives_empty_results(rng):
    """B = 0: [0, k] results from every search entry point (flat, IVF, filtered, fresh,
    sharded), and a wrong allow shape is still an error."""
    x = clustered(rng, 600, 16)
    attrs = {"g": [f"v{i % 5}" for i in range(600)]}
    q0 = np.zeros((0, 16), np.float32)
    for index in (st.build_index(x, attributes=attrs),
                  st.build_index(x, attributes=attrs, num_clusters=4)):
        for kw in ({}, {"filter": "g:v1"}, {"allow": np.zeros((0, 600), bool)}):
            res = st.search(index, q0, 5, **kw)
            assert res.ids.shape == res.scores.shape == (0, 5)
            assert res.count.shape == res.path.shape == (0,)
        with pytest.raises(ValueError, match="allow must be"):
            st.search(index, q0, 5, allow=np.zeros((3, 600), bool))
        res = st.fresh.search_fresh(index, st.fresh.create_fresh(index, 64), q0, 5)
        assert res.ids.shape == res.source.shape == (0, 5)
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("items",))
        assert st.sharded_search(st.shard_index(index, mesh), q0, 5).ids.shape == (0, 5)


def test_allow_of_another_dtype_is_refused_before_narrowing(rng):
    """64-bit words (or a 0/1 int mask) are an error naming the dtype on every entry point,
    checked before jax narrows them to 32 bits (which dropped the upper 32 items of each
    word)."""
    x = clustered(rng, 1000, 16)
    index = st.build_index(x)
    q = x[:2]
    w64 = np.full(index.num_words, 0xFFFFFFFF00000000, np.uint64)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("items",))
    calls = [lambda a: st.search(index, q, 10, a),
             lambda a: st.fresh.search_fresh(index, st.fresh.create_fresh(index, 64), q, 10, a),
             lambda a: st.sharded_search(st.shard_index(index, mesh), q, 10, a)]
    for call in calls:
        for bad in (w64, np.ones(1000, np.int64)):
            with pytest.raises(ValueError, match=f"got dtype {bad.dtype}"):
                call(bad)
    fresh = st.fresh.create_fresh(index, 64)
    with pytest.raises(ValueError, match="fresh_allow must be .* got dtype uint64"):
        st.fresh.search_fresh(index, fresh, q, 10, fresh_allow=np.zeros(2, np.uint64))
    ok = st.search(index, q, 10, [True] * 1000)                 # a list of bools is a mask
    assert np.asarray(ok.count).tolist() == [10, 10]
