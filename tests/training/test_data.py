import importlib.resources

import numpy as np
import pytest

import training
from training import SyntheticConfig, UnknownIdError, temporal_split


def test_temporal_split_protocol(hand_interactions):
    users, items, labels, ts = hand_interactions
    train, valid, test = temporal_split(users, items, labels, ts, num_users=5)
    per = lambda inter, u: inter.item[inter.user == u].tolist()
    # user 0 sorted by (ts, item): 5@10, 1@20, 3@20, 4@30
    assert per(test, 0) == [4] and per(valid, 0) == [3] and per(train, 0) == [5, 1]
    # user 1: duplicate item 2 keeps its first occurrence (like=1): 2@5, 0@7
    assert per(test, 1) == [0] and per(valid, 1) == [] and per(train, 1) == [2]
    assert train.labels[(train.user == 1)][0, 1] == 1.0
    # user 2: a single interaction stays in training; user 4 has none
    assert per(test, 2) == [] and per(train, 2) == [1]
    # user 3 sorted: 0@2, 2@4, 4@9
    assert per(test, 3) == [4] and per(valid, 3) == [2] and per(train, 3) == [0]
    assert len(train) + len(valid) + len(test) == len(users) - 1


def test_seen_masks(tiny_dataset):
    d = tiny_dataset
    te = d.seen("test")
    mask = te.dense_mask(np.arange(d.num_users), d.num_items)
    assert mask.sum() == len(d.train) + len(d.valid)
    assert not mask[d.test.user, d.test.item].any()          # test item is never masked
    assert mask[d.valid.user, d.valid.item].all()            # validation item masked at test
    vmask = d.seen("valid").dense_mask(np.arange(d.num_users), d.num_items)
    assert not vmask[d.valid.user, d.valid.item].any()
    with pytest.raises(ValueError, match="split must be one of"):
        d.seen("nope")


def test_synthetic_deterministic_and_planted(tiny_dataset):
    cfg = SyntheticConfig(num_users=200, num_items=300, num_clusters=10, interactions_per_user=15,
                          seed=3)
    a, b = training.synthetic(cfg), training.synthetic(cfg)
    np.testing.assert_array_equal(a.train.item, b.train.item)
    np.testing.assert_array_equal(a.item_features["genres"], b.item_features["genres"])
    c = training.synthetic(SyntheticConfig(**{**cfg.__dict__, "seed": 4}))
    assert not np.array_equal(a.train.item[:50], c.train.item[:50])
    a.schema.validate(a.item_features, "item")
    a.schema.validate(a.user_features, "user")
    # planted tastes: users sharing their main taste (segment) share far more items
    u = np.concatenate([a.train.user, a.valid.user, a.test.user])
    i = np.concatenate([a.train.item, a.valid.item, a.test.item])
    m = np.zeros((a.num_users, a.num_items))
    m[u, i] = 1
    overlap = (m @ m.T) / m.sum(1, keepdims=True)
    seg = a.user_features["segment"]
    same = (seg[:, None] == seg[None, :]) & ~np.eye(a.num_users, dtype=bool)
    diff = seg[:, None] != seg[None, :]
    assert overlap[same].mean() > 3 * overlap[diff].mean()
    # like labels are a strict subset of watch
    assert 0 < a.train.labels[:, 1].mean() < 1 and a.train.labels[:, 0].all()


def test_synthetic_scales_vectorised():
    d = training.synthetic(SyntheticConfig(num_users=2000, num_items=200_000,
                                           num_clusters=500, interactions_per_user=5))
    assert d.num_items == 200_000 and d.item_features["genres"].shape == (200_000, 3)
    assert len(d.item_attributes()["decade"]) == 200_000


def test_item_attributes_and_ids(tiny_dataset):
    d = tiny_dataset
    attrs = d.item_attributes()
    assert set(attrs) == {"genres", "year", "decade"}
    assert all(len(v) == d.num_items for v in attrs.values())
    assert isinstance(attrs["genres"][0], list) and isinstance(attrs["year"][0], int)
    by_id = d.item_attributes_by_id()
    assert by_id[int(d.item_ids[3])]["decade"] == attrs["decade"][3]
    np.testing.assert_array_equal(d.user_rows(d.user_ids[[4, 2]]), [4, 2])
    with pytest.raises(UnknownIdError, match="unknown user ids \\[99999\\]"):
        d.user_rows([99999])


def test_movielens_100k(ml100k):
    d = ml100k
    assert (d.num_users, d.num_items) == (943, 1682)
    assert len(d.train) + len(d.valid) + len(d.test) == 100_000
    assert len(d.test) == len(d.valid) == 943
    like = np.concatenate([d.train.labels, d.valid.labels, d.test.labels])[:, 1]
    assert int(like.sum()) == 55_375                       # ratings >= 4 in ML-100K
    toy = d.item_attributes_by_id()[1]
    assert toy == {"genres": ["Animation", "Children's", "Comedy"], "year": 1995,
                   "decade": "1990s"}
    assert d.schema.filterable_item_fields == ("genres", "decade")
    assert {s.name for s in d.schema.user} == {"user_id", "age", "gender", "occupation",
                                               "zip_prefix"}
    # the test item is each user's last interaction in (timestamp, item id) order
    last_ts = np.full(d.num_users, -1)
    np.maximum.at(last_ts, d.train.user, d.train.timestamp)
    np.maximum.at(last_ts, d.valid.user, d.valid.timestamp)
    assert (d.test.timestamp >= last_ts[d.test.user]).all()


def test_movielens_missing_gives_install_hint(monkeypatch):
    def boom(name):
        raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(importlib.resources, "files", boom)
    with pytest.raises(training.DatasetNotAvailableError,
                       match="pip install --no-deps recbole==1.2.1"):
        training.load_movielens_100k()


def test_load_dataset_unknown():
    with pytest.raises(ValueError, match="unknown dataset 'ml-1b'"):
        training.load_dataset("ml-1b")
