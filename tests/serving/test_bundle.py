"""Bundles: atomic publish (survives a kill), verified loading (skew, tampering), catalogue
validation."""
import json
from pathlib import Path
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import serving
import training
from serving._store import canonical_json, content_hash, current_version, load_arrays


def test_bundle_layout_and_manifest(flat_bundle, tiny_model):
    vdir = current_version(flat_bundle)
    m = json.loads(Path(os.path.join(vdir, "manifest.json")).read_text())
    assert m["format"] == "st_jax.bundle"
    assert m["index"]["built_with"] == m["model"]["fingerprint"] == \
        serving.model_fingerprint(tiny_model)
    assert m["index"]["num_items"] == tiny_model.dataset.num_items
    assert any(k.startswith("index/cache") for k in m["arrays"])
    assert m["arrays"]["index/cache"][1] == "bfloat16"


def _resign(vdir, manifest):
    """Rewrites a manifest with a *valid* content hash (what a buggy deploy tool would do)."""
    arrays = load_arrays(os.path.join(vdir, "arrays"), manifest["arrays"])
    catalogue = Path(os.path.join(vdir, "catalogue.json")).read_bytes()
    manifest.pop("content_hash", None)
    manifest["content_hash"] = content_hash(arrays, canonical_json(manifest), catalogue)
    Path(os.path.join(vdir, "manifest.json")).write_text(json.dumps(manifest))


def test_version_skew_is_refused(tmp_path, tiny_model, flat_bundle):
    other = training.train(training.tiny_config(out_dir=str(tmp_path / "m2"), seed=7))
    assert serving.model_fingerprint(other) != serving.model_fingerprint(tiny_model)
    with pytest.raises(serving.SkewError, match="republish"):
        serving.Retriever.load(flat_bundle, model=other)
    serving.Retriever.load(flat_bundle, model=tiny_model)          # the right model: fine
    # an index published from another model, re-signed so only the skew check can catch it
    b2 = str(tmp_path / "b2")
    serving.publish(other, None, b2, num_clusters=0)
    vdir = current_version(b2)
    m = json.loads(Path(os.path.join(vdir, "manifest.json")).read_text())
    m["index"]["built_with"] = serving.model_fingerprint(tiny_model)
    _resign(vdir, m)
    with pytest.raises(serving.SkewError, match="version skew"):
        serving.read_bundle(b2)


def _copy_bundle(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return current_version(dst)


def test_tampered_files_are_refused(tmp_path, flat_bundle):
    vdir = _copy_bundle(flat_bundle, tmp_path / "t1")
    m = json.loads(Path(os.path.join(vdir, "manifest.json")).read_text())
    m["serving"]["k0"] = 999
    Path(os.path.join(vdir, "manifest.json")).write_text(json.dumps(m))
    with pytest.raises(serving.TamperedError, match="content hash"):
        serving.Retriever.load(str(tmp_path / "t1"))

    vdir = _copy_bundle(flat_bundle, tmp_path / "t2")
    cat = json.loads(Path(os.path.join(vdir, "catalogue.json")).read_text())
    cat["titles"] = ["x"] * 3
    Path(os.path.join(vdir, "catalogue.json")).write_text(json.dumps(cat))
    with pytest.raises(serving.TamperedError):
        serving.read_bundle(str(tmp_path / "t2"))

    # flip bytes in the middle of every Orbax data chunk: refused by name before Orbax
    # reads anything (Orbax itself fails with DATA_LOSS and leaves reads in flight)
    vdir = _copy_bundle(flat_bundle, tmp_path / "t3")
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(vdir, "arrays"))
              for f in fs if os.path.basename(d) == "d"]
    assert chunks
    for path in chunks:
        data = bytearray(Path(path).read_bytes())
        mid = len(data) // 2
        data[mid:mid + 8] = bytes(255 - x for x in data[mid:mid + 8])
        Path(path).write_bytes(bytes(data))
    name = min(os.path.relpath(c, os.path.join(vdir, "arrays")).replace(os.sep, "/")
               for c in chunks)                        # the first one the error names
    with pytest.raises(serving.TamperedError, match=f"changed: {name}"):
        serving.read_bundle(str(tmp_path / "t3"))
    # a lost file, a truncated one, an unexpected one, an unreadable or malformed record
    for case in ("missing", "truncated", "unexpected", "record", "entry"):
        vdir = _copy_bundle(flat_bundle, tmp_path / case)
        arrays = os.path.join(vdir, "arrays")
        victim = os.path.join(arrays, "_METADATA")
        if case == "missing":
            os.remove(victim)
        elif case == "truncated":
            Path(victim).write_bytes(Path(victim).read_bytes()[:-1])
        elif case == "unexpected":
            Path(arrays, "d", "extra").write_bytes(b"x")
        elif case == "record":
            Path(vdir, "arrays.files.json").write_text("{")
        else:
            Path(vdir, "arrays.files.json").write_text('{"sha256": {"_METADATA": 3}}')
        with pytest.raises(serving.TamperedError, match={
                "missing": "missing: _METADATA", "truncated": "changed: _METADATA",
                "unexpected": "unexpected: d/extra", "record": "unreadable",
                "entry": "unreadable"}[case]):
            serving.Retriever.load(str(tmp_path / case))
    # a store written before the record existed still loads (Orbax and the content hash check)
    vdir = _copy_bundle(flat_bundle, tmp_path / "old")
    os.remove(os.path.join(vdir, "arrays.files.json"))
    assert serving.read_bundle(str(tmp_path / "old")).manifest == \
        serving.read_bundle(flat_bundle).manifest


def test_not_a_bundle(tmp_path, tiny_model):
    with pytest.raises(serving.StoreError, match="not a bundle"):
        serving.read_bundle(str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(serving.StoreError, match="is not a bundle"):
        serving.publish(tiny_model, None, str(tmp_path / "x"))
    assert os.listdir(tmp_path / "x") == ["notes.txt"]


_KILLED_PUBLISH = textwrap.dedent("""
    import os, sys, time
    import training, serving
    model = training.load(sys.argv[1])
    def stage(name):
        if name == sys.argv[3]:
            print("STAGE", name, flush=True)
            time.sleep(600)
    serving.publish(model, None, sys.argv[2], num_clusters=0, k0=17, _on_stage=stage)
""")


@pytest.mark.parametrize("stage", ["arrays", "renamed"])
def test_publish_killed_midway_leaves_the_previous_bundle(tmp_path, tiny_model_dir, tiny_model,
                                                          stage):
    out = str(tmp_path / "bundle")
    serving.publish(tiny_model, None, out, num_clusters=0, k0=23)
    before = serving.Retriever.load(out).recommend(tiny_model.dataset.user_ids[:3], k=5).ids
    script = tmp_path / "pub.py"
    script.write_text(_KILLED_PUBLISH)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, str(script), tiny_model_dir, out, stage],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("STAGE"), p.stderr.read()
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    r = serving.Retriever.load(out)
    assert r.default_k0 == 23                                       # still the old version
    np.testing.assert_array_equal(r.recommend(tiny_model.dataset.user_ids[:3], k=5).ids, before)
    serving.publish(tiny_model, None, out, num_clusters=0, k0=19)    # next publish cleans up
    assert serving.Retriever.load(out).default_k0 == 19
    vdir = os.path.join(out, "versions")
    assert not [n for n in os.listdir(vdir) if n.startswith(".tmp-")]
    assert len(os.listdir(vdir)) <= 2


def test_catalogue_validation(tmp_path, tiny_model):
    ds = tiny_model.dataset
    cat = serving.Catalogue.from_dataset(ds)
    feats = {k: np.array(v) for k, v in cat.features.items()}
    feats["year"] = feats["year"].astype(np.float32)
    feats["year"][[3, 7]] = np.nan
    with pytest.raises(serving.CatalogueError, match=rf"NaN/Inf.*\[{ds.item_ids[3]}, "
                                                     rf"{ds.item_ids[7]}\]"):
        serving.publish(tiny_model, serving.Catalogue(ds.item_ids, feats, cat.attributes),
                        str(tmp_path / "b"))
    attrs = dict(cat.attributes)
    attrs["price"] = [1.5 if i == 4 else 2 for i in range(ds.num_items)]
    with pytest.raises(serving.CatalogueError, match=rf"'price'.*\[{ds.item_ids[4]}\].*float"):
        serving.publish(tiny_model, serving.Catalogue(ds.item_ids, cat.features, attrs),
                        str(tmp_path / "b"))
    ids = np.array(ds.item_ids)
    ids[5] = ids[6]
    with pytest.raises(serving.CatalogueError, match="duplicate item ids"):
        serving.publish(tiny_model, serving.Catalogue(ids, cat.features, cat.attributes),
                        str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / "CURRENT")


def test_publish_a_new_catalogue(tmp_path, tiny_model):
    """Items the model never saw (new ids, known attribute values) are published and served."""
    ds = tiny_model.dataset
    cat = serving.Catalogue.from_dataset(ds)
    ids = np.asarray(ds.item_ids) + 10_000
    out = str(tmp_path / "new")
    serving.publish(tiny_model, serving.Catalogue(ids, cat.features, cat.attributes,
                                                  [f"item {i}" for i in ids]), out,
                    num_clusters=0, include_users=False)
    r = serving.Retriever.load(out)
    feats = {k: v[:2] for k, v in ds.user_features.items()}
    res = r(feats, k=4, filter="decade:1990s")
    assert (res.ids >= 10_000).all()
    assert r.titles(res.ids)[0][0] == f"item {res.ids[0, 0]}"
    with pytest.raises(serving.RequestError, match="no user table"):
        r.recommend([ds.user_ids[0]], k=3)
