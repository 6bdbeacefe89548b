"""Sharded search on 4 forced CPU host devices equals the single-device index (ids, scores,
paths), flat and IVF, with filters, allow masks, rerank and tombstones. JAX is already
initialised with one device in the test process, so the sharded checks run in a
subprocess."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import Mesh

import st_jax as st
from st_jax import _shard as sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import Mesh
    import st_jax as st
    from st_jax import _fresh as fr, _search
    from st_jax import _shard as sh

    assert jax.device_count() == 4, jax.devices()
    r = np.random.default_rng(0)
    N, D, B, K = 3000, 16, 4, 20
    x = r.standard_normal((N, D)).astype(np.float32)
    tags = ["a", "b", "c", "d", "e", "f"]
    attrs = {"tag": [r.choice(tags, size=r.integers(0, 3), replace=False).tolist()
                     for _ in range(N)], "year": r.integers(2000, 2010, N)}
    for i in (5, 1500, 2999):                               # on 3 different shards
        attrs["tag"][i] = attrs["tag"][i] + ["rare"]
    ids = r.permutation(10 * N)[:N]
    index = st.build_index(x, ids=ids, attributes=attrs, store_embeddings="f32",
                           bloom_bits=64, num_hashes=3)
    mesh = Mesh(np.array(jax.devices()), ("items",))
    si = sh.shard_index(index, mesh)
    # 4 shards of 1024 rows, one per device (the last one is all padding: 3000 < 4 * 1024)
    assert si.num_shards == 4 and si.shard_rows == 1024
    for arr in (si.codes, si.live, si.filter_rows, si.filter_terms):
        assert len({s.device for s in arr.addressable_shards}) == 4
    q = r.standard_normal((B, D)).astype(np.float32)

    def same(a, b, name):
        for f in ("scores", "ids", "count", "path"):
            np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)),
                                          err_msg=f"{name}: {f}")

    res = sh.sharded_search(si, q, K)
    same(res, st.search(index, q, K), "plain")
    assert res.ids.sharding.is_fully_replicated
    a1 = r.random(N) < 0.5                                  # shared bool allow
    same(sh.sharded_search(si, q, K, a1), st.search(index, q, K, a1), "shared allow")
    fl = ["tag:a OR NOT year:2003", "tag:b AND year:2001", "NOT tag:c", "tag:rare"]
    allow = r.random((B, N)) < 0.4
    allow[3] = np.arange(N) % 2 == 1
    words = _search.eligibility_words(index, allow, B)        # per-query packed u32 words
    same(sh.sharded_search(si, q, 200, rerank=3), st.search(index, q, 200, rerank=3),
         "rerank of 600 candidates")
    want = st.search(index, q, K, words, filter=fl, rerank=3)
    same(sh.sharded_search(si, q, K, words, filter=fl, rerank=3), want,
         "per-query filters + rerank")
    assert int(want.count[3]) == 2           # "rare": items 5 and 2999 (odd rows), padded
    # tombstones (fresh-index deletes) stay deleted once sharded
    main2, _ = fr.delete(index, fr.create_fresh(index, 8), ids[:300])
    si2 = sh.shard_index(main2, mesh)
    res = sh.sharded_search(si2, q, K)
    same(res, st.search(main2, q, K), "tombstones")
    assert not np.isin(np.asarray(res.ids), ids[:300]).any()
    # inside a user's jit
    jitted = jax.jit(lambda s, q, w: sh.sharded_search(s, q, K, w, filter=fl, rerank=3))
    same(jitted(si, q, words), want, "jit")

    # IVF: every cluster's 64-item blocks dealt round robin over the shards
    ivf = st.build_index(x, ids=ids, attributes=attrs, store_embeddings="f32", bloom_bits=64,
                         num_hashes=3, num_clusters=12)
    sv = sh.shard_index(ivf, mesh)
    assert sv.num_clusters == 12 and sv.block == 64
    counts = np.asarray(sv.block_count).reshape(4, -1)
    assert (counts.sum(0) == np.asarray(ivf.ivf.block_count)).all()
    assert (counts > 0).all(axis=1).any()             # a shard holds part of every cluster
    res = sh.sharded_search(sv, q, K, a1, nprobe=3)
    same(res, st.search(ivf, q, K, a1, nprobe=3), "ivf, shared allow")
    assert (np.asarray(res.path) == 1).all()
    # per-query filters + packed allow + rerank: selective queries starve (path 2) on the
    # eligible count of the whole index, others stay on the probe (path 1)
    iw = _search.eligibility_words(ivf, allow, B)
    opts = dict(filter=fl, nprobe=3, rerank=2, min_eligible_factor=4.0)
    want = st.search(ivf, q, K, iw, **opts)
    same(sh.sharded_search(sv, q, K, iw, **opts), want, "ivf, filters")
    assert set(np.asarray(want.path).tolist()) == {1, 2}, want.path
    # tombstones: only the live words are re-sharded
    ivf2, _ = fr.delete(ivf, fr.create_fresh(ivf, 8), ids[:300])
    res = sh.sharded_search(sh.shard_live(sv, ivf2.live), q, K, a1, nprobe=3)
    same(res, st.search(ivf2, q, K, a1, nprobe=3), "ivf, tombstones")
    assert not np.isin(np.asarray(res.ids), ids[:300]).any()
    # starved queries widen their probe on the eligible counts of all shards (path 3)
    a3 = np.random.default_rng(7).random(N) < 0.3
    opts = dict(nprobe=1, max_nprobe=12, min_eligible_factor=4.0)
    want = st.search(ivf, q, K, a3, **opts)
    same(sh.sharded_search(sv, q, K, a3, **opts), want, "ivf, widened")
    assert (np.asarray(want.path) == 3).any(), want.path
    print("SHARDED-OK")
""")


def test_sharded_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "SHARDED-OK" in out.stdout


def test_errors_and_single_device_mesh():
    import jax
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("items",))
    ivf = st.build_index(x, num_clusters=4, ivf_block=32)
    sv = sh.shard_index(ivf, mesh)                           # one device: the source layout
    np.testing.assert_array_equal(np.asarray(sv.codes), np.asarray(ivf.items.codes))
    with pytest.raises(ValueError, match="nprobe must be"):
        sh.sharded_search(sv, x[:2], 3, nprobe=5)
    with pytest.raises(ValueError, match=r"live must be u32\[32\]"):
        sh.shard_live(sv, np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="not an axis"):
        sh.shard_index(st.build_index(x), mesh, axis="rows")
    si = sh.shard_index(st.build_index(x), mesh)
    with pytest.raises(ValueError, match="nprobe needs an IVF"):
        sh.sharded_search(si, x[:2], 3, nprobe=2)
    with pytest.raises(ValueError, match="attributes"):
        sh.sharded_search(si, x[:2], 3, filter="tag:a")
    with pytest.raises(ValueError, match="rerank needs"):
        sh.sharded_search(si, x[:2], 3, rerank=2)
    with pytest.raises(ValueError, match=r"bool\[200\]"):
        sh.sharded_search(si, x[:2], 3, np.ones(10, bool))
