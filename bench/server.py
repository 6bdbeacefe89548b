"""HTTP serving benchmark: QPS and latency (p50 / p99) of `st-jax serve` on loopback.

A synthetic catalogue with a random-weight model of the default architecture
(`bench.serve.random_model`) is published to a temporary bundle and served by `st-jax serve`
in a child process: started once with an empty compilation cache (load + warm-up compiles
every graph), stopped, and started again (a restart: the graphs come from the cache); the
second one serves the rest. Closed-loop clients in this process (asyncio, minimal keep-alive HTTP/1.1
connections: httpx's pool costs more than the server on a small machine) each send one
request at a time — one user of the bundle's user table, half of them with a ~10 % genre
filter — at 1, 8 and 64 concurrent clients, each level bounded by a request count and a time
limit. Client latency includes HTTP and JSON on both sides; clients and server share the
machine's cores. Server-side latency and users per retriever call come from /metrics.

Then item updates (`POST /v1/items`, one client, journaled and fsynced as the server does by
default): adds of 1 and of 64 new items per request and attribute updates of 16 items per
request — items/s and request latency — and finally `POST /v1/admin/compact`, which folds
all of them into a new bundle version and hot-swaps to it (time to write the version, and
in all, with the new version's load and warm-up).

    python bench/server.py                                   # 10k items, 1 / 8 / 64 clients
    python bench/server.py --items 100000 --requests 4000 --seconds 30
Writes bench/results/server_<platform>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402

import serving  # noqa: E402
from bench.ann import RESULTS, machine_info, write_json  # noqa: E402
from bench.serve import random_model  # noqa: E402


def _wait_ready(url: str, proc, timeout: float) -> str:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            r = httpx.get(url + "/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()["bundle_version"]
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class _Conn:
    """A minimal keep-alive HTTP/1.1 client connection (the benchmark's clients must cost
    little: httpx's pool is much heavier than the server on a small machine)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                          .encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _send(conn: "_Conn", path: str, bodies, deadline: float, lat: list,
                codes: dict) -> list[dict]:
    """Posts ``bodies`` one at a time (each after the previous answer) until they run out or
    ``deadline`` passes, recording latencies and status codes; returns the bodies sent."""
    sent = []
    for body in bodies:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        status, _ = await conn.post(path, body)
        lat.append(time.perf_counter() - t)
        codes[status] = codes.get(status, 0) + 1
        sent.append(body)
    return sent


async def _level(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """Closed loop: `clients` connections, each sends the next body when its previous answer
    arrived, until every body was sent or `seconds` passed."""
    lat, codes, nxt = [], {}, iter(bodies)
    deadline = time.perf_counter() + seconds
    host, port = url.split("//")[1].split(":")
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        m0 = (await c.get("/metrics")).text

        async def worker():
            conn = _Conn(host, int(port))
            try:
                await _send(conn, "/v1/recommend", nxt, deadline, lat, codes)
            finally:
                conn.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        m1 = (await c.get("/metrics")).text
    calls = _metric(m1, "st_batch_size_count") - _metric(m0, "st_batch_size_count")
    users = _metric(m1, "st_batch_size_sum") - _metric(m0, "st_batch_size_sum")
    ep = '{endpoint="recommend"}'
    srv_s = (_metric(m1, f"st_request_seconds_sum{ep}")
             - _metric(m0, f"st_request_seconds_sum{ep}"))
    srv_n = (_metric(m1, f"st_request_seconds_count{ep}")
             - _metric(m0, f"st_request_seconds_count{ep}"))
    batch_s = _metric(m1, "st_batch_seconds_sum") - _metric(m0, "st_batch_seconds_sum")
    ms = np.asarray(lat) * 1e3
    return {"clients": clients, "requests": len(lat), "seconds": wall,
            "qps": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "status_codes": {str(k): v for k, v in sorted(codes.items())},
            "errors": sum(v for k, v in codes.items() if k != 200),
            "retriever_calls": int(calls), "mean_batch_users": users / max(calls, 1),
            "server_mean_ms": srv_s / max(srv_n, 1) * 1e3,
            "retriever_call_mean_ms": batch_s / max(calls, 1) * 1e3}


async def _updates(url: str, bodies: list[dict], seconds: float, warmup: int = 2) -> dict:
    """One client sends ``bodies`` to /v1/items one after another: the first ``warmup`` ones
    untimed (they compile the update kernels for these sizes; the first one's latency is
    reported as ``first_ms``), the rest timed, bounded by ``seconds``."""
    host, port = url.split("//")[1].split(":")
    conn = _Conn(host, int(port))
    lat, codes = [], {}
    try:
        t = time.perf_counter()
        for body in bodies[:warmup]:
            status, _ = await conn.post("/v1/items", body)
            codes[status] = codes.get(status, 0) + 1
        first_ms = (time.perf_counter() - t) * 1e3 / max(min(warmup, len(bodies)), 1)
        t0 = time.perf_counter()
        sent = await _send(conn, "/v1/items", bodies[warmup:], t0 + seconds, lat, codes)
        wall = time.perf_counter() - t0
        items = sum(len(b.get("add", [])) + len(b.get("update", [])) for b in sent)
    finally:
        conn.close()
    ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "items": items, "seconds": wall, "items_per_s": items / wall,
            "requests_per_s": len(lat) / wall, "warmup_mean_ms": first_ms,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "status_codes": {str(k): v for k, v in sorted(codes.items())},
            "errors": sum(v for k, v in codes.items() if k != 200)}


def _item_bodies(ds, start_id: int, batch: int, count: int, rng) -> list[dict]:
    """``count`` add requests of ``batch`` new items each (features and attributes copied from
    random catalogue items, ids from ``start_id``)."""
    cat = serving.Catalogue.from_dataset(ds)
    feats = {f: np.asarray(v) for f, v in cat.features.items()}
    out, nid = [], start_id
    for _ in range(count):
        rows = rng.integers(0, len(cat.ids), batch)
        out.append({"add": [{"id": nid + j,
                             "features": {f: v[r].tolist() for f, v in feats.items()},
                             "attributes": {f: v[r] for f, v in cat.attributes.items()}}
                            for j, r in enumerate(rows.tolist())]})
        nid += batch
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests", type=int, default=1000, help="per level (upper bound)")
    ap.add_argument("--seconds", type=float, default=15.0, help="per level (upper bound)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--k0", type=int, default=200)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--update-requests", type=int, default=200,
                    help="requests per update phase (upper bound)")
    ap.add_argument("--fresh-capacity", type=int, default=16384)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model = random_model(args.items, args.users)
    ds = model.dataset
    genres = [g for gs in ds.item_attributes()["genres"] for g in gs]
    g10 = min(set(genres), key=lambda g: abs(genres.count(g) / args.items - 0.10))
    rng = np.random.default_rng(0)
    levels, updates, compaction = [], {}, None
    with tempfile.TemporaryDirectory() as d:
        bundle = os.path.join(d, "b")
        t = time.perf_counter()
        serving.publish(model, None, bundle, k0=args.k0, include_users=True)
        t_pub = time.perf_counter() - t
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        cmd = [sys.executable, "-m", "st_jax.cli", "serve", bundle, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue", "4096", "--poll-s", "0", "--log-level", "warning",
               "--buckets", ",".join(map(str, args.buckets)), "--warmup-filter",
               f"genres:{g10}", "--fresh-capacity", str(args.fresh_capacity),
               "--compilation-cache", os.path.join(d, "xla")]   # empty at the first start
        url = f"http://127.0.0.1:{port}"
        cwd = str(Path(__file__).resolve().parents[1])
        # first start: every graph compiled (and kept in the empty compilation cache); then a
        # restart, which loads them from the cache, serves the benchmark
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd)
        try:
            _wait_ready(url, proc, timeout=1800)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd)
        try:
            version = _wait_ready(url, proc, timeout=1800)
            t_restart = time.perf_counter() - t
            print(f"{args.items:,} items: published in {t_pub:.1f} s; server started, loaded "
                  f"+ warmed in {t_load:.1f} s (empty compilation cache), restarted in "
                  f"{t_restart:.1f} s (cache) ({version})", flush=True)
            for clients in args.clients:
                uids = ds.user_ids[rng.integers(0, ds.num_users, args.requests)]
                bodies = [{"users": [int(u)], "k": args.k,
                           **({"filter": f"genres:{g10}"} if i % 2 else {})}
                          for i, u in enumerate(uids)]
                asyncio.run(_level(url, bodies[:min(100, len(bodies))], clients, 20))  # warm
                row = asyncio.run(_level(url, bodies, clients, args.seconds))
                levels.append(row)
                print(f"clients={clients:>3}  {row['requests']:>5} requests  QPS "
                      f"{row['qps']:7.1f}  p50 {row['p50_ms']:7.2f} ms  p99 "
                      f"{row['p99_ms']:7.2f} ms  users/call {row['mean_batch_users']:5.1f}  server "
                      f"{row['server_mean_ms']:6.1f} ms  call "
                      f"{row['retriever_call_mean_ms']:5.1f} ms  "
                      f"errors {row['errors']}", flush=True)
            n = args.update_requests
            phases = {"add_1": _item_bodies(ds, 10**9, 1, n, rng),
                      "add_64": _item_bodies(ds, 2 * 10**9, 64, max(n // 4, 4), rng)}
            tags = sorted(set(genres))
            phases["update_attributes_16"] = [
                {"update": [{"id": int(i), "attributes": {"genres": [str(rng.choice(tags))]}}
                            for i in rng.choice(ds.item_ids, 16, replace=False)]}
                for _ in range(n)]
            for name, bodies in phases.items():
                row = asyncio.run(_updates(url, bodies, args.seconds))
                updates[name] = row
                print(f"{name:<22} {row['requests']:>4} requests  {row['items_per_s']:8.1f} "
                      f"items/s  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
                      f"(warm-up {row['warmup_mean_ms']:6.1f} ms)  "
                      f"errors {row['errors']}", flush=True)
            fresh = httpx.get(url + "/healthz", timeout=30).json()
            t = time.perf_counter()
            r = httpx.post(url + "/v1/admin/compact", timeout=1800)
            r.raise_for_status()
            rep = r.json()
            compaction = {"seconds_total": time.perf_counter() - t,
                          "seconds_write_version": rep["compaction_s"],
                          "updates_folded": rep.get("item_updates_folded"),
                          "fresh_before": fresh.get("fresh"), "version": rep["bundle_version"]}
            print(f"compaction: {compaction['updates_folded']} journaled updates folded, "
                  f"version written in {rep['compaction_s']:.2f} s, swapped in after "
                  f"{compaction['seconds_total']:.2f} s (load + warm-up)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = Path(args.out) if args.out else RESULTS / f"server_{jax.devices()[0].platform}.json"
    payload = {"benchmark": "server", "machine": machine_info(),
               "params": {k: v for k, v in vars(args).items() if k != "out"},
               "filter": f"genres:{g10} on half the requests",
               "publish_seconds": t_pub, "load_warm_seconds": t_load,
               "restart_load_warm_seconds": t_restart, "levels": levels,
               "updates": updates, "compaction": compaction}
    write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
