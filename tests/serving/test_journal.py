"""The update journal: durable item updates survive a reload, a restart and a compaction."""
import json
import os
import shutil

import numpy as np
import pytest

import serving
from serving import _journal as journal


# ----------------------------------------------------------------------------- the log itself

def test_records_roundtrip_torn_tail_and_corruption(tmp_path):
    root = str(tmp_path)
    w = journal.Writer(root)
    assert [w.append({"op": "delete", "ids": [i]}) for i in range(3)] == [1, 2, 3]
    assert [r["ids"] for r in journal.read_records(root)] == [[0], [1], [2]]
    assert [r["seq"] for r in journal.read_records(root, after=2)] == [3]
    w.close()
    (seg,) = [p for _, p in journal._segments(root)]
    with open(seg, "ab") as f:                  # a crash while writing record 4
        f.write(b'0badc0de {"seq": 4, "op": "del')
    assert journal.end_seq(root) == 3            # never acknowledged: ignored
    with open(seg, "rb") as f:
        lines = f.read().split(b"\n")
    lines[1] = lines[1].replace(b'"ids":[1]', b'"ids":[7]')        # a flipped record
    with open(seg, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(journal.JournalError, match="record 2 is corrupt"):
        list(journal.read_records(root))


def test_one_writer_per_bundle_and_segments(tmp_path):
    root = str(tmp_path)
    w = journal.Writer(root)
    w.append({"op": "delete", "ids": [1]})
    with pytest.raises(journal.JournalError, match="another process"):
        journal.Writer(root).append({"op": "delete", "ids": [2]})
    w.close()                                     # the first writer goes away
    assert w._file is None and w._lock_fd is None
    w2 = journal.Writer(root)
    assert w2.append({"op": "delete", "ids": [2]}) == 2               # a new segment
    assert [f for f, _ in journal._segments(root)] == [1, 2]
    journal.collect(root, keep_from=1)            # segment 1 folded everywhere: dropped
    assert [f for f, _ in journal._segments(root)] == [2]
    journal.collect(root, keep_from=5)            # the newest segment always stays
    assert [r["seq"] for r in journal.read_records(root)] == [2]
    assert journal.writer(root) is journal.writer(os.path.join(root, "."))
    w2.close()                                    # closed: a later append reopens
    assert w2.append({"op": "delete", "ids": [3]}) == 3
    assert [f for f, _ in journal._segments(root)] == [2, 3]
    w2.close()


# ----------------------------------------------------------------------------- in serving

def _items(ds, rows, offset):
    cat = serving.Catalogue.from_dataset(ds)
    feats = {f: np.asarray(v)[rows] for f, v in cat.features.items()}
    attrs = {f: [v[i] for i in rows] for f, v in cat.attributes.items()}
    attrs["genres"] = [["journaled"] + list(g) for g in attrs["genres"]]
    return np.asarray(ds.item_ids)[rows] + offset, feats, attrs


def _same(a, b, users, filters=(None, "genres:journaled", "NOT genres:journaled")):
    for f in filters:
        x, y = a.recommend(users, filter=f, k=8), b.recommend(users, filter=f, k=8)
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.scores, y.scores)


@pytest.fixture
def bundle(tmp_path, flat_bundle):
    out = str(tmp_path / "bundle")
    shutil.copytree(flat_bundle, out)
    return out


def test_durable_updates_survive_a_restart(bundle, tiny_model):
    ds = tiny_model.dataset
    users = ds.user_ids[:5]
    r = serving.Retriever.load(bundle, fresh_capacity=64, durable=True)
    ids, feats, attrs = _items(ds, np.arange(6), 7000)
    r.add_items(ids, feats, attrs, titles=[f"t{i}" for i in ids])
    r.update_items([int(ds.item_ids[3]), int(ids[0])], attributes={"genres": [["journaled"]] * 2})
    r.update_items([int(ids[1])], features={f: v[2:3] for f, v in feats.items()})
    r.delete_items([int(ids[2]), int(ds.item_ids[4])])
    assert r.fresh_stats()["journal_seq"] == 4
    # "restart": a new process-level load replays the 4 updates
    again = serving.Retriever.load(bundle, fresh_capacity=64)
    assert again.fresh_stats()["replayed"] == 4 and again.fresh_stats()["journal_seq"] == 4
    _same(r, again, users)
    assert again.title(int(ids[0])) == f"t{ids[0]}"
    out = again.recommend(users, filter="genres:journaled", k=8)
    assert not {int(ids[2]), int(ds.item_ids[4])} & set(out.ids.ravel().tolist())
    # a non-durable retriever's updates stay in memory only
    again.delete_items([int(ids[3])])
    assert journal.end_seq(bundle) == 4
    # and a reader catches up with what a durable writer appends later
    r.delete_items([int(ids[5])])
    assert again.catch_up() == 1 and again.fresh_stats()["journal_seq"] == 5


def test_compaction_folds_the_journal_and_keeps_later_updates(bundle, tiny_model):
    ds = tiny_model.dataset
    users = ds.user_ids[:5]
    r = serving.Retriever.load(bundle, fresh_capacity=64, durable=True)
    ids, feats, attrs = _items(ds, np.arange(8), 8000)
    r.add_items(ids[:4], {f: v[:4] for f, v in feats.items()},
                {f: v[:4] for f, v in attrs.items()})
    r.delete_items([int(ds.item_ids[7])])
    snapshot = r._state                            # what the compaction folds (seq 2)
    r.add_items(ids[4:], {f: v[4:] for f, v in feats.items()},          # acknowledged while
                {f: v[4:] for f, v in attrs.items()})                    # it runs: seq 3

    class Frozen:                                   # compact() sees the snapshot only
        _state, data, index, host = snapshot, r.data, r.index, r.host
    path = serving.compact(Frozen)
    with open(os.path.join(path, "manifest.json")) as f:
        assert json.load(f)["journal_seq"] == 2
    new = serving.Retriever.load(bundle, fresh_capacity=64)
    st = new.fresh_stats()
    assert st["replayed"] == 1 and st["live"] == 4 and st["journal_seq"] == 3
    _same(r, new, users)
    # compacting again folds the replayed update too
    r2 = serving.Retriever.load(bundle, fresh_capacity=64)
    serving.compact(r2)
    final = serving.Retriever.load(bundle, fresh_capacity=64)
    assert final.fresh_stats()["updates"] == 0
    _same(r, final, users)


def test_publish_supersedes_earlier_updates(bundle, tiny_model):
    r = serving.Retriever.load(bundle, fresh_capacity=8, durable=True)
    r.delete_items([int(tiny_model.dataset.item_ids[0])])
    serving.publish(tiny_model, None, bundle, num_clusters=0)
    fresh = serving.Retriever.load(bundle)
    assert fresh.fresh_stats()["updates"] == 0 and fresh.fresh_stats()["journal_seq"] == 1
    assert fresh.host.known([int(tiny_model.dataset.item_ids[0])])[0]


def test_unreplayable_journal_is_a_clear_error(bundle, tiny_model):
    r = serving.Retriever.load(bundle, fresh_capacity=8, durable=True)
    ids, feats, attrs = _items(tiny_model.dataset, np.arange(6), 9000)
    r.add_items(ids, feats, attrs)
    with pytest.raises(journal.JournalError, match="fresh_capacity"):
        serving.Retriever.load(bundle, fresh_capacity=4)


def test_a_writer_behind_the_journal_must_catch_up(bundle):
    a = serving.Retriever.load(bundle, durable=True)
    b = serving.Retriever.load(bundle, durable=True)
    a.delete_items([int(a.host.item_ids[0])])
    with pytest.raises(journal.JournalError, match="catch_up"):
        b.delete_items([int(a.host.item_ids[1])])
    assert b.catch_up() == 1
    b.delete_items([int(a.host.item_ids[1])])
    assert a.catch_up() == 1 and a.fresh_stats()["journal_seq"] == 2
