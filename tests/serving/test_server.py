"""`st-jax serve`: the HTTP JSON API, micro-batching, overload, hot swap and item updates —
real HTTP on loopback (uvicorn in a background thread, httpx clients)."""
import asyncio
import re
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import serving  # noqa: E402
from serving._server import Server, ServerConfig, ServerThread  # noqa: E402

BUCKETS = (8, 32)            # few compiled graphs: loads and warm-ups stay short
HAS_ITEM_API = all(hasattr(serving.Retriever, m) for m in
                   ("add_items", "update_items", "delete_items", "fresh_stats"))


def _server(bundle, loader=None, buckets=BUCKETS, **cfg):
    kw = dict(max_batch=max(buckets), max_wait_ms=5, queue=256, max_users=64, poll_s=0,
              retriever_kw={"buckets": buckets, "fresh_capacity": 64})
    kw.update(cfg)
    st = ServerThread(Server(ServerConfig(bundle, **kw), loader=loader)).start()
    st.wait_ready()
    return st


@pytest.fixture(scope="module")
def server(flat_bundle):
    st = _server(flat_bundle)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def genre(tiny_model):
    """The most common genre of the tiny catalogue (a filter that passes some items)."""
    attrs = serving.Catalogue.from_dataset(tiny_model.dataset).attributes
    vals = [g for gs in attrs["genres"] for g in (gs if isinstance(gs, list) else [gs])]
    return max(set(vals), key=vals.count)


def _items(res):
    return [it["id"] for it in res["items"]]


def _check_same(res, direct, row, k):
    """One user's JSON result equals row ``row`` of a direct Recommendations."""
    n = int(min(direct.count[row], k))
    assert _items(res) == direct.ids[row, :n].tolist()
    np.testing.assert_allclose([it["score"] for it in res["items"]], direct.scores[row, :n],
                               rtol=1e-5, atol=1e-6)
    for it, ts in zip(res["items"], direct.task_scores[row, :n]):
        np.testing.assert_allclose([it["tasks"][t] for t in direct.tasks], ts, rtol=1e-5,
                                   atol=1e-6)


def _metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; every sample line must parse."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)', line)
        assert m, f"bad metrics line {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out


def _batched(m: dict) -> float:
    """Retriever calls that served more than one user."""
    return m["st_batch_size_count"] - m['st_batch_size_bucket{le="1.0"}']


# ----------------------------------------------------------------------------- basic API

def test_recommend_by_users_and_features_equals_direct(client, flat_retriever, genre):
    users = [int(u) for u in flat_retriever.host.users["ids"][:3]]
    r = client.post("/v1/recommend", json={"users": users})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_version"] == "v000001" and body["took_ms"] > 0
    direct = flat_retriever.recommend(users, k=10)
    for row, res in enumerate(body["results"]):
        assert res["user"] == users[row]
        _check_same(res, direct, row, 10)
        assert all(it["title"] == flat_retriever.title(it["id"]) for it in res["items"])

    # per-user filters, k, exclude_seen=false
    filters = [f"genres:{genre}", None, f"NOT genres:{genre}"]
    r = client.post("/v1/recommend", json={"users": users, "filter": filters, "k": 7,
                                           "exclude_seen": False})
    assert r.status_code == 200, r.text
    direct = flat_retriever.recommend(users, filter=filters, k=7, exclude_seen=False)
    for row, res in enumerate(r.json()["results"]):
        _check_same(res, direct, row, 7)

    # raw features (multi-valued rows given ragged: padded with 0 by the server)
    rows = flat_retriever.host.user_rows(users)
    feats = flat_retriever.host.user_features(rows)
    js = {}
    for s in flat_retriever.host.user_specs:
        a = np.asarray(feats[s["name"]])
        js[s["name"]] = ([[int(v) for v in row if v != 0] for row in a]
                         if s["kind"] == "multi" else a.tolist())
    r = client.post("/v1/recommend", json={"features": js, "filter": f"genres:{genre}",
                                           "k": 5})
    assert r.status_code == 200, r.text
    direct = flat_retriever(feats, filter=f"genres:{genre}", k=5)
    for row, res in enumerate(r.json()["results"]):
        assert res["row"] == row
        _check_same(res, direct, row, 5)


@pytest.mark.parametrize("body, status, match", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"users": [1], "bogus": 1}, 400, r"unknown fields \['bogus'\]"),
    ({}, 400, "exactly one of"),
    ({"users": [1], "features": {}}, 400, "exactly one of"),
    ({"users": []}, 400, "empty request"),
    ({"users": ["a"]}, 400, "integer ids"),
    ({"users": [1], "k": 0}, 400, "'k' must be an integer"),
    ({"users": [1], "k": "10"}, 400, "'k' must be an integer"),
    ({"users": [1], "k": True}, 400, "'k' must be an integer"),
    ({"users": [1], "k": 10 ** 6}, 400, "'k' must be an integer"),
    ({"users": [1], "filter": "genres:(oops"}, 400, "column"),
    ({"users": [1], "filter": "nosuchfield:x"}, 400, "nosuchfield"),
    ({"users": [1, 2], "filter": ["genres:x"]}, 400, "1 entries for 2 users"),
    ({"users": [1], "filter": 3}, 400, "'filter' must be"),
    ({"users": [1], "exclude_seen": "yes"}, 400, "exclude_seen"),
    ({"users": [10 ** 9]}, 404, "unknown user ids"),
    ({"users": list(range(65))}, 413, "at most 64"),
    ({"features": {"nosuch": [1]}}, 400, "unknown"),
    ({"features": {"nosuch": [1]}, "exclude_seen": True}, 400, "'users' form only"),
    ({"features": "x"}, 400, "'features' must be"),
])
def test_bad_requests_are_4xx_with_a_message(client, body, status, match):
    if isinstance(body, bytes):
        r = client.post("/v1/recommend", content=body,
                        headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/recommend", json=body)
    assert r.status_code == status, r.text
    assert re.search(match, r.json()["error"]), r.json()
    # the server keeps serving
    assert client.get("/healthz").status_code == 200


def test_filter_error_reports_its_column(client):
    r = client.post("/v1/recommend", json={"users": [1], "filter": "genres:a AND AND x"})
    assert r.status_code == 400
    assert isinstance(r.json()["column"], int) and "column" in r.json()["error"]


def test_healthz_and_metrics(client):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["bundle_version"] == "v000001"
    m0 = _metrics(client.get("/metrics").text)
    client.post("/v1/recommend", json={"users": [1]})
    client.post("/v1/recommend", json={"users": [1], "k": -1})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m1 = _metrics(r.text)
    ok, bad = ('st_requests_total{endpoint="recommend",status="200"}',
               'st_requests_total{endpoint="recommend",status="400"}')
    assert m1[ok] == m0.get(ok, 0) + 1 and m1[bad] == m0.get(bad, 0) + 1
    assert m1["st_batch_size_count"] >= 1 and m1["st_queue_depth"] == 0
    assert m1['st_bundle_loaded{version="v000001"}'] == 1
    assert 'st_request_seconds_bucket{endpoint="recommend",le="+Inf"}' in m1
    if HAS_ITEM_API:
        assert m1['st_fresh_items{state="capacity"}'] == 64


# ----------------------------------------------------------------------------- concurrency

async def _concurrent(url, bodies, concurrency):
    """POSTs every body (at most `concurrency` at once) -> (responses, latencies in s)."""
    sem = asyncio.Semaphore(concurrency)
    lat = []

    async def one(c, b):
        async with sem:
            t = time.perf_counter()
            r = await c.post("/v1/recommend", json=b)
            lat.append(time.perf_counter() - t)
            return r

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.gather(*(one(c, b) for b in bodies)), lat


def test_concurrent_clients_are_batched_and_correct(server, client, flat_retriever, genre):
    ids = [int(u) for u in flat_retriever.host.users["ids"][:40]]
    bodies = []
    for i in range(40):
        u = ids[i:i + 1 + i % 2]
        filt = [None, f"genres:{genre}", f"NOT genres:{genre}"][i % 3]
        bodies.append({"users": u, "filter": filt, "k": 3 + i % 8})
    m0 = _metrics(client.get("/metrics").text)
    resps, _ = asyncio.run(_concurrent(server.url, bodies, 40))
    assert [r.status_code for r in resps] == [200] * 40, [r.text for r in resps if
                                                          r.status_code != 200][:2]
    for b, r in zip(bodies, resps):
        # k=16: what the server's batch ran with (k_bucket); cut to the request's k below
        direct = flat_retriever.recommend(b["users"], filter=b["filter"], k=16)
        for row, res in enumerate(r.json()["results"]):
            assert res["user"] == b["users"][row]
            _check_same(res, direct, row, b["k"])
    m1 = _metrics(client.get("/metrics").text)
    assert _batched(m1) > _batched(m0), "no retriever call served more than one user"
    assert m1["st_batch_requests_count"] - m0["st_batch_requests_count"] < 40


def test_bounded_load(server, flat_retriever, genre):
    ids = [int(u) for u in flat_retriever.host.users["ids"]]
    rng = np.random.default_rng(0)
    bodies = [{"users": [ids[int(i)]], "filter": None if i % 2 else f"genres:{genre}"}
              for i in rng.integers(0, len(ids), 300)]
    t = time.perf_counter()
    done, lat = [], []
    for s in range(0, len(bodies), 100):             # count- and time-bounded
        resps, l1 = asyncio.run(_concurrent(server.url, bodies[s:s + 100], 16))
        done += resps
        lat += l1
        if time.perf_counter() - t > 10:
            break
    wall = time.perf_counter() - t
    errors = [r for r in done if r.status_code != 200]
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    print(f"\nload: {len(done)} requests, 16 clients, {len(done) / wall:.0f} QPS, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(errors)} errors")
    assert not errors, errors[0].text
    assert len(done) >= 100


# ----------------------------------------------------------------------------- overload, 500

class _SlowStub:
    """A real retriever whose batched call is slow (and fails for k == 32: requests with
    17 <= k <= 32); ``path`` may name another version directory."""

    def __init__(self, inner, delay=0.0, path=None):
        self._inner, self._delay = inner, delay
        self.path = path or inner.path

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *a, **kw):
        if kw.get("k") == 32:
            raise RuntimeError("stub failure")
        time.sleep(self._delay)
        return self._inner(*a, **kw)


def test_overload_gives_503_and_unexpected_errors_500(flat_bundle, flat_retriever):
    st = _server(flat_bundle, loader=lambda _: _SlowStub(flat_retriever, 0.3), max_batch=1,
                 max_wait_ms=0, queue=1, buckets=(1,))
    try:
        resps, _ = asyncio.run(_concurrent(st.url, [{"users": [1]}] * 6, 6))
        codes = sorted(r.status_code for r in resps)
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        assert set(codes) <= {200, 503}
        assert all("overloaded" in r.json()["error"] for r in resps if r.status_code == 503)
        with httpx.Client(base_url=st.url, timeout=30) as c:
            r = c.post("/v1/recommend", json={"users": [1], "k": 20})
            assert r.status_code == 500 and "stub failure" in r.json()["error"]
            assert c.post("/v1/recommend", json={"users": [1]}).status_code == 200
            m = _metrics(c.get("/metrics").text)
            assert m['st_requests_total{endpoint="recommend",status="503"}'] >= 1
            assert m['st_requests_total{endpoint="recommend",status="500"}'] == 1
    finally:
        st.stop()


# ----------------------------------------------------------------------------- hot swap

def test_hot_swap_while_querying(tmp_path, tiny_model):
    bundle = str(tmp_path / "bundle")
    serving.publish(tiny_model, None, bundle, num_clusters=0, k0=40)
    st = _server(bundle, buckets=(8,))
    stop = threading.Event()
    seen, failures = [], []

    async def clients():
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as c:
            async def loop(u):
                while not stop.is_set():
                    r = await c.post("/v1/recommend", json={"users": [u, u + 1]})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        seen.append(r.json()["bundle_version"])
                    await asyncio.sleep(0.01)
            await asyncio.gather(*(loop(u) for u in (1, 5, 9)))

    th = threading.Thread(target=lambda: asyncio.run(clients()))
    th.start()
    try:
        with httpx.Client(base_url=st.url, timeout=120) as c:
            time.sleep(0.3)
            serving.publish(tiny_model, None, bundle, num_clusters=0, k0=30)   # v000002
            n_before = len(seen)
            r = c.post("/v1/admin/reload")
            assert r.status_code == 200, r.text
            assert r.json()["reloaded"] and r.json()["bundle_version"] == "v000002"
            assert r.json()["previous_version"] == "v000001"
            assert len(seen) > n_before          # queries were served during the reload
            assert c.get("/healthz").json()["bundle_version"] == "v000002"
            r = c.post("/v1/admin/reload")        # nothing new: unchanged unless forced
            assert r.status_code == 200 and r.json()["reloaded"] is False
            time.sleep(0.2)
    finally:
        stop.set()
        th.join()
        st.stop()
    assert not failures, failures[:3]
    assert seen[0] == "v000001" and seen[-1] == "v000002"
    assert "v000001" not in seen[seen.index("v000002"):]


def test_polling_current_and_failed_reloads(tmp_path, flat_retriever):
    """``BUNDLE/CURRENT`` is polled; a version that fails to load keeps the old one served.
    (A stub loader serves the session's retriever under the version CURRENT names.)"""
    from serving._store import current_version
    root = tmp_path / "fake"
    (root / "versions" / "v000001").mkdir(parents=True)
    (root / "CURRENT").write_text('{"version": "v000001"}')
    st = _server(str(root), loader=lambda d: _SlowStub(flat_retriever,
                                                       path=current_version(d)),
                 buckets=(1, 8), poll_s=0.1)
    try:
        with httpx.Client(base_url=st.url, timeout=60) as c:
            assert c.get("/healthz").json()["bundle_version"] == "v000001"
            (root / "versions" / "v000002").mkdir()
            (root / "CURRENT").write_text('{"version": "v000002"}')
            t = time.monotonic()
            while c.get("/healthz").json()["bundle_version"] != "v000002":
                assert time.monotonic() - t < 30, "the new version was not picked up"
                time.sleep(0.05)
            (root / "CURRENT").write_text('{"version": "v000009"}')     # missing version
            r = c.post("/v1/admin/reload")
            assert r.status_code == 409 and "still serving v000002" in r.json()["error"]
            time.sleep(0.3)                                              # polling fails too
            assert c.post("/v1/recommend", json={"users": [1]}).json()["bundle_version"] \
                == "v000002"
            m = _metrics(c.get("/metrics").text)
            assert m['st_reloads_total{result="ok"}'] == 1
            assert m['st_reloads_total{result="failed"}'] >= 2
    finally:
        st.stop()


# ----------------------------------------------------------------------------- items

@pytest.mark.skipif(not HAS_ITEM_API, reason="serving.Retriever has no item-update API "
                    "(add_items / update_items / delete_items / fresh_stats) yet")
def test_item_updates_while_querying(tmp_path, flat_bundle, tiny_model):
    ds = tiny_model.dataset
    cat = serving.Catalogue.from_dataset(ds)
    bundle = str(tmp_path / "bundle")            # updates are journaled in the bundle
    shutil.copytree(flat_bundle, bundle)
    st = _server(bundle, buckets=(8,))
    stop = threading.Event()
    failures = []

    async def background():
        async with httpx.AsyncClient(base_url=st.url, timeout=60) as c:
            while not stop.is_set():
                r = await c.post("/v1/recommend", json={"users": [1, 2], "filter": "*"})
                if r.status_code != 200:
                    failures.append(r.text)
                await asyncio.sleep(0.005)

    th = threading.Thread(target=lambda: asyncio.run(background()))
    th.start()
    try:
        with httpx.Client(base_url=st.url, timeout=60) as c:
            def query(filt, k=10):
                r = c.post("/v1/recommend", json={"users": [1, 2, 3], "filter": filt, "k": k})
                assert r.status_code == 200, r.text
                return [set(_items(res)) for res in r.json()["results"]]

            def add_body(rows, new_ids):
                out = []
                for r_, i in zip(rows, new_ids):
                    feats = {f: np.asarray(v)[r_].tolist() for f, v in cat.features.items()}
                    attrs = {f: v[r_] for f, v in cat.attributes.items()}
                    attrs["genres"] = ["brand-new"] + list(attrs["genres"])
                    out.append({"id": i, "features": feats, "attributes": attrs,
                                "title": f"new {i}"})
                return out

            new_ids = [int(i) + 5000 for i in ds.item_ids[:6]]
            r = c.post("/v1/items", json={"add": add_body(range(6), new_ids)})
            assert r.status_code == 200, r.text
            assert r.json()["applied"]["added"] == new_ids and r.json()["fresh"]["live"] == 6
            for got in query("genres:brand-new", k=10):
                assert got == set(new_ids)                   # visible to the next query
            r = c.post("/v1/recommend", json={"users": [1], "filter": "genres:brand-new"})
            assert {it["title"] for it in r.json()["results"][0]["items"]} == \
                {f"new {i}" for i in new_ids}

            gone = new_ids[:2] + [int(ds.item_ids[10])]
            main_item = int(ds.item_ids[20])
            r = c.post("/v1/items", json={
                "delete": gone,
                "update": [{"id": main_item, "attributes": {"genres": ["retagged"]}},
                           {"id": new_ids[2], "attributes": {"genres": ["retagged"]}}]})
            assert r.status_code == 200, r.text
            assert r.json()["applied"] == {"added": [], "updated": [main_item, new_ids[2]],
                                           "deleted": gone}
            for got in query("genres:brand-new"):
                assert got == set(new_ids[3:])
            for got in query("genres:retagged"):
                assert got == {main_item, new_ids[2]}
            for got in query(None, k=200):
                assert not got & set(gone)

            # errors: duplicate add, unknown delete, unknown fields
            r = c.post("/v1/items", json={"add": add_body([0], [new_ids[4]])})
            assert r.status_code == 409, r.text
            r = c.post("/v1/items", json={"delete": [10 ** 9]})
            assert r.status_code in (400, 404), r.text
            assert r.json()["applied"] == {"added": [], "updated": [], "deleted": []}
            r = c.post("/v1/items", json={"remove": [1]})
            assert r.status_code == 400 and "unknown fields" in r.json()["error"]
            r = c.post("/v1/items", json={"add": [{"id": 1}]})
            assert r.status_code == 400 and "lacks" in r.json()["error"]
            live = c.post("/v1/items", json={"delete": [new_ids[5]]}).json()["fresh"]["live"]
            m = _metrics(c.get("/metrics").text)
            assert m['st_fresh_items{state="live"}'] == live
    finally:
        stop.set()
        th.join()
        st.stop()
    assert not failures, failures[:3]
