"""Sharded serving (``Retriever.load(..., mesh=)``) on 4 forced CPU host devices equals the
unsharded retriever: flat and IVF bundles, filters, exclude_seen, item updates; no
recompilation for new users / filters; export refused. JAX is already initialised with one
device in the test process, so the checks run in a subprocess (on the session's bundles)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import pickle, sys
    import numpy as np, jax
    from jax.sharding import Mesh
    import pytest
    import serving

    assert jax.device_count() == 4, jax.devices()
    flat_bundle, ivf_bundle = sys.argv[1], sys.argv[2]
    mesh = Mesh(np.array(jax.devices()), ("items",))
    with open(sys.argv[3], "rb") as f:
        cat = serving.Catalogue(**pickle.load(f))                # the training catalogue
    genre = cat.attributes["genres"][0][0]

    def same(a, b, name):
        for f in ("ids", "scores", "task_scores", "count", "num_candidates", "path"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{name}: {f}")

    # flat bundle: filters (per user), exclude_seen; the index lives on 4 devices
    r = serving.Retriever.load(flat_bundle, buckets=(8,), fresh_capacity=32)
    s = serving.Retriever.load(flat_bundle, buckets=(8,), fresh_capacity=32, mesh=mesh)
    assert s.weights["index/codes"].sharding.num_devices == 4
    users = r.host.users["ids"]
    filters = [f"genres:{genre}", "*", "decade:1990s OR decade:1980s", "NOT decade:1990s",
               "decade:2000s"]
    out = s.recommend(users[:5], filter=filters, k=10)
    same(out, r.recommend(users[:5], filter=filters, k=10), "flat")
    assert (out.count > 0).all() and (out.path == 0).all()
    # no recompilation for new users and filters
    size = s._fn._cache_size()
    for lo, f in ((8, "decade:1980s"), (20, f"NOT genres:{genre}"), (40, "decade:2000s")):
        same(s.recommend(users[lo:lo + 6], filter=f, k=10),
             r.recommend(users[lo:lo + 6], filter=f, k=10), f"flat {f}")
    assert s._fn._cache_size() == size
    assert s.with_options(mesh=None).mesh is None
    with pytest.raises(ValueError, match="unsharded"):
        s.export("/nonexistent/x", platform="cpu", batch_sizes=(1,))

    # IVF bundle: probe (path 1) and starved fallback (path 2) decided on the global counts
    ri = serving.Retriever.load(ivf_bundle, buckets=(8,), min_eligible_factor=1.0,
                                merge="intersection")
    si = ri.with_options(mesh=mesh)
    assert si.mesh is mesh and ri.mesh is None
    fl = ["*", "decade:1990s", f"genres:{genre} AND decade:1980s", "NOT decade:1990s", "*"]
    out = si.recommend(users[10:15], filter=fl, k=8)
    same(out, ri.recommend(users[10:15], filter=fl, k=8), "ivf")
    assert set(np.unique(out.path).tolist()) == {1, 2}, out.path

    # item updates (fresh index replicated, tombstones re-sharded): same results
    ids = r.host.item_ids
    rows = np.arange(6)
    new_ids = np.asarray(cat.ids)[rows] + 5000
    feats = {f: np.asarray(v)[rows] for f, v in cat.features.items()}
    attrs = {f: [v[i] for i in rows] for f, v in cat.attributes.items()}
    attrs["genres"] = [["brand-new"] + list(g) for g in attrs["genres"]]
    gone = {int(ids[3]), int(ids[50]), int(new_ids[0])}
    for rr in (r, s):
        rr.add_items(new_ids, feats, attrs)
        rr.delete_items(sorted(gone))
        rr.update_items([int(ids[60]), int(new_ids[2])],
                        attributes={"genres": [["brand-new"], ["retagged"]]})
    for f in ("NOT decade:1990s", "genres:brand-new OR genres:retagged"):
        a = s.recommend(users[:6], filter=f, k=8)
        same(a, r.recommend(users[:6], filter=f, k=8), f"updates {f}")
        assert not set(a.ids.ravel().tolist()) & gone
    size = s._state.fn._cache_size()
    s.update_items([int(new_ids[4])], attributes={"decade": ["1990s"]})
    s.recommend(users[6:12], filter="genres:retagged", k=8)
    assert s._state.fn._cache_size() == size
    print("SHARDED-SERVING-OK")
""")


def test_sharded_retriever_equals_unsharded(tmp_path, flat_bundle, ivf_bundle, tiny_model):
    import pickle

    import serving
    cat = serving.Catalogue.from_dataset(tiny_model.dataset)
    cat_file = str(tmp_path / "catalogue.pkl")
    with open(cat_file, "wb") as f:
        pickle.dump({"ids": cat.ids, "features": cat.features, "attributes": cat.attributes}, f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT, flat_bundle, ivf_bundle, cat_file],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "SHARDED-SERVING-OK" in out.stdout
