"""Item updates while serving: the fresh index inside the served graph."""
import numpy as np
import pytest

import serving
from st_jax.fresh import IndexFullError


def _final_catalogue(ds, new_ids, new_rows, new_attrs, deleted, retag):
    """The catalogue after the updates, as a from-scratch publish would see it."""
    cat = serving.Catalogue.from_dataset(ds)
    keep = ~np.isin(ds.item_ids, deleted)
    new_keep = ~np.isin(new_ids, deleted)
    ids = np.concatenate([ds.item_ids[keep], new_ids[new_keep]])
    feats = {f: np.concatenate([np.asarray(v)[keep], np.asarray(v)[new_rows[new_keep]]])
             for f, v in cat.features.items()}
    attrs = {f: [a for a, k in zip(v, keep) if k] + [a for a, k in zip(new_attrs[f], new_keep)
                                                     if k]
             for f, v in cat.attributes.items()}
    genres = attrs["genres"]
    for i, g in retag.items():
        genres[int(np.flatnonzero(ids == i)[0])] = g
    return serving.Catalogue(ids, feats, attrs)


def test_updates_while_serving_equal_a_republished_bundle(tmp_path, flat_bundle, tiny_model):
    ds = tiny_model.dataset
    r = serving.Retriever.load(flat_bundle, fresh_capacity=64)
    users = ds.user_ids[:6]
    cat = serving.Catalogue.from_dataset(ds)
    new_rows = np.arange(10)
    new_ids = np.asarray(ds.item_ids)[new_rows] + 5000
    feats = {f: np.asarray(v)[new_rows] for f, v in cat.features.items()}
    attrs = {f: [v[i] for i in new_rows] for f, v in cat.attributes.items()}
    attrs["genres"] = [["brand-new"] + list(g) for g in attrs["genres"]]
    r.add_items(new_ids, feats, attrs, titles=[f"new {i}" for i in new_ids])

    hit = r.recommend(users, filter="genres:brand-new", k=5)
    assert set(hit.ids[hit.ids >= 0].tolist()) <= set(new_ids.tolist())
    assert (hit.count == 5).all()
    assert r.titles(hit.ids)[0][0] == f"new {hit.ids[0, 0]}"

    deleted = np.concatenate([hit.ids[0, :2], [ds.item_ids[50]]])       # fresh and main items
    r.delete_items(deleted)
    retag = {int(ds.item_ids[60]): ["retagged"], int(new_ids[5]): ["retagged", "brand-new"]}
    r.update_items(list(retag), attributes={"genres": list(retag.values())})

    out = r.recommend(users, filter="genres:brand-new OR genres:retagged", k=8)
    assert not set(out.ids.ravel().tolist()) & set(deleted.tolist())
    final = _final_catalogue(ds, new_ids, new_rows, attrs, deleted, retag)
    ref_dir = str(tmp_path / "rebuilt")
    serving.publish(tiny_model, final, ref_dir, num_clusters=0, k0=r.default_k0)
    ref = serving.Retriever.load(ref_dir)
    for filt in (None, "genres:brand-new OR genres:retagged", "NOT genres:brand-new"):
        a = r.recommend(users, filter=filt, k=8)
        b = ref.recommend(users, filter=filt, k=8)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert (a.ids == b.ids).mean() > 0.95                         # ties aside
    # more updates of the same shapes: no recompilation
    size = r._state.fn._cache_size()
    r.update_items([int(new_ids[6])], attributes={"decade": ["1990s"]})
    r.recommend(users, filter="genres:retagged", k=8)
    assert r._state.fn._cache_size() == size
    stats = r.fresh_stats()
    assert stats["live"] == 9 and stats["updates"] == 4     # 8 new + 1 re-tagged main item


def test_fresh_capacity_and_export_guard(tmp_path, flat_bundle, tiny_model):
    ds = tiny_model.dataset
    r = serving.Retriever.load(flat_bundle, fresh_capacity=3)
    cat = serving.Catalogue.from_dataset(ds)
    feats = {f: np.asarray(v)[:4] for f, v in cat.features.items()}
    with pytest.raises(IndexFullError, match="compact"):
        r.add_items(np.arange(4) + 9000, feats)
    with pytest.raises(serving.RequestError, match="feature rows"):
        r.add_items(np.arange(3) + 9000, feats)
    r.delete_items([ds.item_ids[0]])
    with pytest.raises(ValueError, match="compact"):
        r.export(str(tmp_path / "x"), platform="cpu", batch_sizes=(1,))
    # attribute values: str / int or lists / sets of them; others refused, naming the item
    one = {f: v[:1] for f, v in feats.items()}
    for bad, match in (({"a": 1}, "not dict"), ([[1]], "not list"), ([b"x"], "list / set"),
                       (1.5, "not float")):
        with pytest.raises(ValueError, match=f"'genres', item 0: .*{match}"):
            r.add_items([9100], one, {"genres": [bad]})
    r.add_items([9100], one, {"genres": [{"set-valued", "brand-new"}]})
    users = ds.user_ids[:2]
    for f in ("genres:set-valued", "genres:brand-new"):
        assert (r.recommend(users, filter=f, k=5).ids[:, 0] == 9100).all()


_KILLED_COMPACT = """
import sys, time, numpy as np, serving
r = serving.Retriever.load(sys.argv[1])
r.delete_items([int(sys.argv[2])])
def stage(name):
    if name == "arrays":
        print("STAGE", flush=True)
        time.sleep(600)
serving.compact(r, _on_stage=stage)
"""


def test_compact_folds_updates_into_a_new_version(tmp_path, flat_bundle, tiny_model):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    ds = tiny_model.dataset
    bundle = str(tmp_path / "b")
    shutil.copytree(flat_bundle, bundle)
    r = serving.Retriever.load(bundle, fresh_capacity=32)
    users = ds.user_ids[:5]
    cat = serving.Catalogue.from_dataset(ds)
    rows = np.arange(20, 26)
    new_ids = np.asarray(ds.item_ids)[rows] + 7000
    r.add_items(new_ids, {f: np.asarray(v)[rows] for f, v in cat.features.items()},
                {"genres": [["compacted"]] * rows.size}, titles=[f"n{i}" for i in new_ids])
    r.delete_items([ds.item_ids[3], new_ids[0]])
    r.update_items([ds.item_ids[4]], attributes={"genres": [["compacted"]]})
    before = {f: r.recommend(users, filter=f, k=6) for f in (None, "genres:compacted")}
    first = serving._store.current_version(bundle)

    # a compaction killed midway leaves the previous version served
    script = tmp_path / "c.py"
    script.write_text(_KILLED_COMPACT)
    p = subprocess.Popen([sys.executable, str(script), bundle, str(int(ds.item_ids[7]))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert p.stdout.readline().startswith("STAGE"), p.stderr.read()
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert serving._store.current_version(bundle) == first
    serving.Retriever.load(bundle)

    new_version = serving.compact(r)
    assert serving._store.current_version(bundle) == new_version != first
    c = serving.Retriever.load(bundle)
    assert c.data.manifest["index"]["num_items"] == ds.num_items + rows.size - 2
    for f, want in before.items():
        got = c.recommend(users, filter=f, k=6)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
        assert (got.ids == want.ids).mean() > 0.95
    assert c.titles([[new_ids[1]]]) == [[f"n{new_ids[1]}"]]
    seen = c.host.seen_items(c.host.user_rows(ds.user_ids))
    assert not any(ds.item_ids[3] in s for s in seen)          # deleted items dropped
