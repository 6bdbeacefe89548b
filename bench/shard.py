"""Sharded search speed on 1, 2, 4 forced CPU host devices: flat and IVF, with and without
a 10 % attribute filter.

N items x D dims (default 1M x 128; IVF: 1024 clusters, nprobe 32), batch B = 32, k = 100.
The indexes are built once (in this process) and saved to a temporary directory; every
device count runs in its own subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count``
must be set before JAX starts), which loads them, shards them over all its devices
(``st.shard_index``) and measures, per index and filter:
  - QPS of ``st.sharded_search`` and, in the same process, of the single-device
    ``st.search`` (batch / median wall time of ``--repeats`` runs after one warm-up);
  - recall of the sharded ids against the single-device ids (must be 1.0: the sharded
    search is exact w.r.t. the single-device index, ties aside), the fraction of identical
    id slots, whether the scores and paths are identical, and the paths taken.
Forced host devices share the machine's cores, so on a CPU this measures the overhead of
the sharded program (shard_map, per-shard top-k, merge), not a speed-up; on S accelerators
each device scans N / S items. Writes bench/results/shard_cpu.json (atomically).

    python bench/shard.py                 # full (1M x 128; index build a few minutes on 2 cores)
    python bench/shard.py --quick         # 100k items, 256 clusters, 3 repeats (~1-2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
FILTER = "bucket:3"                  # one of 10 equally likely values: a 10 % filter


def build(args, out_dir: str) -> dict:
    """Builds the flat and IVF indexes and the queries; saves them to ``out_dir``."""
    import jax

    import st_jax as st
    from st_jax._persist import index_to_flat
    from st_jax.synthetic import clustered_catalogue

    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    bucket = np.random.default_rng(1).integers(0, 10, args.items)
    attrs = {"bucket": bucket}
    times = {}
    for name, clusters in (("flat", 0), ("ivf", args.clusters)):
        t = time.perf_counter()
        index = jax.block_until_ready(st.build_index(cat.embeddings, num_clusters=clusters,
                                                     attributes=attrs))
        times[name] = time.perf_counter() - t
        arrays, spec = index_to_flat(index)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(spec, f)
        print(f"built {name} index in {times[name]:.1f} s", flush=True)
    np.save(os.path.join(out_dir, "queries.npy"), cat.queries)
    return {"build_s": times, "filter_pass_rate": float(np.mean(bucket == 3))}


def worker(args) -> None:
    """One device count (this process's devices): results as JSON to ``args.worker_out``."""
    import jax
    from jax.sharding import Mesh

    import st_jax as st
    from st_jax._persist import index_from_flat
    from st_jax._timing import sample_seconds
    from st_jax.synthetic import recall

    s = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("items",))
    q = np.load(os.path.join(args.worker_dir, "queries.npy"))
    rows = []
    for name in ("flat", "ivf"):
        with open(os.path.join(args.worker_dir, f"{name}.json")) as f:
            spec = json.load(f)
        with np.load(os.path.join(args.worker_dir, f"{name}.npz")) as z:
            index = index_from_flat(dict(z), spec)
        t = time.perf_counter()
        sidx = jax.block_until_ready(st.shard_index(index, mesh))
        shard_s = time.perf_counter() - t
        nprobe = {"nprobe": min(args.nprobe, index.ivf.num_clusters)} if index.ivf else {}
        for fname, filt in (("none", None), ("10%", FILTER)):
            kw = dict(filter=filt, **nprobe)

            def single():
                return st.search(index, q, args.k, **kw)

            def sharded():
                return st.sharded_search(sidx, q, args.k, **kw)

            want, got = jax.device_get(single()), jax.device_get(sharded())
            t_single = statistics.median(sample_seconds(single, args.repeats))
            t_sharded = statistics.median(sample_seconds(sharded, args.repeats))
            paths = np.bincount(np.asarray(got.path), minlength=3)
            row = {"devices": s, "index": name, "filter": fname,
                   "shard_rows": sidx.shard_rows, "shard_index_s": shard_s,
                   "sharded_qps": args.batch / t_sharded,
                   "sharded_p50_ms": t_sharded * 1e3,
                   "single_device_qps": args.batch / t_single,
                   "single_device_p50_ms": t_single * 1e3,
                   "recall_vs_single": recall(np.asarray(got.ids), np.asarray(want.ids)),
                   "ids_equal": float(np.mean(np.asarray(got.ids) == np.asarray(want.ids))),
                   "scores_equal": bool(np.array_equal(got.scores, want.scores)),
                   "paths_equal": bool(np.array_equal(got.path, want.path)),
                   "paths": {"flat": int(paths[0]), "ivf": int(paths[1]),
                             "fallback": int(paths[2])}}
            rows.append(row)
            print(f"S={s} {name:<4} filter {fname:<4}  sharded {row['sharded_qps']:9,.0f} QPS "
                  f"({row['sharded_p50_ms']:7.2f} ms)  single {row['single_device_qps']:9,.0f}"
                  f" QPS  recall {row['recall_vs_single']:.3f}  paths {row['paths']}",
                  flush=True)
    with open(args.worker_out, "w") as f:
        json.dump(rows, f)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1024, help="IVF clusters")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true",
                    help="100k items, 256 clusters, 3 repeats (checks the script)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/shard_cpu.json")
    ap.add_argument("--worker-dir", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.clusters, args.repeats = 100_000, 256, 3
    if args.worker_dir:
        worker(args)
        return {}
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from bench.ann import machine_info
    from st_jax._atomic import write_json_atomic

    results = []
    with tempfile.TemporaryDirectory(prefix="st_jax_shard_bench_") as tmp:
        info = build(args, tmp)
        for s in args.devices:
            out = os.path.join(tmp, f"rows_{s}.json")
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                  f" --xla_force_host_platform_device_count={s}").strip(),
                       PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-dir", tmp,
                   "--worker-out", out, "--k", str(args.k), "--batch", str(args.batch),
                   "--nprobe", str(args.nprobe), "--repeats", str(args.repeats)]
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                results += json.load(f)
    bad = [r for r in results if r["recall_vs_single"] != 1.0]
    payload = {"benchmark": "shard", "machine": machine_info(),
               "params": {"items": args.items, "dim": args.dim, "clusters": args.clusters,
                          "nprobe": args.nprobe, "batch": args.batch, "k": args.k,
                          "repeats": args.repeats, "devices": args.devices,
                          "filter": FILTER, "quick": args.quick, **info},
               "results": results}
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / "shard_cpu.json"
    write_json_atomic(str(out), payload)
    print(f"wrote {out}")
    if bad:
        raise SystemExit(f"sharded results differ from the single-device index: {bad}")
    return payload


if __name__ == "__main__":
    main()
