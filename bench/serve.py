"""Whole-graph serving benchmark: latency (p50 / p99) and QPS per batch bucket, by stage.

For each catalogue size: a synthetic catalogue (planted tastes, 2 tasks) and a model with the
default architecture (random weights: speed does not depend on training), published as a
bundle (flat index below 200k items, IVF with ~sqrt(N) clusters above), served by
`serving.Retriever`. Per batch bucket and filter (none / a 10 % genre filter): latency of the
whole jitted graph over `--repeats` calls after warm-up (p50, p99, QPS = B / p50), and the
median time of the graph cut after each stage — user tower; + filtered Int8 top-k0 per task
and merge; + OverArch, Value Model and top-k — reported as per-stage increments.

    python bench/serve.py                                  # CPU: 100k and 1M items
    python bench/serve.py --items 10000000 --k0 10000 --k 1000 --buckets 16   # one GPU
Writes bench/results/serve_<platform>.json.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import serving  # noqa: E402
import training  # noqa: E402
from bench.ann import RESULTS, machine_info, write_json  # noqa: E402
from serving._graph import retrieve_stage, user_stage  # noqa: E402
from st_jax._timing import sample_seconds  # noqa: E402
from training._trained import TrainedModel, build_modules, split_params  # noqa: E402
from training._value_model import ValueModel  # noqa: E402


def random_model(num_items: int, num_users: int, seed: int = 0) -> TrainedModel:
    """Default architecture, random weights, over a synthetic catalogue of `num_items`."""
    syn = training.SyntheticConfig(num_users=num_users, num_items=num_items, seed=seed,
                                   num_clusters=max(8, num_items // 2000),
                                   interactions_per_user=8)
    ds = training.synthetic(syn)
    cfg = training.TrainConfig(data=training.DataConfig("synthetic", syn))
    tt, oa = build_modules(ds, cfg)
    graphs, params = split_params(tt, oa)
    return TrainedModel(cfg, ds, graphs, params, ValueModel.parse(cfg.value_formula, ds.tasks))


def bench_size(n: int, args) -> dict:
    t = time.perf_counter()
    model = random_model(n, args.users)
    t_data = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        serving.publish(model, None, os.path.join(d, "b"), k0=args.k0, include_users=True,
                        progress=args.progress)
        t_pub = time.perf_counter() - t
        r = serving.Retriever.load(os.path.join(d, "b"), buckets=tuple(args.buckets))
    m = r.data.manifest["index"]
    ds = model.dataset
    genres = sorted({g for gs in ds.item_attributes()["genres"] for g in gs})
    g_df = {g: 0 for g in genres}
    for gs in ds.item_attributes()["genres"]:
        for g in gs:
            g_df[g] += 1
    g10 = min(genres, key=lambda g: abs(g_df[g] / n - 0.10))
    filters = {"none": None, f"genres:{g10} ({g_df[g10] / n:.0%})": f"genres:{g10}"}
    spec = r.spec
    f_user = jax.jit(lambda w, x: user_stage(spec, w, x)[2])

    @functools.partial(jax.jit, static_argnames=("k0",))
    def f_retrieve(w, x, k0):
        _, indexes, u = user_stage(spec, w, x)
        return retrieve_stage(spec, indexes, u, x, k0)[0]

    rows = []
    for b in args.buckets:
        users = ds.user_ids[np.arange(b) % ds.num_users]
        feats = r.host.user_features(r.host.user_rows(users))
        for fname, filt in filters.items():
            fl = r.host.filters_for(filt, b)
            x = {key: jnp.asarray(v) for key, v in r.host.inputs(feats, fl, None, b, 0).items()}
            snap = r._snapshot()
            full = sample_seconds(lambda: r._graph(snap, b, args.k, args.k0, x)["ids"],
                                  args.repeats)
            s1 = statistics.median(sample_seconds(lambda: f_user(r.weights, x), args.repeats))
            s2 = statistics.median(sample_seconds(lambda: f_retrieve(r.weights, x, args.k0),
                                           args.repeats))
            call = sample_seconds(lambda: r(feats, filter=filt, k=args.k).ids, args.repeats)
            p50, p99 = np.percentile(full, 50), np.percentile(full, 99)
            row = {"items": n, "batch": b, "filter": fname, "p50_ms": p50 * 1e3,
                   "p99_ms": p99 * 1e3, "qps": b / p50,
                   "python_call_p50_ms": float(np.percentile(call, 50)) * 1e3,
                   "stage_ms": {"user_tower": s1 * 1e3, "retrieve_merge": (s2 - s1) * 1e3,
                                "overarch_value_topk": (np.median(full) - s2) * 1e3}}
            rows.append(row)
            st = row["stage_ms"]
            print(f"N={n:>9,} B={b:>4} {fname:<22} p50 {row['p50_ms']:8.2f} ms  p99 "
                  f"{row['p99_ms']:8.2f} ms  QPS {row['qps']:9,.0f}  | tower "
                  f"{st['user_tower']:.2f}  retrieve {st['retrieve_merge']:.2f}  "
                  f"overarch {st['overarch_value_topk']:.2f} ms", flush=True)
    return {"items": n, "index": {"num_clusters": m["num_clusters"], "nprobe": m["nprobe"],
                                  "bytes_per_item": m["bytes_per_item"]},
            "data_seconds": t_data, "publish_seconds": t_pub, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--k0", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [bench_size(n, args) for n in args.items]
    out = Path(args.out) if args.out else RESULTS / f"serve_{jax.devices()[0].platform}.json"
    write_json(out, {"benchmark": "serve", "machine": machine_info(),
                     "params": {k: v for k, v in vars(args).items() if k != "out"},
                     "sizes": sizes})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
