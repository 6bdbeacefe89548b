"""Acknowledged item updates are never lost: compaction through the API, a server restart,
and a server killed in the middle of a compaction (real processes, loopback HTTP)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import serving  # noqa: E402
from serving._server import Server, ServerConfig, ServerThread  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_KW = dict(max_batch=8, max_wait_ms=5, queue=64, max_users=16, poll_s=0,
                retriever_kw={"buckets": (8,), "fresh_capacity": 64})


@pytest.fixture
def bundle(tmp_path, flat_bundle):
    out = str(tmp_path / "bundle")
    shutil.copytree(flat_bundle, out)
    return out


def _add_body(ds, rows, new_ids, tag="durable"):
    cat = serving.Catalogue.from_dataset(ds)
    out = []
    for r, i in zip(rows, new_ids):
        attrs = {f: v[r] for f, v in cat.attributes.items()}
        attrs["genres"] = [tag] + list(attrs["genres"])
        out.append({"id": int(i), "title": f"item {i}", "attributes": attrs,
                    "features": {f: np.asarray(v)[r].tolist() for f, v in cat.features.items()}})
    return out


def _updates(c, ds):
    """Adds 5 items, re-tags one published item, deletes a fresh and a published item;
    returns (new ids, deleted ids)."""
    new_ids = [int(i) + 7000 for i in ds.item_ids[:5]]
    r = c.post("/v1/items", json={"add": _add_body(ds, range(5), new_ids)})
    assert r.status_code == 200, r.text
    gone = [new_ids[0], int(ds.item_ids[30])]
    r = c.post("/v1/items", json={
        "delete": gone, "update": [{"id": int(ds.item_ids[40]),
                                    "attributes": {"genres": ["durable"]}}]})
    assert r.status_code == 200, r.text
    return new_ids, gone


def _answers(c):
    """Ids and scores for a few users and filters (the state a client observes)."""
    out = []
    for filt in (None, "genres:durable", "NOT genres:durable"):
        r = c.post("/v1/recommend", json={"users": [1, 2, 3], "filter": filt, "k": 10})
        assert r.status_code == 200, r.text
        out.append([[(it["id"], round(it["score"], 5)) for it in res["items"]]
                    for res in r.json()["results"]])
    return out


def test_compact_endpoint_then_restart_serve_the_same(bundle, tiny_model):
    ds = tiny_model.dataset
    st = ServerThread(Server(ServerConfig(bundle, **SERVE_KW))).start()
    try:
        st.wait_ready()
        with httpx.Client(base_url=st.url, timeout=120) as c:
            new_ids, gone = _updates(c, ds)
            before = _answers(c)
            assert {i for res in before[1] for i, _ in res} == \
                set(new_ids[1:]) | {int(ds.item_ids[40])}
            r = c.post("/v1/admin/compact")
            assert r.status_code == 200, r.text
            rep = r.json()
            assert rep["compacted"] == "v000002" and rep["bundle_version"] == "v000002"
            assert rep["item_updates_folded"] == 3 and rep["compaction_s"] > 0
            assert c.get("/healthz").json()["bundle_version"] == "v000002"
            assert _answers(c) == before
            # more updates after the compaction: journaled against v000002
            r = c.post("/v1/items", json={"delete": [new_ids[1]]})
            assert r.status_code == 200 and r.json()["fresh"]["journal_seq"] == 4
            after = _answers(c)
    finally:
        st.stop()
    st = ServerThread(Server(ServerConfig(bundle, **SERVE_KW))).start()     # restart
    try:
        st.wait_ready()
        with httpx.Client(base_url=st.url, timeout=120) as c:
            assert _answers(c) == after
            assert c.get("/healthz").json()["bundle_version"] == "v000002"
    finally:
        st.stop()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import serving._bundle as b
    from serving._server import ServerConfig, serve
    orig = b.compact
    def killed_midway(r, *a, **k):        # SIGKILL once the new version is on disk, unnamed
        def stage(name):
            if name == "filled":
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(r, *a, _on_stage=stage, **k)
    b.compact = killed_midway
    serve(ServerConfig(sys.argv[1], max_batch=8, max_wait_ms=5, poll_s=0,
                       retriever_kw={"buckets": (8,), "fresh_capacity": 64}),
          port=int(sys.argv[2]), log_level="warning")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, *args, str(port)] if args[0] == "-c" else
                            [sys.executable, *args, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    raise AssertionError("server did not become ready")


def test_server_killed_during_compaction_restarts_on_the_previous_version(bundle, tiny_model):
    ds = tiny_model.dataset
    proc, url = _start(["-c", KILLER, bundle])
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            new_ids, gone = _updates(c, ds)
            before = _answers(c)
            with pytest.raises(httpx.HTTPError):         # the process dies mid-compaction
                c.post("/v1/admin/compact")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert serving.read_bundle(bundle).path.endswith("v000001")     # CURRENT never switched
    proc, url = _start(["-m", "st_jax.cli", "serve", bundle, "--buckets", "8",
                        "--max-batch", "8", "--poll-s", "0", "--fresh-capacity", "64",
                        "--log-level", "warning"])
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert c.get("/healthz").json()["bundle_version"] == "v000001"
            assert _answers(c) == before               # every acknowledged update is back
            r = c.post("/v1/admin/compact")              # and a compaction now succeeds
            assert r.status_code == 200 and r.json()["bundle_version"] == "v000002", r.text
            assert _answers(c) == before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    versions = sorted(os.listdir(os.path.join(bundle, "versions")))
    assert versions == ["v000001", "v000002"], versions          # no temporary left over


def test_auto_compaction_when_the_fresh_index_fills(bundle, tiny_model):
    ds = tiny_model.dataset
    kw = {**SERVE_KW, "retriever_kw": {"buckets": (8,), "fresh_capacity": 16},
          "auto_compact": 0.5}
    st = ServerThread(Server(ServerConfig(bundle, **kw))).start()
    try:
        st.wait_ready()
        with httpx.Client(base_url=st.url, timeout=120) as c:
            new_ids = [int(i) + 9000 for i in ds.item_ids[:8]]
            r = c.post("/v1/items", json={"add": _add_body(ds, range(8), new_ids)})
            assert r.status_code == 200 and r.json()["fresh"]["used"] == 8, r.text
            deadline = time.time() + 180
            while c.get("/healthz").json()["bundle_version"] != "v000002":
                assert time.time() < deadline, "no auto-compaction"
                time.sleep(0.2)
            assert c.get("/healthz").json()["fresh"]["used"] == 0
            r = c.post("/v1/recommend", json={"users": [1, 2], "filter": "genres:durable",
                                              "k": 10})
            assert {it["id"] for res in r.json()["results"] for it in res["items"]} == \
                set(new_ids)
    finally:
        st.stop()


def test_swap_report_names_what_happens_to_served_updates():
    from types import SimpleNamespace as NS

    from serving._server import _swap_report

    def old(durable, updates=3, replayed=0):
        return NS(path="/b/versions/v000001", journal_seq=2,
                  fresh_stats=lambda: {"durable": durable, "updates": updates,
                                       "replayed": replayed})

    def new(compacted_from, seq):
        return NS(journal_seq=seq, data=NS(manifest={"index": {"compacted_from":
                                                               compacted_from}}))

    assert _swap_report(old(True), new("v000001", 5)) == {"item_updates_folded": 3}
    assert _swap_report(old(True), new(None, 5)) == {"item_updates_superseded": 3}
    assert _swap_report(old(False), new("v000001", 2)) == {}          # folded from memory
    assert _swap_report(old(False, 4, 1), new(None, 2)) == {"item_updates_discarded": 3}
