"""`st-jax publish / query / export` end to end on the tiny model."""
import json

import numpy as np

import serving
from st_jax import cli


def test_publish_query_export(tmp_path, tiny_model_dir, tiny_model, capsys):
    bundle = str(tmp_path / "b")
    assert cli.main(["publish", tiny_model_dir, "--out", bundle, "--clusters", "0",
                     "--k0", "30"]) == 0
    capsys.readouterr()
    users = [int(u) for u in tiny_model.dataset.user_ids[:2]]
    genre = tiny_model.dataset.item_attributes()["genres"][0][0]
    assert cli.main(["query", bundle, "--user", str(users[0]), "--user", str(users[1]),
                     "--filter", f"genres:{genre}", "--k", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = serving.Retriever.load(bundle).recommend(users, filter=f"genres:{genre}", k=4)
    assert [[it["id"] for it in r["items"]] for r in rows] == want.ids.tolist()
    assert set(rows[0]["items"][0]["tasks"]) == set(tiny_model.tasks)
    assert cli.main(["query", bundle, "--user", str(users[0]), "--k", "3"]) == 0
    assert f"user {users[0]}" in capsys.readouterr().out
    art = str(tmp_path / "art")
    assert cli.main(["export", bundle, "--out", art, "--batch-sizes", "1,4", "--k", "8",
                     "--exclude-max", "64"]) == 0
    ex = serving.load_exported(art)
    np.testing.assert_array_equal(ex.recommend(users, k=4).ids,
                                  serving.Retriever.load(bundle).recommend(users, k=4).ids)


def test_compact_folds_the_journal(tmp_path, tiny_model, capsys):
    bundle = str(tmp_path / "b")
    serving.publish(tiny_model, None, bundle, num_clusters=0, k0=30)
    ids = [int(i) for i in tiny_model.dataset.item_ids[:3]]
    writer = serving.Retriever.load(bundle, durable=True)
    writer.delete_items(ids[:2])
    writer.delete_items(ids[2:])
    users = [int(u) for u in tiny_model.dataset.user_ids[:3]]
    want = writer.recommend(users, k=10)
    capsys.readouterr()
    assert cli.main(["compact", bundle]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["updates_folded"] == 2 and rep["journal_seq"] == 2
    assert rep["version"].endswith("v000002")
    r = serving.Retriever.load(bundle)
    assert r.fresh_stats()["updates"] == 0 and not r.host.known(ids).any()
    np.testing.assert_array_equal(r.recommend(users, k=10).ids, want.ids)
