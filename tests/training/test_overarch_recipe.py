"""OverArch training recipe options: `holdout` (later time window) and `hard_rank_min`."""

import dataclasses

import numpy as np
import pytest

import training
from training import Interactions, OverArchConfig
from training._train import (_OverArchBatches, hard_candidate_pool, overarch_holdout,
                             overarch_optimizer)


def _interactions(users, items, ts):
    users, items = np.asarray(users, np.int32), np.asarray(items, np.int32)
    return Interactions(users, items, np.ones((len(users), 2), np.float32),
                        np.asarray(ts, np.int64))


def test_holdout_takes_the_last_k_per_user_in_time_order_and_keeps_one():
    # user 0: 4 events (rows shuffled, a timestamp tie broken by item id); user 1: 2; user 2: 1
    tr = _interactions([0, 1, 0, 2, 0, 1, 0], [7, 3, 2, 5, 9, 4, 1], [30, 5, 20, 1, 20, 6, 10])
    held = overarch_holdout(tr, 3, 2)
    # user 0 order: (10, 1), (20, 2), (20, 9), (30, 7) -> last two: items 9, 7
    assert sorted(tr.item[held & (tr.user == 0)]) == [7, 9]
    assert list(tr.item[held & (tr.user == 1)]) == [4]           # keeps item 3 for the towers
    assert not held[tr.user == 2].any()                           # a single event stays
    assert not overarch_holdout(tr, 3, 0).any()
    assert overarch_holdout(tr, 3, 100).sum() == 3 + 1            # all but one per user


def test_holdout_on_a_real_split_is_disjoint_and_time_ordered(tiny_dataset):
    tr = tiny_dataset.train
    held = overarch_holdout(tr, tiny_dataset.num_users, 3)
    for u in np.unique(tr.user)[:20]:
        m = tr.user == u
        if held[m].any():
            assert tr.timestamp[m & held].min() >= tr.timestamp[m & ~held].max()
        assert (m & ~held).any()


def test_hard_negatives_come_from_the_requested_ranks(tiny_dataset):
    d = tiny_dataset
    rng = np.random.default_rng(0)
    ue = rng.normal(size=(len(d.tasks), d.num_users, 4)).astype(np.float32)
    ie = rng.normal(size=(d.num_items, 4)).astype(np.float32)
    pool = hard_candidate_pool(ue, ie, d.seen("valid"), 20)
    assert pool.shape == (d.num_users, 20) and pool.dtype == np.int32
    cfg = OverArchConfig(hard_pool=20, hard_rank_min=15, num_hard=8, num_random=0, batch_size=64)
    users, cands, labels, weights = _OverArchBatches(d, d.train, pool, cfg, 0)(3)
    assert cands.shape == (64, 9) and labels.shape == (64, 9, len(d.tasks))
    allowed = pool[users, 15:]                                          # [B, 5]
    assert (cands[:, 1:, None] == allowed[:, None, :]).any(-1).all()
    assert (labels[:, 0, 0] == 1).all() and (labels[:, 1:] == 0).all()
    # positives are drawn from the given interactions only
    sub = d.train.take(np.arange(10))
    users, cands, _, _ = _OverArchBatches(d, sub, pool, cfg, 0)(0)
    pairs = set(zip(sub.user.tolist(), sub.item.tolist()))
    assert set(zip(users.tolist(), cands[:, 0].tolist())) <= pairs


@pytest.mark.parametrize("kw, match", [
    ({"hard_rank_min": 20}, "hard_rank_min"), ({"hard_rank_min": -1}, "hard_rank_min"),
    ({"holdout": -1}, "holdout"), ({"holdout": 1.5}, "holdout"), ({"num_hard": -2}, "num_hard"),
    ({"hard_pool": 0}, "hard_pool"), ({"cosine_decay": 1}, "cosine_decay"),
])
def test_bad_recipe_values_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        OverArchConfig(**{"hard_pool": 20, **kw})


def test_holdout_changes_the_towers_and_is_deterministic(tiny_config, tiny_dataset, tiny_run):
    model, _ = tiny_run
    assert model.config.overarch.holdout > 0                   # the tiny run exercises it
    cfg = tiny_config.replace(overarch=dataclasses.replace(tiny_config.overarch, holdout=0))
    a = training.train(cfg, dataset=tiny_dataset)
    b = training.train(cfg, dataset=tiny_dataset)
    ua, ub, um = (np.asarray(m.params["item_tower"]["mlp"]["layers"][0]["kernel"])
                  for m in (a, b, model))
    np.testing.assert_array_equal(ua, ub)
    assert not np.array_equal(ua, um)


@pytest.mark.parametrize("decay", [True, False])
def test_cosine_decay_brings_the_overarch_learning_rate_to_zero(tiny_config, decay):
    cfg = tiny_config.replace(overarch=dataclasses.replace(tiny_config.overarch, steps=4,
                                                           cosine_decay=decay))
    tx = overarch_optimizer(cfg)
    params = {"w": np.ones(3, np.float32)}
    state = tx.init(params)
    sizes = []
    for _ in range(5):
        updates, state = tx.update({"w": np.ones(3, np.float32)}, state, params)
        sizes.append(float(np.abs(updates["w"]).max()))
    assert sizes[0] > 0
    if decay:                                   # strictly decreasing, zero after `steps` steps
        assert all(a > b for a, b in zip(sizes[:4], sizes[1:4])) and sizes[4] == 0.0
    else:
        assert min(sizes) > 0.5 * sizes[0]


def test_configs_without_cosine_decay_keep_the_constant_rate(tiny_config):
    assert training.OverArchConfig().cosine_decay
    d = tiny_config.to_json()
    del d["overarch"]["cosine_decay"]
    assert training.TrainConfig.from_json(d).overarch.cosine_decay is False
    assert training.TrainConfig.from_json(tiny_config.to_json()) == tiny_config
