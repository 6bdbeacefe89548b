"""Filtered search end to end: random nested AND/OR/NOT filters over multi-valued fields
through st.search on flat and IVF indexes — 0 false positives, 0 false negatives (results
equal the brute-force Int8 top-k of the eligible items) and count == min(k, eligible)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import st_jax as st

from .test_filter_index import ATTRS, N_ITEMS, SETS, ref_eval, to_F, to_text, tree
from .test_int8_topk import brute_force, ids_match

B, K = 4, 12
rng = np.random.default_rng(3)
EMB = rng.standard_normal((N_ITEMS, 24)).astype(np.float32)
Q = rng.standard_normal((B, 24)).astype(np.float32)


@pytest.fixture(scope="module")
def indexes():
    flat = st.build_index(EMB, attributes=ATTRS, bloom_bits=32, num_hashes=3)
    ivf = st.build_index(EMB, attributes=ATTRS, num_clusters=6, bloom_bits=32, num_hashes=3,
                         ivf_block=32)
    return flat, ivf


def allowed(trees):
    return np.array([[ref_eval(t, SETS[i]) for i in range(N_ITEMS)] for t in trees])


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hst.lists(tree, min_size=B, max_size=B), hst.booleans())
def test_random_filters_exact(indexes, trees, use_builder):
    flat, ivf = indexes
    filters = [to_F(t) if use_builder else to_text(t) for t in trees]
    allow = allowed(trees)
    want = brute_force(Q, st.quantize_int8(EMB), allow, K)
    expect_count = np.minimum(K, allow.sum(1))
    for index, kw in [(flat, {}), (ivf, {"nprobe": ivf.ivf.num_clusters}), (ivf, {"nprobe": 2})]:
        res = st.search(index, Q, K, filter=filters, **kw)
        ids = np.asarray(res.ids)
        for b in range(B):                                       # 0 false positives
            assert allow[b, ids[b][ids[b] >= 0]].all()
        np.testing.assert_array_equal(np.asarray(res.count), expect_count)
        if kw.get("nprobe", 0) != 2:                              # exhaustive: 0 false negatives
            ids_match((res.scores, res.ids), want)


def test_shared_filter_combined_with_allow(indexes):
    flat, _ = indexes
    f = "NOT tag:t0 AND (country:c0 OR country:c1)"
    allow = rng.random(N_ITEMS) < 0.5
    res = st.search(flat, Q, K, allow, filter=f)
    truth = np.array([(("t0" not in s["tag"]) and bool({"c0", "c1"} & s["country"]))
                      for s in SETS]) & allow
    ids_match((res.scores, res.ids), brute_force(Q, st.quantize_int8(EMB), truth, K))


def test_filter_errors(indexes):
    flat, _ = indexes
    with pytest.raises(st.FilterError, match="unknown field"):
        st.search(flat, Q, 3, filter="lang:en")
    with pytest.raises(ValueError, match="column"):
        st.search(flat, Q, 3, filter="country:c0 AND (")
    with pytest.raises(st.FilterError):
        st.search(flat, Q, 3, filter=["country:c0"] * (B + 1))
    with pytest.raises(ValueError, match="attributes"):
        st.search(st.build_index(EMB), Q, 3, filter="country:c0")
    for bad in (3, 2.5, {"country:c0"}, (f for f in ["country:c0"] * B),
                np.array([["country:c0"] * B])):
        with pytest.raises(st.FilterError, match="a string, an st.F expression"):
            st.search(flat, Q, 3, filter=bad)


def test_filters_as_a_numpy_array(indexes):
    """A 1-D numpy array of filters is one per query, as a list is (the serving API takes
    the same)."""
    flat, ivf = indexes
    fl = [("country:c0" if i % 2 else "NOT tag:t0") for i in range(B)]
    for index in (flat, ivf):
        a = st.search(index, Q, K, filter=np.array(fl))
        b = st.search(index, Q, K, filter=fl)
        np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))


def test_match_everything_filters_skip_the_mask(indexes):
    flat, ivf = indexes
    for index in (flat, ivf):
        plain = st.search(index, Q, K)
        for f in ("*", "", st.F.all(), ["*"] * B):
            res = st.search(index, Q, K, filter=f)
            np.testing.assert_array_equal(np.asarray(res.ids), np.asarray(plain.ids))
    # a syntax error is still reported by the compiler, with its column
    with pytest.raises(st.FilterError, match="column"):
        st.search(flat, Q, 3, filter="* AND (")


def test_user_programs_shared_by_task_queries():
    """prog_tasks (the served graph's T task queries per user): a program per user serves
    its task queries -- the same results and paths as the programs tiled per query, on the
    probe, the widened probe and the flat fallback."""
    import jax
    import jax.numpy as jnp

    from st_jax._filter_index import compile_filter
    from st_jax._search import _search_core
    from st_jax.synthetic import clustered_catalogue

    n, users, tasks = 12_000, 5, 2
    cat = clustered_catalogue(n, 32, num_clusters=40, num_queries=users * tasks, seed=3)
    rng = np.random.default_rng(3)
    g = rng.integers(0, 50, n)
    g[rng.random(n) < 0.1] = 7                        # g:7 ~11 %, others ~1.8 %, g:99 none
    index = st.build_index(cat.embeddings, num_clusters=48, attributes={"g": g})
    d_pad = index.items.codes.shape[1]
    q = jnp.pad(jnp.asarray(cat.queries), ((0, 0), (0, d_pad - 32)))
    kw = dict(k=10, nprobe=4, rerank=0, min_eligible_factor=16.0, backend="auto",
              max_nprobe=24)
    paths = set()
    for filters in (["g:7", "g:7 OR g:4", "NOT g:7", "g:7", "g:7 OR g:1"],    # probe, widened
                    ["g:7", "g:3", "g:7 OR g:4", "g:99", "NOT g:7"]):         # flat fallback
        prog = compile_filter(index.filters, filters, batch_size=users)
        tiled = jax.tree_util.tree_map(
            lambda a: jnp.tile(a, (tasks,) + (1,) * (a.ndim - 1)), prog)
        got = _search_core(index, q, None, prog, prog_tasks=tasks, **kw)
        want = _search_core(index, q, None, tiled, **kw)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        paths |= set(np.asarray(got[2]).tolist())
    assert paths == {1, 2, 3}
