"""The served graph equals a step-by-step composition of the parts; merge, exclusion,
buckets, no recompilation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import serving
import st_jax as st
from serving._graph import exclusion_words, merge_candidates
from pallas_kernels.int8_topk import unpack_mask


def reference(retriever, model, user_ids, k, k0, filters, exclude_seen=True, rank="overarch",
              merge="union", nprobe=None):
    """Step by step with the public pieces: towers (TrainedModel), st.search per task on the
    bundle's index, numpy merge, OverArch on the bundle's embedding cache, Value Model."""
    index = retriever.index
    host = retriever.host
    rows = host.user_rows(user_ids)
    feats = host.user_features(rows)
    u = np.asarray(model.user_tower_apply(model.params["user_tower"],
                                          {f: jnp.asarray(v) for f, v in feats.items()}))
    t, b, _ = u.shape
    allow = None
    if exclude_seen:
        allow = np.ones((b, index.num_items), bool)
        for i, items in enumerate(host.seen_items(rows)):
            allow[i, host.positions_of(items)] = False
    per_task = []
    for j in range(t):
        res = st.search(index, u[j], k0, allow=allow, filter=filters, nprobe=nprobe)
        per_task.append(np.asarray(res.ids))
    cache = np.asarray(index.cache, np.float32)
    out_ids, out_scores = [], []
    for i in range(b):
        sets = [set(p[i][p[i] >= 0].tolist()) for p in per_task]
        cand = sorted(set.union(*sets) if merge == "union" else set.intersection(*sets))
        cand = np.array(cand, np.int64)
        if not cand.size:                           # nothing eligible: all padding
            out_ids.append(np.full(k, -1, np.int64))
            out_scores.append(np.full(k, -np.inf, np.float32))
            continue
        erow = host.row_of_pos[host.positions_of(cand)]
        emb = cache[erow][None]                                      # [1, C, D]
        if rank == "overarch":
            logits = model.overarch_apply(model.params["overarch"], jnp.asarray(u[:, i:i + 1]),
                                          jnp.asarray(emb))
            value = np.asarray(model.value_model_apply(jax.nn.sigmoid(logits)))[0]
        else:
            value = emb[0] @ u[0, i]
        order = np.argsort(-value, kind="stable")[:k]
        out_ids.append(np.pad(cand[order], (0, k - order.size), constant_values=-1))
        out_scores.append(np.pad(value[order], (0, k - order.size), constant_values=-np.inf))
    return np.stack(out_ids), np.stack(out_scores)


def _assert_same(out, ref_ids, ref_scores):
    np.testing.assert_allclose(out.scores, ref_scores, rtol=1e-5, atol=1e-5)
    same = out.ids == ref_ids
    # ties aside: where ids differ the scores must be equal
    np.testing.assert_allclose(out.scores[~same], ref_scores[~same], rtol=1e-6, atol=1e-6)
    assert same.mean() > 0.95


@pytest.mark.parametrize("rank", ["overarch", "retrieval"])
def test_graph_equals_reference_flat(flat_retriever, tiny_model, rank):
    r = flat_retriever.with_options(rank=rank)
    users = tiny_model.dataset.user_ids[:6]
    genre = tiny_model.dataset.item_attributes()["genres"][0][0]
    filters = [f"genres:{genre}", "*", f"NOT genres:{genre}", "decade:1990s OR decade:1980s",
               f"genres:{genre} AND NOT decade:1990s", "genres:no-such-genre"]
    out = r.recommend(users, filter=filters, k=10, k0=40)
    ref_ids, ref_scores = reference(r, tiny_model, users, 10, 40, filters, rank=rank)
    _assert_same(out, ref_ids, ref_scores)
    assert out.count[5] == 0 and (out.ids[5] == -1).all()       # matches nothing: padding
    assert (out.path == 0).all()
    att = tiny_model.dataset.item_attributes_by_id()
    for i in out.ids[0][out.ids[0] >= 0]:
        assert genre in att[int(i)]["genres"]
    for i in out.ids[2][out.ids[2] >= 0]:
        assert genre not in att[int(i)]["genres"]
    seen = r.host.seen_items(r.host.user_rows(users))
    for row, s in zip(out.ids, seen):
        assert not set(row.tolist()) & set(s.tolist())


def test_graph_equals_reference_ivf_intersection(ivf_bundle, tiny_model):
    r = serving.Retriever.load(ivf_bundle, merge="intersection")
    assert r.index.ivf is not None
    users = tiny_model.dataset.user_ids[10:14]
    out = r.recommend(users, filter="decade:1990s OR decade:2000s", k=8)
    ref_ids, ref_scores = reference(r, tiny_model, users, 8, 30,
                                    "decade:1990s OR decade:2000s", merge="intersection",
                                    nprobe=2)
    _assert_same(out, ref_ids, ref_scores)
    assert set(np.unique(out.path).tolist()) <= {1, 2}


def test_merge_candidates_union_and_intersection():
    rows = jnp.array([[5, 3, -1, 3, 7, -1], [1, 2, 4, 2, 4, 1]], jnp.int32)   # T=2, k0=3
    u = np.asarray(merge_candidates(rows, 2, "union"))
    assert [sorted(x[x >= 0].tolist()) for x in u] == [[3, 5, 7], [1, 2, 4]]
    i = np.asarray(merge_candidates(rows, 2, "intersection"))
    assert [sorted(x[x >= 0].tolist()) for x in i] == [[3], [1, 2, 4]]


def test_exclusion_words_clears_exactly_the_listed_rows():
    rng = np.random.default_rng(0)
    rows = rng.integers(-1, 200, (3, 40)).astype(np.int32)     # duplicates and -1 padding
    words = exclusion_words(jnp.asarray(rows), 224 // 32)
    got = np.asarray(unpack_mask(words, 224))
    for b in range(3):
        want = np.ones(224, bool)
        want[rows[b][rows[b] >= 0]] = False
        np.testing.assert_array_equal(got[b], want)


def test_buckets_and_no_recompilation(flat_retriever, tiny_model):
    r = flat_retriever.with_options()
    users = tiny_model.dataset.user_ids
    r.recommend(users[:3], filter="decade:1990s", k=5)              # bucket 8
    size = r._fn._cache_size()
    for lo, f in ((3, "decade:1980s"), (20, "NOT decade:1990s"), (50, "decade:2000s OR *")):
        r.recommend(users[lo:lo + 5], filter=f, k=5)                 # new users and filters
    assert r._fn._cache_size() == size
    one = np.concatenate([r.recommend(users[i:i + 1], k=5).ids for i in range(4)])
    np.testing.assert_array_equal(r.recommend(users[:4], k=5).ids, one)


def test_batches_beyond_the_largest_bucket_are_split(flat_bundle, tiny_model):
    r = serving.Retriever.load(flat_bundle, buckets=(1, 4))
    users = tiny_model.dataset.user_ids[:11]
    big = r.recommend(users, k=6)
    assert big.ids.shape == (11, 6)
    np.testing.assert_array_equal(big.ids[8:], r.recommend(users[8:], k=6).ids)


def test_fewer_candidates_than_k_pads(flat_retriever, tiny_model):
    out = flat_retriever.recommend(tiny_model.dataset.user_ids[:2], k=100, k0=3)
    assert out.ids.shape == (2, 100)
    assert (out.count <= 6).all() and (out.ids[:, 6:] == -1).all()
    assert np.isneginf(out.scores[:, 6:]).all()


def test_request_errors(flat_retriever, tiny_model):
    r = flat_retriever
    with pytest.raises(serving.UnknownUserError, match="unknown user ids"):
        r.recommend([10**9], k=5)
    with pytest.raises(serving.RequestError, match="k must be"):
        r.recommend(tiny_model.dataset.user_ids[:1], k=0)
    with pytest.raises(st.FilterError, match="column"):
        r.recommend(tiny_model.dataset.user_ids[:1], filter="genres:(", k=5)
    with pytest.raises(st.FilterError, match="got int"):
        r.recommend(tiny_model.dataset.user_ids[:1], filter=3, k=5)
    users = tiny_model.dataset.user_ids[:2]                     # an array of filters: one each
    np.testing.assert_array_equal(
        r.recommend(users, filter=np.array(["*", "decade:1990s"]), k=5).ids,
        r.recommend(users, filter=["*", "decade:1990s"], k=5).ids)
    feats = r.host.user_features(np.array([0, 1]))
    with pytest.raises(serving.RequestError, match="missing"):
        r({k: v for k, v in list(feats.items())[1:]}, k=5)
    with pytest.raises(serving.RequestError, match="unknown excluded ids"):
        r(feats, k=5, exclude=[[10**9], []])
    with pytest.raises(serving.RequestError, match="3 filters for 2 users"):
        r(feats, k=5, filter=["*", "*", "*"])
