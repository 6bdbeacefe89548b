"""Sharded search on 4 forced CPU host devices equals the single-device index (ids and
scores) with filters, allow masks, rerank and tombstones. JAX is already initialised with
one device in the test process, so the sharded checks run in a subprocess."""
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
        np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores), err_msg=name)
        np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids), err_msg=name)
        np.testing.assert_array_equal(np.asarray(a.count), np.asarray(b.count), err_msg=name)

    res = sh.sharded_search(si, q, K)
    same(res, st.search(index, q, K), "plain")
    assert res.ids.sharding.is_fully_replicated
    a1 = r.random(N) < 0.5                                  # shared bool allow
    same(sh.sharded_search(si, q, K, a1), st.search(index, q, K, a1), "shared allow")
    fl = ["tag:a OR NOT year:2003", "tag:b AND year:2001", "NOT tag:c", "tag:rare"]
    allow = r.random((B, N)) < 0.4
    allow[3] = np.arange(N) % 2 == 1
    words = _search.eligibility_words(index, allow, B)        # per-query packed u32 words
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
    with pytest.raises(ValueError, match="flat"):
        sh.shard_index(st.build_index(x, num_clusters=4, ivf_block=32), mesh)
    with pytest.raises(ValueError, match="not an axis"):
        sh.shard_index(st.build_index(x), mesh, axis="rows")
    si = sh.shard_index(st.build_index(x), mesh)
    with pytest.raises(ValueError, match="attributes"):
        sh.sharded_search(si, x[:2], 3, filter="tag:a")
    with pytest.raises(ValueError, match="rerank needs"):
        sh.sharded_search(si, x[:2], 3, rerank=2)
    with pytest.raises(ValueError, match=r"bool\[200\]"):
        sh.sharded_search(si, x[:2], 3, np.ones(10, bool))
