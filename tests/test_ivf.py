"""IVF: layout, probe-then-filter == filter-then-probe, starvation fallback, re-rank."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import st_jax as st
from st_jax._ivf import ivf_layout, probe_list, probed_blocks
from st_jax._quant import quantize_rows
from st_jax.synthetic import clustered_catalogue, exact_filtered_topk, recall

from ._cuda import lower_for_cuda

N, D = 12_000, 32


@pytest.fixture(scope="module")
def cat():
    return clustered_catalogue(N, D, num_clusters=40, num_queries=12, seed=5)


@pytest.fixture(scope="module")
def index(cat):
    return st.build_index(cat.embeddings, num_clusters=48, store_embeddings="f32",
                          ivf_block=64)


def test_layout_is_a_padded_permutation():
    assign = np.array([2, 0, 2, 2, 1, 0, 2], np.int32)
    perm, start, count = ivf_layout(assign, 3, block=2, align=8)
    assert perm.shape == (8,)
    np.testing.assert_array_equal(count, [1, 1, 2])
    np.testing.assert_array_equal(start, [0, 1, 2])
    # cluster 0 = items 1, 5; cluster 1 = item 4 + hole; cluster 2 = 0, 2, 3, 6
    np.testing.assert_array_equal(perm, [1, 5, 4, -1, 0, 2, 3, 6])


def test_index_rows_hold_the_right_items(cat, index):
    perm = np.asarray(index.perm)
    real = perm >= 0
    assert real.sum() == N and np.unique(perm[real]).size == N
    m = st.quantize_int8(cat.embeddings)
    np.testing.assert_array_equal(np.asarray(index.items.codes)[real, :D],
                                  np.asarray(m.codes)[perm[real]])
    assert index.ivf.num_clusters >= 48
    sizes = np.asarray(index.ivf.block_count) * 64
    assert sizes.max() <= 2 * N / 48 + 64          # balancing bounded the largest cluster


def probe_of(index, q, nprobe):
    """The ``nprobe`` best clusters' blocks, as the first clusters of one wide probe list
    (one static width, so the eager ops compile once for every ``nprobe <= 16``)."""
    if nprobe > 16:
        return probed_blocks(index.ivf, jnp.asarray(q), nprobe)
    blocks, rank, _ = probe_list(index.ivf, jnp.asarray(q), 16)
    return blocks, rank < nprobe


def probe_reference(index, q, allow, k, nprobe):
    """Filter-then-probe: evaluate the filter on every item, keep the probed clusters'
    items, brute-force the Int8 top-k (numpy)."""
    blocks, valid = probe_of(index, q, nprobe)
    blk = index.ivf.block
    codes = np.asarray(index.items.codes, np.int64)
    scale = np.asarray(index.items.scale)
    qc, qs = quantize_rows(jnp.pad(jnp.asarray(q), ((0, 0), (0, codes.shape[1] - D))))
    perm = np.asarray(index.perm)
    out = []
    for b in range(q.shape[0]):
        rows = (np.asarray(blocks[b])[np.asarray(valid[b])][:, None] * blk + np.arange(blk)).ravel()
        rows = rows[perm[rows] >= 0]
        ok = allow[perm[rows]] if allow.ndim == 1 else allow[b, perm[rows]]
        rows = rows[ok]
        s = (codes[rows] @ np.asarray(qc[b], np.int64)).astype(np.float32) * scale[rows] * qs[b]
        top = rows[np.argsort(-s, kind="stable")[:k]]
        out.append(sorted(perm[top].tolist()))
    return out


@pytest.mark.parametrize("p,per_query", [(1.0, False), (0.3, False), (0.05, True)])
def test_probe_then_filter_equals_filter_then_probe(cat, index, p, per_query):
    rng = np.random.default_rng(0)
    allow = rng.random((12, N) if per_query else N) < p
    res = st.search(index, cat.queries, 20, allow, nprobe=6, min_eligible_factor=0)
    assert (np.asarray(res.path) == 1).all()
    want = probe_reference(index, cat.queries, allow, 20, 6)
    got = [sorted(r[r >= 0].tolist()) for r in np.asarray(res.ids)]
    assert got == want


@pytest.mark.parametrize("kind", ["100%", "20%", "10%", "1%", "0.1%", "cluster"])
def test_recall_with_rerank_at_every_pass_rate(cat, index, kind):
    rng = np.random.default_rng(1)
    allow = {"100%": None, "20%": rng.random(N) < 0.2, "10%": rng.random(N) < 0.1,
             "1%": rng.random(N) < 0.01, "0.1%": rng.random(N) < 0.001,
             "cluster": np.isin(cat.cluster, [1, 7]) & (rng.random(N) < 0.5)}[kind]
    k = 50
    # max_nprobe=32: the 20 % filter's starved queries widen (path 3), the more selective
    # ones cannot reach 16 k eligible items in 32 clusters and take the flat scan (path 2)
    res = st.search(index, cat.queries, k, allow, nprobe=8, rerank=4, max_nprobe=32)
    if kind == "20%":
        np.testing.assert_array_equal(np.asarray(res.path), 3)
    truth = exact_filtered_topk(cat.embeddings, cat.queries, k, allow)
    assert recall(np.asarray(res.ids), truth) >= 0.95
    eligible = N if allow is None else int(allow.sum())
    np.testing.assert_array_equal(np.asarray(res.count), min(k, eligible))
    if allow is not None:
        ids = np.asarray(res.ids)
        assert allow[ids[ids >= 0]].all()


def test_selective_filter_takes_the_flat_path(cat, index):
    allow = np.zeros(N, bool)
    allow[::997] = True                                 # 13 items
    res = st.search(index, cat.queries, 10, allow, nprobe=2)
    assert (np.asarray(res.path) == 2).all()
    truth = exact_filtered_topk(cat.embeddings, cat.queries, 10, allow)
    assert recall(np.asarray(res.ids), truth) == 1.0


def test_mostly_eligible_probe_never_falls_back(cat, index):
    """nprobe=2 holds ~500 items, far under 16 k at k=100: with no filter or a 90 % one the
    probe is what nprobe buys (path 1); with a 10 % filter it is starved (path 2)."""
    rng = np.random.default_rng(3)
    for allow, path in ((None, 1), (rng.random(N) < 0.9, 1), (rng.random(N) < 0.1, 2)):
        res = st.search(index, cat.queries, 100, allow, nprobe=2)
        assert (np.asarray(res.path) == path).all()
        assert (np.asarray(res.count) == 100).all()


def eligible_in_probe(index, q, allow, nprobe):
    """``i64[B]`` eligible items in each query's ``nprobe`` best clusters (numpy)."""
    blocks, valid = probe_of(index, q, nprobe)
    blk, perm = index.ivf.block, np.asarray(index.perm)
    rows = np.asarray(blocks)[:, :, None] * blk + np.arange(blk)            # [B, P, blk]
    ok = np.asarray(valid)[:, :, None] & (perm[rows] >= 0)
    return (ok & allow[np.maximum(perm[rows], 0)]).sum(axis=(1, 2))


def test_starved_query_widens_to_enough_clusters(cat, index):
    """A uniform 20 % filter starves nprobe=2 at k=20 (needs 16 * 20 = 320 eligible items):
    each query widens to the fewest clusters holding 320, and returns exactly the top-k of
    that probe (filter-then-probe reference at that query's widened nprobe)."""
    allow = np.random.default_rng(4).random(N) < 0.2
    k, nprobe, wide = 20, 2, 16
    res = st.search(index, cat.queries, k, allow, nprobe=nprobe, max_nprobe=wide)
    np.testing.assert_array_equal(np.asarray(res.path), 3)
    counts = np.stack([eligible_in_probe(index, cat.queries, allow, n)
                       for n in range(1, wide + 1)], axis=1)                 # [B, wide]
    reach = 1 + (counts < 16 * k).sum(axis=1)
    assert (reach > nprobe).all() and (reach <= wide).all()
    got = [sorted(r[r >= 0].tolist()) for r in np.asarray(res.ids)]
    for b in range(len(got)):
        assert got[b] == probe_reference(index, cat.queries[b:b + 1], allow, k, reach[b])[0]
    # widening off: the same queries take the exact flat scan
    off = st.search(index, cat.queries, k, allow, nprobe=nprobe, max_nprobe=nprobe)
    np.testing.assert_array_equal(np.asarray(off.path), 2)


def test_correlated_filter_is_not_widened(cat, index):
    """Eligible items all in one planted cluster: a probe far from it passes the filter at
    far under the index's rate, so its query takes the exact flat scan, never a widened
    probe that would stop at the first few clusters holding eligible items."""
    allow = cat.cluster == 3
    res = st.search(index, cat.queries, 10, allow, nprobe=2, max_nprobe=48)
    path = np.asarray(res.path)
    assert set(path.tolist()) <= {1, 2} and (path == 2).any()
    flat = st.search(st.build_index(cat.embeddings), cat.queries, 10, allow)
    np.testing.assert_array_equal(np.asarray(res.ids)[path == 2], np.asarray(flat.ids)[path == 2])


def test_attribute_filters_widen_as_allow_masks_do(cat):
    """An attribute filter runs on the probed words only, so the index-wide pass rate the
    widening test needs is estimated on a sample of words (every word at this size): a
    uniform 20 % filter widens (path 3) and a cluster-correlated one takes the flat scan,
    exactly as the same sets given as allow masks."""
    g = (np.random.default_rng(4).random(N) < 0.2).astype(np.int32)
    idx = st.build_index(cat.embeddings, num_clusters=48, ivf_block=64,
                         attributes={"g": g, "c": cat.cluster})
    for filt, allow, paths in (("g:1", g == 1, {3}), ("c:3", cat.cluster == 3, {1, 2})):
        a = st.search(idx, cat.queries, 20, filter=filt, nprobe=2, max_nprobe=16)
        b = st.search(idx, cat.queries, 20, allow, nprobe=2, max_nprobe=16)
        for x, y in zip((a.ids, a.scores, a.path), (b.ids, b.scores, b.path)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert set(np.asarray(a.path).tolist()) <= paths
        assert paths == {3} or (np.asarray(a.path) == 2).any()


def test_widening_search_lowers_for_cuda(cat, index):
    """The whole IVF search with the widening branch (Pallas filter and IVF-scan kernels
    inside ``lax.cond``) lowers for CUDA on a CPU-only machine."""
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), index)
    words = jax.ShapeDtypeStruct((index.num_words,), jnp.uint32)
    q = jax.ShapeDtypeStruct((4, D), jnp.float32)
    exp = lower_for_cuda(lambda idx, q, a: st.search(idx, q, 10, a, nprobe=2, max_nprobe=8),
                         specs, q, words)
    assert exp.platforms == ("cuda",) and "triton" in exp.mlir_module().lower()


def test_filtered_search_lowers_for_cuda_with_the_filter_kernel(cat):
    """An attribute-filtered IVF search lowered for CUDA from a CPU host takes the Pallas
    filter kernel (on the probed words) and no CPU custom call (the native filter mask)."""
    rng = np.random.default_rng(0)
    index = st.build_index(cat.embeddings, num_clusters=48, ivf_block=64,
                           attributes={"g": rng.integers(0, 5, N)})
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), index)
    q = jax.ShapeDtypeStruct((4, D), jnp.float32)
    exp = lower_for_cuda(lambda idx, q: st.search(idx, q, 10, filter="NOT g:2", nprobe=2,
                                                  max_nprobe=8), specs, q)
    text = exp.mlir_module()
    assert exp.platforms == ("cuda",) and "st_filter_eval_gather" in text
    assert "st_jax_filter_mask_cpu" not in text


@pytest.mark.parametrize("k", [5, 200])      # 3 * 200 candidates: the CPU per-query path
def test_rerank_scores_are_exact(cat, index, k):
    res = st.search(index, cat.queries, k, nprobe=8, rerank=3)
    ids = np.asarray(res.ids)
    want = np.einsum("bkd,bd->bk", cat.embeddings[ids], cat.queries)
    np.testing.assert_allclose(np.asarray(res.scores), want, rtol=1e-5, atol=1e-5)


def test_external_ids_and_jit(cat):
    ext = np.arange(N) + 10**6
    index = st.build_index(cat.embeddings, ids=ext, num_clusters=16)
    res = st.search(index, cat.queries, 7, nprobe=index.ivf.num_clusters)
    flat = st.search(st.build_index(cat.embeddings), cat.queries, 7)
    # probing every cluster, IVF equals the flat scan
    np.testing.assert_array_equal(np.asarray(res.ids), ext[np.asarray(flat.ids)])
    f = jax.jit(lambda idx, q: st.search(idx, q, 7, nprobe=4))
    np.testing.assert_array_equal(np.asarray(f(index, cat.queries).ids),
                                  np.asarray(st.search(index, cat.queries, 7, nprobe=4).ids))


def test_errors(cat, index):
    flat = st.build_index(cat.embeddings[:100])
    with pytest.raises(ValueError, match="IVF index"):
        st.search(flat, cat.queries, 5, nprobe=3)
    with pytest.raises(ValueError, match="store_embeddings"):
        st.search(flat, cat.queries, 5, rerank=2)
    with pytest.raises(ValueError, match="nprobe must be"):
        st.search(index, cat.queries, 5, nprobe=0)
    with pytest.raises(ValueError, match="nprobe must be"):
        st.search(index, cat.queries, 5, nprobe=True)
    with pytest.raises(ValueError, match="rerank must be"):
        st.search(st.build_index(cat.embeddings[:100], store_embeddings="bf16"), cat.queries,
                  5, rerank=True)
    for bad in (float("inf"), float("nan"), -1.0, None, True, "16"):
        with pytest.raises(ValueError, match="min_eligible_factor must be"):
            st.search(index, cat.queries, 5, min_eligible_factor=bad)
    with pytest.raises(ValueError, match="max_nprobe must be"):
        st.search(index, cat.queries, 5, nprobe=4, max_nprobe=3)
    with pytest.raises(ValueError, match="max_nprobe must be"):
        st.search(index, cat.queries, 5, nprobe=4, max_nprobe=index.ivf.num_clusters + 1)
    with pytest.raises(ValueError, match="max_nprobe needs an IVF index"):
        st.search(flat, cat.queries, 5, max_nprobe=3)
    with pytest.raises(ValueError, match="num_clusters"):
        st.build_index(cat.embeddings[:10], num_clusters=11)
    with pytest.raises(ValueError, match="multiple of 32"):
        st.build_index(cat.embeddings[:100], num_clusters=2, ivf_block=48)
