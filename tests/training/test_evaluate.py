import numpy as np
import pytest

import training
from training._evaluate import log_loss, rank_of_target


def test_rank_of_target_ties_and_mask():
    s = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1],
                  [0.5, 0.9, 0.5, -np.inf, 0.1]], np.float32)
    np.testing.assert_array_equal(rank_of_target(s, np.array([2, 3])), [2, 5])
    np.testing.assert_array_equal(rank_of_target(s, np.array([0, 4])), [1, 3])


def test_ranking_metrics_values():
    m = training.ranking_metrics(np.array([0, 1, 19, 20, 150]), ks=(1, 20))
    assert m["recall@1"] == m["hr@1"] == pytest.approx(0.2)
    assert m["recall@20"] == pytest.approx(0.6)
    ndcg = (1 + 1 / np.log2(3) + 1 / np.log2(21)) / 5
    assert m["ndcg@20"] == pytest.approx(ndcg)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=200).astype(float)          # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    ref = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / \
        (len(pos) * len(neg))
    assert training.auc(s, y) == pytest.approx(ref)
    assert np.isnan(training.auc(s, np.zeros(200)))
    assert log_loss(np.array([0.0]), np.array([1.0])) == pytest.approx(np.log(2))


def test_evaluate_reports_all_methods(tiny_run):
    model, _ = tiny_run
    r = training.evaluate(model)
    for m in ("popularity", "two_tower", "two_tower+overarch", "two_tower+overarch+value_model"):
        assert set(r[m]) == {"watch", "like"}
        for k in (10, 20, 50, 100):
            assert 0 <= r[m]["watch"][f"recall@{k}"] <= 1
        assert r[m]["watch"]["users"] == len(model.dataset.test)
        assert r[m]["like"]["users"] == int(model.dataset.test.labels[:, 1].sum())
        rec = [r[m]["watch"][f"recall@{k}"] for k in (10, 20, 50, 100)]
        assert rec == sorted(rec)
    # re-ranking only permutes the top `rerank_top` (50 in the tiny config): recall@50 is kept
    assert r["rerank_top"] == 50
    for m in ("two_tower+overarch", "two_tower+overarch+value_model"):
        assert r[m]["watch"]["recall@50"] == r["two_tower"]["watch"]["recall@50"]
        assert r[m]["watch"]["recall@100"] == r["two_tower"]["watch"]["recall@100"]
    for kind in ("two_tower", "overarch"):
        for t in ("watch", "like"):
            assert 0 <= r["heads"][kind][t]["auc"] <= 1
    assert r["heads"]["overarch"]["watch"]["log_loss"] > 0
    s = r["summary"]
    assert s["two_tower_over_popularity_recall@20"] == pytest.approx(
        s["two_tower_recall@20"] / s["popularity_recall@20"])
    v = training.evaluate(model, split="valid")
    assert v["two_tower"]["watch"]["users"] == len(model.dataset.valid)


def test_popularity_baseline_and_masking_by_hand(tiny_run):
    """The popularity ranks are recomputed by brute force with sorting."""
    model, _ = tiny_run
    d = model.dataset
    r = training.evaluate(model, ks=(5,))
    pop = d.item_popularity()
    seen = d.seen("test").dense_mask(d.test.user, d.num_items)
    hits = 0
    for b in range(len(d.test)):
        order = [j for j in np.argsort(-pop, kind="stable") if not seen[b, j]]
        hits += d.test.item[b] in order[:5]
    assert r["popularity"]["watch"]["recall@5"] == pytest.approx(hits / len(d.test))


def test_trained_beats_popularity_on_planted_data(tiny_dataset):
    """On synthetic data with planted tastes a briefly trained model beats popularity."""
    cfg = training.tiny_config(steps=300, overarch=training.OverArchConfig(kind="none"))
    model = training.train(cfg, dataset=tiny_dataset)
    s = training.evaluate(model)["summary"]
    assert s["two_tower_recall@20"] > 1.3 * s["popularity_recall@20"]
    assert "two_tower+overarch" not in training.evaluate(model)
