"""Fresh index: add / delete / update as pure functions, the merged main + fresh search
(equal to a brute-force reference on the live items, exact filters including values only
fresh items have), no recompilation while capacity lasts, typed errors, compaction."""
import jax
import numpy as np
import pytest

import st_jax as st
from st_jax import _fresh as fr

from .test_int8_topk import brute_force, ids_match

D, N, K, B = 16, 700, 64, 4
TAGS = [f"t{i}" for i in range(6)]
rng = np.random.default_rng(7)
Q = rng.standard_normal((B, D)).astype(np.float32)

# (filter text, predicate on an item's {"tag": set, "year": set})
FILTERS = [
    ("tag:t1", lambda a: "t1" in a["tag"]),
    ("tag:fresh_only", lambda a: "fresh_only" in a["tag"]),
    ("NOT tag:t1 AND year IN (2001, 2003)", lambda a: "t1" not in a["tag"] and
     bool({2001, 2003} & a["year"])),
    ("tag:fresh_only OR (year:2077 AND NOT tag:t0)", lambda a: "fresh_only" in a["tag"] or
     (2077 in a["year"] and "t0" not in a["tag"])),
    ("NOT tag:fresh_only", lambda a: "fresh_only" not in a["tag"]),
]


def random_attrs(r, n, new_values=False):
    pool = TAGS + (["fresh_only", "zz"] if new_values else [])
    tags = [r.choice(pool, size=r.integers(0, 4), replace=False).tolist() for _ in range(n)]
    years = [int(r.choice([2000, 2001, 2002, 2003, 2004] + ([2077] if new_values else [])))
             if r.random() < 0.9 else None for _ in range(n)]
    return {"tag": tags, "year": years}


def as_sets(attrs, i):
    y = attrs.get("year", [None] * (i + 1))[i]
    return {"tag": set(attrs.get("tag", [[]] * (i + 1))[i]), "year": set() if y is None else {y}}


class Model:
    """The expected live item set: id -> (embedding, attribute sets)."""

    def __init__(self, ids, emb, attrs):
        self.items = {int(i): (emb[j], as_sets(attrs, j)) for j, i in enumerate(ids)}

    def add(self, ids, emb, attrs):
        for j, i in enumerate(ids):
            assert int(i) not in self.items
            self.items[int(i)] = (emb[j], as_sets(attrs, j))

    def delete(self, ids):
        for i in ids:
            del self.items[int(i)]

    def update(self, ids, emb=None, attrs=None):
        for j, i in enumerate(ids):
            e, a = self.items[int(i)]
            a = dict(a)
            if attrs is not None:
                a.update({f: as_sets(attrs, j)[f] for f in attrs})
            self.items[int(i)] = (e if emb is None else emb[j], a)

    def reference(self, q, k, pred=None):
        ids = np.array(sorted(self.items))
        emb = np.stack([self.items[i][0] for i in ids])
        allow = None if pred is None else np.array([pred(self.items[i][1]) for i in ids])
        vals, pos = brute_force(q, st.quantize_int8(emb), allow, k)
        return vals, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)


def check(res, want, model, fresh_ids):
    ids_match((res.scores, res.ids), want)
    ids, src = np.asarray(res.ids), np.asarray(res.source)
    for row_ids, row_src in zip(ids, src):
        valid = row_ids >= 0
        assert len(set(row_ids[valid])) == valid.sum()                 # no duplicates
        assert all(int(i) in model.items for i in row_ids[valid])        # nothing stale
        np.testing.assert_array_equal(row_src[valid], [int(i) in fresh_ids for i in row_ids[valid]])
        assert (row_src[~valid] == -1).all()
    np.testing.assert_array_equal(np.asarray(res.count), (ids >= 0).sum(1))


@pytest.fixture(scope="module")
def scenario():
    """A main index, then adds / deletes / updates of both kinds; returns the final state.
    Batches of <= 32 items: one compiled shape for every write."""
    r = np.random.default_rng(11)
    emb = r.standard_normal((N, D)).astype(np.float32)
    attrs = random_attrs(r, N)
    ids = r.permutation(10 * N)[:N]
    main = st.build_index(emb, ids=ids, attributes=attrs, bloom_bits=64, num_hashes=3)
    model = Model(ids, emb, attrs)
    fresh = fr.create_fresh(main, capacity=300, max_terms_per_item=8)
    new_ids = np.setdiff1d(np.arange(10 * N), ids)[r.permutation(9 * N)[:96]]
    for chunk in np.split(new_ids, 3):                          # 3 adds of 32 items
        e = r.standard_normal((chunk.size, D)).astype(np.float32)
        a = random_attrs(r, chunk.size, new_values=True)
        fresh = fr.add(main, fresh, chunk, e, a)
        model.add(chunk, e, a)
    dels = np.concatenate([ids[:22], new_ids[:10]])              # main and fresh items
    main, fresh = fr.delete(main, fresh, dels)
    model.delete(dels)
    up = np.concatenate([ids[40:60], new_ids[10:22]])            # embeddings only
    e = r.standard_normal((up.size, D)).astype(np.float32)
    main, fresh = fr.update(main, fresh, up, embeddings=e)
    model.update(up, emb=e)
    up = np.concatenate([ids[70:90], new_ids[25:37]])            # the tag field only
    a = {"tag": random_attrs(r, up.size, new_values=True)["tag"]}
    main, fresh = fr.update(main, fresh, up, attributes=a)
    model.update(up, attrs=a)
    up = np.concatenate([ids[100:110], new_ids[40:45], ids[40:45]])   # both, again
    e = r.standard_normal((up.size, D)).astype(np.float32)
    a = random_attrs(r, up.size, new_values=True)
    main, fresh = fr.update(main, fresh, up, embeddings=e, attributes=a)
    model.update(up, emb=e, attrs=a)
    fresh_ids = (set(new_ids[10:].tolist()) | set(ids[40:60].tolist()) |
                 set(ids[70:90].tolist()) | set(ids[100:110].tolist()))
    return main, fresh, model, fresh_ids


def per_query_reference(model, preds):
    rows = [model.reference(Q[b:b + 1], K, p) for b, p in enumerate(preds)]
    return np.concatenate([v for v, _ in rows]), np.concatenate([i for _, i in rows])


def test_merged_search_equals_reference(scenario):
    main, fresh, model, fresh_ids = scenario
    assert fresh.num_live == len(fresh_ids)
    check(fr.search_fresh(main, fresh, Q, K), model.reference(Q, K), model, fresh_ids)
    # per-query filters (one compiled program shape for every batch of them), F expressions
    batches = [FILTERS[:4], FILTERS[4:] + [(st.F.tag == "fresh_only", FILTERS[1][1])] +
               FILTERS[2:4]]
    for batch in batches:
        res = fr.search_fresh(main, fresh, Q, K, filter=[f for f, _ in batch])
        check(res, per_query_reference(model, [p for _, p in batch]), model, fresh_ids)


def test_value_only_in_fresh_items(scenario):
    main, fresh, model, fresh_ids = scenario
    holders = {i for i, (_, a) in model.items.items() if "fresh_only" in a["tag"]}
    assert holders and holders <= fresh_ids and len(holders) < K
    res = fr.search_fresh(main, fresh, Q, K, filter="tag:fresh_only")
    for row in np.asarray(res.ids):                   # k > eligible: padded, none invented
        assert set(row[row >= 0].tolist()) == holders                 # no FN, no FP
    np.testing.assert_array_equal(np.asarray(res.count), len(holders))
    assert "fresh_only" not in main.filters.schema.vocab["tag"]        # main never saw it


def test_allow_masks(scenario):
    main, fresh, model, fresh_ids = scenario
    main_ok = rng.random(N) < 0.5
    slot_ok = rng.random(fresh.capacity) < 0.5
    res = fr.search_fresh(main, fresh, Q, K, main_ok, fresh_allow=slot_ok)
    pos_ids = np.asarray(main.ids)
    slot_ids = np.asarray(fresh.slot_ids)[:fresh.capacity]
    in_main = set(pos_ids[main_ok].tolist()) - fresh_ids      # moved items follow fresh_allow
    allowed = in_main | set(slot_ids[slot_ok & (slot_ids >= 0)].tolist())
    sub = Model([], [], {})
    sub.items = {i: v for i, v in model.items.items() if i in allowed}
    ids_match((res.scores, res.ids), sub.reference(Q, K))


def test_tombstones_in_plain_search(scenario):
    main, fresh, model, _ = scenario
    res = st.search(main, Q, 300)                          # the main index alone
    got = np.asarray(res.ids)
    assert all(int(i) in model.items for i in got[got >= 0])
    assert int(np.bitwise_count(np.asarray(main.live)).sum()) == N - 22 - 20 - 20 - 10


def test_compact_equals_merged_search(scenario):
    main, fresh, model, fresh_ids = scenario
    new = fr.compact(main, fresh)
    assert new.num_items == len(model.items)
    texts = [FILTERS[i % len(FILTERS)][0] for i in range(B)]
    res = st.search(new, Q, K, filter=texts)
    for b in range(B):
        want = model.reference(Q[b:b + 1], K, FILTERS[b % len(FILTERS)][1])
        ids_match((res.scores[b:b + 1], res.ids[b:b + 1]), want)
    # the compacted index takes a new fresh index
    f2 = fr.create_fresh(new, 64, max_terms_per_item=8)
    f2 = fr.add(new, f2, [10 ** 6], 100 * Q[:1], {"tag": [["brand_new"]]})
    res = fr.search_fresh(new, f2, Q[:1], 1)
    assert int(res.ids[0, 0]) == 10 ** 6 and int(res.source[0, 0]) == 1


def test_no_recompilation_while_capacity_lasts(scenario):
    main, fresh, model, _ = scenario           # pure functions: the fixture is not changed
    r = np.random.default_rng(5)
    nid = iter(range(10 ** 5, 10 ** 5 + 1000))
    main_ids = [i for i in np.asarray(main.ids).tolist() if i in model.items][:20]
    jitted = [fr._merged_core, fr._write_core, fr._clear_core, fr._tombstone_core,
              fr._lookup_core, fr._gather_core]

    def step(main, fresh, i, tag):
        new = [next(nid) for _ in range(5)]
        e = r.standard_normal((5, D)).astype(np.float32)
        e[0] = 100 * Q[0]                      # new[1] takes it by update: top of query 0
        fresh = fr.add(main, fresh, new, e, {"tag": [[tag]] * 5, "year": [2001] * 5})
        main, fresh = fr.delete(main, fresh, [main_ids[2 * i], new[0]])
        main, fresh = fr.update(main, fresh, [new[1], main_ids[2 * i + 1]],
                                embeddings=e[:2], attributes={"tag": [[tag], ["t1"]]})
        res = fr.search_fresh(main, fresh, Q, K, filter=f"tag:{tag} OR year:2001")
        got = set(np.asarray(res.ids).ravel().tolist())
        assert new[0] not in got and main_ids[2 * i] not in got and new[1] in got
        return main, fresh

    main, fresh = step(main, fresh, 0, "t0")
    main, fresh = step(main, fresh, 1, "new0")
    before = [f._cache_size() for f in jitted]
    for i in range(2, 5):                 # new values, new filters, more items: same shapes
        main, fresh = step(main, fresh, i, f"new{i}")
    assert [f._cache_size() for f in jitted] == before
    # inside jax.jit, with a filter baked in before any item had its value
    baked = jax.jit(lambda m, f, q: fr.search_fresh(m, f, q, K, filter="tag:later"))
    assert (np.asarray(baked(main, fresh, Q).ids) == -1).all()
    fresh = fr.add(main, fresh, [5000 + 10 * N], 100 * Q[:1], {"tag": [["later"]]})
    got, want = baked(main, fresh, Q), fr.search_fresh(main, fresh, Q, K, filter="tag:later")
    assert int(got.ids[0, 0]) == 5000 + 10 * N
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert baked._cache_size() == 1


def test_rerank_and_ivf_main():
    r = np.random.default_rng(9)
    emb = r.standard_normal((900, D)).astype(np.float32)
    attrs = random_attrs(r, 900)
    main = st.build_index(emb, attributes=attrs, num_clusters=6, ivf_block=32,
                          store_embeddings="f32", bloom_bits=64, num_hashes=3)
    fresh = fr.create_fresh(main, 64, max_terms_per_item=8)
    e = r.standard_normal((20, D)).astype(np.float32)
    a = random_attrs(r, 20, new_values=True)
    fresh = fr.add(main, fresh, np.arange(900, 920), e, a)
    main, fresh = fr.update(main, fresh, [3, 905], embeddings=e[:2])
    main, fresh = fr.delete(main, fresh, [4, 906])
    allx = np.concatenate([emb, e])
    allx[3], allx[905] = e[0], e[1]
    keep = np.setdiff1d(np.arange(920), [4, 906])
    rebuilt = st.build_index(allx[keep], ids=keep, store_embeddings="f32")
    got = fr.search_fresh(main, fresh, Q, 10, nprobe=6, rerank=3)
    want = st.search(rebuilt, Q, 10, rerank=3)
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.ids), np.asarray(want.ids))


def test_errors():
    r = np.random.default_rng(3)
    emb = r.standard_normal((100, D)).astype(np.float32)
    main = st.build_index(emb, attributes=random_attrs(r, 100), bloom_bits=64, num_hashes=3)
    fresh = fr.create_fresh(main, 10, max_terms_per_item=8)
    e = r.standard_normal((4, D)).astype(np.float32)
    with pytest.raises(fr.DuplicateIdError, match="already live"):
        fr.add(main, fresh, [1, 200], e[:2])                 # 1 lives in main
    with pytest.raises(fr.DuplicateIdError, match="repeated"):
        fr.add(main, fresh, [300, 300], e[:2])
    fresh = fr.add(main, fresh, [200, 201], e[:2])
    with pytest.raises(fr.DuplicateIdError, match="already live"):
        fr.add(main, fresh, [201], e[:1])                    # lives in fresh
    with pytest.raises(fr.UnknownIdError, match="not live"):
        fr.delete(main, fresh, [5, 999])
    main, fresh = fr.delete(main, fresh, [5, 201])
    with pytest.raises(fr.UnknownIdError, match=r"\[5\]"):
        fr.delete(main, fresh, [5])                          # already deleted
    with pytest.raises(fr.UnknownIdError, match="add()"):
        fr.update(main, fresh, [777], embeddings=e[:1])
    fresh = fr.add(main, fresh, [5], e[:1])                  # a deleted id may come back
    with pytest.raises(ValueError, match=r"f32\[2, 16\]"):
        fr.add(main, fresh, [300, 301], e[:3])
    with pytest.raises(ValueError, match="NaN"):
        fr.add(main, fresh, [300], np.full((1, D), np.nan, np.float32))
    with pytest.raises(ValueError, match="unknown attribute field 'lang'"):
        fr.add(main, fresh, [300], e[:1], {"lang": ["en"]})
    with pytest.raises(ValueError, match="holds int values"):
        fr.add(main, fresh, [300], e[:1], {"year": ["1999"]})
    with pytest.raises(ValueError, match="at most 8"):
        fr.add(main, fresh, [300], e[:1], {"tag": [list("abcdefgh")], "year": [2000]})
    with pytest.raises(ValueError, match="give new embeddings"):
        fr.update(main, fresh, [5])
    # capacity 10: 4 slots used (200, 201, 5 + deleted 201 keeps its slot) -> 7 more fail
    assert fresh.num_used == 3
    with pytest.raises(fr.IndexFullError, match="compact"):
        fr.add(main, fresh, np.arange(300, 308), np.zeros((8, D), np.float32))
    fresh = fr.add(main, fresh, np.arange(300, 307), np.zeros((7, D), np.float32))
    with pytest.raises(fr.IndexFullError, match="10 of 10"):
        fr.update(main, fresh, [0], embeddings=e[:1])        # a main item needs a new slot
    main2, fresh2 = fr.update(main, fresh, [200], embeddings=e[1:2])   # fresh: in place
    assert fresh2.num_used == 10
    plain = st.build_index(emb)
    with pytest.raises(ValueError, match="attributes"):
        fr.add(plain, fr.create_fresh(plain, 8), [500], e[:1], {"tag": ["x"]})
    with pytest.raises(ValueError, match="another main index"):
        fr.add(plain, fresh, [500], e[:1])
    with pytest.raises(ValueError, match="capacity"):
        fr.create_fresh(main, 0)
