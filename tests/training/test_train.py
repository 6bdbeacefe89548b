import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import training
from training import CheckpointMismatchError, CorruptModelError, ModelNotFoundError


def _leaves(params):
    return jax.tree_util.tree_leaves(params)


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_reduces_loss_and_writes_artifacts(tiny_run):
    model, out = tiny_run
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)["history"]
    tt = [h["loss"] for h in log if h["phase"] == "two_tower"]
    oa = [h["loss"] for h in log if h["phase"] == "overarch"]
    assert tt[-1] < tt[0] and oa[-1] < oa[0]
    assert {"config.json", "model", "checkpoints", "train_log.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_same_seed_same_model_and_seed_matters(tiny_config, tiny_dataset, tiny_run):
    model, _ = tiny_run
    again = training.train(tiny_config, dataset=tiny_dataset)
    _assert_same_params(model.params, again.params)
    other = training.train(tiny_config.replace(seed=1), dataset=tiny_dataset)
    assert not np.array_equal(_leaves(other.params)[0], _leaves(model.params)[0])


# in the two-tower phase / the OverArch phase / the tower refresh
@pytest.mark.parametrize("stop_at", [15, 35, 55])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_config, tiny_dataset,
                                                         tiny_run, stop_at):
    model, _ = tiny_run
    cfg = tiny_config.replace(out_dir=str(tmp_path))

    class Interrupted(Exception):
        pass

    def stop(step, metrics):
        if step == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        training.train(cfg, dataset=tiny_dataset, callback=stop)
    assert not os.path.exists(tmp_path / "model")
    seen = []
    resumed = training.train(cfg, dataset=tiny_dataset, callback=lambda s, m: seen.append(s))
    assert seen[0] == (stop_at // cfg.checkpoint_every) * cfg.checkpoint_every + 1
    _assert_same_params(model.params, resumed.params)


def test_resume_skips_a_damaged_checkpoint(tmp_path, tiny_config, tiny_dataset, tiny_run):
    """A damaged newest step checkpoint is moved aside (with a warning) and training resumes
    from the previous one, to the same final model; with every step damaged, a
    CorruptModelError says what to do."""
    model, _ = tiny_run
    cfg = tiny_config.replace(out_dir=str(tmp_path))

    class Interrupted(Exception):
        pass

    def stop(step, metrics):
        if step == 35:
            raise Interrupted

    with pytest.raises(Interrupted):
        training.train(cfg, dataset=tiny_dataset, callback=stop)
    ck = tmp_path / "checkpoints"
    assert sorted(os.listdir(ck)) == ["20", "30"]
    assert (ck / "30" / "default.files.json").exists()
    chunk = next(p for p in sorted((ck / "30" / "default").rglob("*"))
                 if p.is_file() and p.parent.name == "d")
    chunk.write_bytes(chunk.read_bytes()[:-3])                    # truncated
    seen = []
    with pytest.warns(RuntimeWarning, match="resuming from checkpoint step 20.*step 30: "
                                            "changed"):
        resumed = training.train(cfg, dataset=tiny_dataset,
                                 callback=lambda s, m: seen.append(s))
    assert seen[0] == 21
    _assert_same_params(model.params, resumed.params)
    assert os.listdir(tmp_path / "damaged_checkpoints") == ["30"]
    # every checkpoint damaged: nothing to resume from
    for step in os.listdir(ck):
        (ck / step / "default" / "_METADATA").write_text("{}")
    with pytest.raises(CorruptModelError, match="every checkpoint .* is damaged"):
        training.train(cfg, dataset=tiny_dataset)


def test_resume_refuses_other_config(tmp_path, tiny_config, tiny_dataset):
    cfg = tiny_config.replace(out_dir=str(tmp_path), steps=10)
    training.train(cfg.replace(overarch=cfg.overarch.__class__(kind="none")),
                   dataset=tiny_dataset)
    with pytest.raises(CheckpointMismatchError, match="overarch.kind: 'none' -> 'mol'"):
        training.train(cfg, dataset=tiny_dataset)


def test_load_roundtrip_and_errors(tiny_run, tiny_dataset, tmp_path):
    model, out = tiny_run
    loaded = training.load(out)
    _assert_same_params(model.params, loaded.params)
    assert loaded.config == model.config.replace(out_dir=out)
    np.testing.assert_array_equal(loaded.recommend([0, 1], k=5), model.recommend([0, 1], k=5))
    with pytest.raises(ModelNotFoundError, match="no trained model"):
        training.load(str(tmp_path))
    # damaged model files: named before Orbax reads them; without the record, Orbax's failure
    # is still a CorruptModelError
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    meta = bad / "model" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:-1])
    with pytest.raises(CorruptModelError, match="changed: _METADATA"):
        training.load(str(bad))
    (bad / "model.files.json").unlink()
    with pytest.raises(CorruptModelError, match="cannot read the model"):
        training.load(str(bad))


def test_embeddings_and_pure_apply_functions(tiny_run, tiny_dataset):
    model, _ = tiny_run
    d = tiny_dataset
    uf = {k: v[:4] for k, v in d.user_features.items()}
    u = model.user_embeddings(uf)
    assert u.shape == (2, 4, model.config.tower.out_dim) and u.dtype == np.float32
    items = model.item_embeddings()
    assert items.shape == (d.num_items, model.config.tower.out_dim)
    np.testing.assert_allclose(model.item_embeddings({k: v[:3] for k, v in
                                                      d.item_features.items()}), items[:3],
                               rtol=1e-5, atol=1e-6)
    # pure functions of (params pytree, arrays) under plain jax.jit
    p = model.params

    @jax.jit
    def score(params, uf, cand_emb):
        ue = model.user_tower_apply(params["user_tower"], uf)
        logits = model.overarch_apply(params["overarch"], ue, cand_emb)
        return model.value_model_apply(jax.nn.sigmoid(logits))

    cand = jnp.asarray(items[np.arange(12).reshape(4, 3)])
    s = score(p, {k: jnp.asarray(v) for k, v in uf.items()}, cand)
    assert s.shape == (4, 3)
    ref = model.value_model(jax.nn.sigmoid(model.overarch_logits(u, np.arange(12).reshape(4, 3))))
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    with pytest.raises(training.FeatureError, match="missing"):
        model.user_embeddings({"user_id": uf["user_id"]})


def test_recommend_excludes_seen_and_uses_dataset_ids(tiny_run, tiny_dataset):
    model, _ = tiny_run
    d = tiny_dataset
    uid = d.user_ids[[3, 7]]
    recs = model.recommend(uid, k=10)
    assert recs.shape == (2, 10)
    assert set(recs.ravel()) <= set(d.item_ids.tolist())
    seen = d.seen("all").dense_mask(d.user_rows(uid), d.num_items)
    for b in range(2):
        assert not seen[b, d.item_rows(recs[b])].any()
        assert len(set(recs[b])) == 10
    # without exclusion and re-ranking: the plain dot-product top-k of the watch embedding
    plain = model.recommend(uid, k=10, exclude_seen=False, rerank=False)
    u = model.users_embeddings_by_row(d.user_rows(uid))[0]
    expect = np.argsort(-(u @ model.item_embeddings().T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(plain, d.item_ids[expect])
    ids, scores = model.recommend(uid, k=10, return_scores=True)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    with pytest.raises(training.UnknownIdError):
        model.recommend([10**9], k=3)
    with pytest.raises(ValueError, match="unknown task"):
        model.recommend(uid, task="share")
    # asking for more items than are eligible pads with -1
    big = model.recommend(uid[:1], k=d.num_items)
    assert (big == -1).sum() == seen[0].sum()
